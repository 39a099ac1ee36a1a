"""Evaluate a run's checkpoint on this rank's share of the validation set, as the trainer does.

    deepspeed --num_gpus N tests/workers/val_loss.py RUN_DIR OUT.json   (or plain python: 1 rank)

Every rank loads the full weights (no engine) and scores its share with the library's own
functions; rank 0 writes the all-reduced loss and what each rank saw.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dsgpt import dist  # noqa: E402
from dsgpt.data.dataset import TokenData  # noqa: E402
from dsgpt.eval.perplexity import evaluate, val_set_size  # noqa: E402
from dsgpt.runs import data_dir, load_model  # noqa: E402


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_dir, out = Path(args[0]), Path(args[1])
    ctx = dist.setup()
    model, cfg, _ = load_model(run_dir)
    data = TokenData(data_dir(cfg.data.path, cfg.data.builtin_vocab_size), model.config.block_size, cfg.run.seed)
    n_windows, batch_size = val_set_size(cfg)
    batches = list(data.val_batches(n_windows, batch_size, ctx.rank, ctx.world_size))
    res = evaluate(model, batches, torch.device("cpu"))
    seen = {"batches": len(batches), "windows": sum(len(x) for x, _ in batches),
            "real_windows": sum(int((y != -100).any(1).sum()) for _, y in batches)}
    per_rank = dist.all_gather_object(seen)
    if ctx.is_main:
        out.write_text(json.dumps({"loss": res.loss, "accuracy": res.accuracy, "tokens": res.tokens,
                                   "world": ctx.world_size, "per_rank": per_rank}))
    dist.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
