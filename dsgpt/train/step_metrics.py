"""A run's training curve: what each step's figures become, and when the costly ones are read.

Every step adds the time it took to dispatch to the logging window, and the read-back of the
dispatched steps adds the time it waited for the device (Run.settle); each read-back step then
records its loss. Only at log steps are the gradient norm (a device read) and memory read, and the
window's averages since the last log (tokens/s, step time, MFU) written to TensorBoard and
metrics.jsonl, the progress bar or, without a terminal, a console line every 5%.
"""

from __future__ import annotations

import sys
from typing import Callable

from dsgpt.metrics import Throughput, memory_stats, peak_flops
from dsgpt.model import flops_per_token


class StepMetrics:
    def __init__(self, log, cfg, ctx, mcfg, tokens_per_step: int, first_step: int,
                 console: Callable[[str], None]):
        self.log, self.ctx, self.console = log, ctx, console
        self.precision = cfg.precision
        self.log_interval, self.max_steps = cfg.train.log_interval, cfg.train.max_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token(mcfg)
        self.peak_flops = peak_flops(ctx.device_type, cfg.precision, cfg.tf32)
        self.meter = Throughput()
        self.progress = _progress(ctx.is_main, first_step, self.max_steps)
        self.losses: dict[int, float] = {}  # step -> train loss, for the steps this launch ran
        self.grad_norms: dict[int, float] = {}  # step -> gradient norm before clipping, at log steps

    def timed(self, seconds: float) -> None:
        """A step was dispatched (applied or skipped) in `seconds`."""
        self.meter.add(self.tokens_per_step, seconds)
        if self.progress:
            self.progress.update(1)

    def waited(self, seconds: float) -> None:
        """The read-back of the dispatched steps waited `seconds` for the device: theirs too."""
        self.meter.wait(seconds)

    def record(self, step: int, loss: float, lr: float, tokens_seen: int, engine) -> None:
        """An applied step's loss; at log steps everything else too."""
        self.losses[step] = loss
        if self.log_interval > 0 and step % self.log_interval == 0:
            self._write(step, loss, lr, tokens_seen, engine)

    def _write(self, step: int, loss: float, lr: float, tokens_seen: int, engine) -> None:
        tok_s, seconds = self.meter.window()  # averages since the last log: no single step's noise
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            grad_norm = self.grad_norms[step] = float(grad_norm)
        scalars = {
            "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/tokens_per_sec": tok_s, "train/step_time": seconds,
            "train/mfu": (self.flops_per_token * tok_s / (self.peak_flops * self.ctx.world_size)
                          if self.peak_flops else None),
            "train/tokens_seen": tokens_seen,
        }
        if self.precision == "fp16":
            opt = engine.optimizer
            scalars["train/loss_scale"] = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        scalars.update(memory_stats(self.ctx.device_type))
        self.log.log(step, scalars)
        if self.progress:
            self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        elif step % max(1, self.max_steps // 20) == 0:
            # No terminal (a batch job's log): a plain line every 5% instead of a bar.
            self.console(f"step {step}/{self.max_steps}: loss {loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s")

    def close(self) -> None:
        if self.progress:
            self.progress.close()
            self.progress = None


def _progress(enabled: bool, first: int, last: int):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=last, initial=first - 1, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)
