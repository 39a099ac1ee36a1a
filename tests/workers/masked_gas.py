"""Masked labels of uneven lengths: micro 2 x GAS 2 must give the step micro 4 x GAS 1 gives.

    python tests/workers/masked_gas.py OUT.json

Builds the real engine and train step (no data pipeline) on fixed batches whose labels are masked
(-100) over different lengths per row, and records the losses and final weights of both splits.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dsgpt import dist  # noqa: E402
from dsgpt.config import load_config  # noqa: E402
from dsgpt.ds_config import resolve_ds_config  # noqa: E402
from dsgpt.model import GPT, GPTConfig  # noqa: E402
from dsgpt.train.engine import build_engine  # noqa: E402
from dsgpt.data.loader import step_batch  # noqa: E402
from dsgpt.train.step import train_step  # noqa: E402


def batches(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 64, (4, 16), generator=g)
    y = torch.randint(0, 64, (4, 16), generator=g)
    for row, keep in enumerate((16, 3, 9, 1)):  # uneven numbers of target tokens per row
        y[row, :16 - keep] = -100
    return x, y


def run(micro: int, gas: int) -> dict:
    cfg = load_config(None, [f"train.micro_batch_size={micro}", f"train.grad_accum_steps={gas}",
                             "train.max_steps=5", "optim.warmup_steps=3", "deepspeed.zero_stage=1",
                             "model.n_embd=32", "model.n_head=2", "model.n_layer=2"])
    ctx = dist.setup()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    engine, _ = build_engine(model, cfg, resolve_ds_config(cfg, ctx.world_size, False))
    losses = []
    for step in range(5):
        x, y = batches(step)
        micro_batches = [(x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]) for i in range(gas)]
        losses.append(train_step(engine, step_batch(micro_batches), ctx.device).loss)
    weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    return {"losses": losses, "weights_head": weights[:64].tolist(), "weights_sum": float(weights.double().sum())}


if __name__ == "__main__":
    out = {"m2g2": run(2, 2), "m4g1": run(4, 1)}
    Path(sys.argv[1]).write_text(json.dumps(out))
    dist.exit_rank(0)  # see exit_rank: no C++ clean-up abort after the work is done
