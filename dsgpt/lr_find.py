"""`dsgpt lr-find`: the learning-rate range test (Smith, "Cyclical Learning Rates", 2017).

Trains a fresh model from a run config for up to `steps` steps while the learning rate grows
exponentially from `start` to `end`, records the loss at each rate, and stops early once the
smoothed loss passes 4x its lowest value (the rate is then far too high). The same engine, data and
step as training (any ZeRO stage, any number of ranks); nothing is saved but the table and plot.

The suggestion, stated and recomputable from the saved table: the rate where the smoothed loss
falls fastest against log10(rate) (the most negative finite-difference slope), looked for before
the smoothed loss's minimum. The smoothed loss is an exponential moving average (beta 0.9) with
bias correction, so the first steps are not pulled towards zero.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsgpt.config import Config
from dsgpt.errors import UserError

BETA = 0.9  # smoothing of the loss curve
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


@dataclass
class LrFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: Optional[float]
    stopped_early: bool
    table: Optional[Path]
    plot: Optional[Path]


def check_range(start: float, end: float, steps: int) -> None:
    if not (start > 0 and end > start):
        raise UserError(f"lr-find needs 0 < --start < --end (got start {start}, end {end}); e.g. --start 1e-7 --end 10.")
    if steps < 10:
        raise UserError(f"lr-find --steps {steps} is too few to see a curve; use at least 10 (a few hundred is usual).")


def lr_at(i: int, steps: int, start: float, end: float) -> float:
    return start * (end / start) ** (i / (steps - 1))


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    out, avg = [], 0.0
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> Optional[float]:
    """The rate of the steepest fall of the smoothed loss vs log10(rate), before its minimum."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < 3:
        return None
    lowest = min(finite, key=lambda i: smoothed[i])
    best, steepest = None, 0.0
    for i in range(1, lowest + 1):
        if i - 1 not in finite or i not in finite:
            continue
        slope = (smoothed[i] - smoothed[i - 1]) / (math.log10(lrs[i]) - math.log10(lrs[i - 1]))
        if slope < steepest:
            best, steepest = i, slope
    return lrs[best] if best is not None else None


def run_lr_find(cfg: Config, start: float = 1e-7, end: float = 10.0, steps: int = 200,
                out_dir: Optional[Path] = None) -> LrFindResult:
    from dsgpt import dist
    from dsgpt.data.loader import StepLoader
    from dsgpt.ds_config import resolve_ds_config
    from dsgpt.train import rng
    from dsgpt.train.engine import build_engine
    from dsgpt.train.run_setup import check_precision, model_config, open_data
    from dsgpt.train.step import train_step
    from dsgpt.zero import build_model
    check_range(start, end, steps)
    check_precision(cfg)
    # A constant schedule: the ramp below sets the rate of every step itself.
    cfg = cfg.model_copy(deep=True)
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.lr = "constant", 0, start
    cfg.train.max_steps = steps
    ctx = dist.setup()
    data = open_data(cfg)
    mcfg = model_config(cfg, data.vocab_size)
    rng.seed_everything(cfg.run.seed + ctx.rank)
    ds_config = resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu)
    engine, _ = build_engine(build_model(mcfg, ds_config), cfg, ds_config)
    engine.train()
    lrs, losses = [], []
    stopped = False
    with StepLoader(data, ctx.rank, ctx.world_size, cfg.train.micro_batch_size, cfg.train.grad_accum_steps,
                    1, steps, ctx.device) as loader:
        for i in range(steps):
            lr = lr_at(i, steps, start, end)
            for group in engine.optimizer.param_groups:  # after the scheduler's own update: this rate wins
                group["lr"] = lr
            loss = train_step(engine, loader.get(i + 1), ctx.device).loss
            lrs.append(lr)
            losses.append(loss)
            smoothed = smooth(losses)
            if not math.isfinite(loss) or smoothed[-1] > DIVERGED * min(smoothed):
                stopped = i < steps - 1
                break
    smoothed = smooth(losses)
    result = LrFindResult(lrs, losses, smoothed, suggest(lrs, smoothed), stopped, None, None)
    if ctx.is_main:
        out = Path(out_dir) if out_dir else cfg.run.dir / "lr_find"
        result.table, result.plot = write_table(out, result), write_plot(out, result)
    dist.barrier()
    return result


def write_table(out: Path, res: LrFindResult) -> Path:
    from dsgpt.io import atomic_write_text
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "lr", "loss", "smoothed_loss"])
    for i, (lr, loss, sm) in enumerate(zip(res.lrs, res.losses, res.smoothed), 1):
        w.writerow([i, repr(lr), repr(loss), repr(sm)])
    path = out / "lr_find.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def read_table(path) -> tuple[list[float], list[float], list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return ([float(r["lr"]) for r in rows], [float(r["loss"]) for r in rows],
            [float(r["smoothed_loss"]) for r in rows])


def write_plot(out: Path, res: LrFindResult) -> Path:
    import os

    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(res.lrs, res.losses, alpha=0.3, label="loss")
    ax.plot(res.lrs, res.smoothed, label=f"smoothed (EMA {BETA})")
    if res.suggestion:
        ax.axvline(res.suggestion, color="red", linestyle="--", label=f"suggested {res.suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in res.smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), DIVERGED * min(finite)) * 1.05)
    ax.legend()
    ax.set_title("learning-rate range test")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lr_find.png"
    tmp = out / "lr_find.tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
