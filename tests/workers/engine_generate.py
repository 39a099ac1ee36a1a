"""Generation through a DeepSpeed engine, as the trainer's text samples do it, on every rank.

    deepspeed --num_gpus 2 tests/workers/engine_generate.py RUN_DIR STAGE PROMPT_IDS_JSON OUT_DIR

Builds the run's model under ZeRO STAGE (sharded from the start under ZeRO-3), puts the run's
weights into it, then generates greedily with and without the KV cache and by seeded sampling.
Each rank writes what it drew and how many cached attention updates ran.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dsgpt import dist  # noqa: E402
from dsgpt.config import load_config  # noqa: E402
from dsgpt.ds_config import resolve_ds_config  # noqa: E402
from dsgpt.generate import sample  # noqa: E402
from dsgpt.model import KVCache  # noqa: E402
from dsgpt.runs import load_model  # noqa: E402
from dsgpt.train.engine import build_engine, describe_engine  # noqa: E402
from dsgpt.zero import build_model  # noqa: E402


def count_cache_updates():
    calls = [0]
    update = KVCache.update

    def counted(self, *args):
        calls[0] += 1
        return update(self, *args)
    KVCache.update = counted
    return calls


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_dir, stage, prompt, out = Path(args[0]), int(args[1]), json.loads(args[2]), Path(args[3])
    ctx = dist.setup()
    full, _, _ = load_model(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"), [f"deepspeed.zero_stage={stage}"])
    ds_config = resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu)
    engine, _ = build_engine(build_model(full.config, ds_config), cfg, ds_config)
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        engine.module.load_state_dict(full.state_dict())
    sharded = all(getattr(p, "ds_tensor", p).numel() < getattr(p, "ds_numel", 0) for p in params)
    engine.eval()
    x = torch.tensor([prompt], device=ctx.device)
    block = full.config.block_size
    calls = count_cache_updates()
    cached = sample(engine, x, 40, block, temperature=0)[0].tolist()
    cached_updates = calls[0]
    plain = sample(engine, x, 40, block, temperature=0, use_cache=False)[0].tolist()
    plain_updates = calls[0] - cached_updates
    drawn = sample(engine, x, 40, block, temperature=1.0, top_k=0, generator=torch.Generator().manual_seed(7))
    result = {"zero_stage": describe_engine(engine)["zero_stage"], "sharded": sharded, "cached": cached,
              "plain": plain, "sampled": drawn[0].tolist(), "cache_updates": cached_updates,
              "plain_updates": plain_updates}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
