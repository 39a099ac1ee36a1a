"""One optimizer step and one evaluation pass, driven through a DeepSpeed engine.

The step's loss is the mean over every target token of the whole optimizer step (all micro-steps,
all ranks). Each micro-step back-propagates its token-summed loss divided by the step's global
token count, times the data-parallel size that DeepSpeed's gradient averaging divides by. So a
token weighs the same however the batch is split across micro-steps and ranks, and masked labels
or uneven lengths do not tilt the average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from dsgpt import dist
from dsgpt.model import IGNORE_INDEX


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the whole step (all ranks)
    tokens: int  # target tokens in the whole step (all ranks)
    skipped_on_device: bool = False  # the optimizer found the gradients non-finite and skipped, on the device


@dataclass
class PendingStep:
    """A dispatched step whose numbers are still on the device (read back by `read_back`)."""
    loss_sum: torch.Tensor  # token-summed loss of the whole step, all ranks (float64)
    tokens: object  # target tokens of the whole step: a host number when the loader knew it, else a device tensor
    skipped: Optional[torch.Tensor]  # 1.0 where the optimizer skipped on the device (GuardedAdamW); else None


def dispatch_step(engine, batch, device) -> PendingStep:
    """One optimizer step over a StepBatch (dsgpt.data.loader), reading nothing back from the device.

    The step's loss stays summed on the device (over the micro-steps, all-reduced over the ranks) until
    `read_back`, which reads any number of steps at once. The token count costs a collective only when
    labels are masked. Otherwise the loader counted it on the host, where it stays: a 0-dim CPU tensor
    enters a GPU kernel as a scalar argument, with no copy to the device (a copy from pageable memory
    would be a sync)."""
    world = dist.world_size()
    if batch.tokens is None:
        local = sum((m[1] != IGNORE_INDEX).sum().to(device) for m in batch.micro)
        total = dist.all_reduce_tensor(local.to(torch.float64))
    else:
        total = torch.tensor(float(batch.tokens), dtype=torch.float64)
    scale = (world / total.clamp(min=1.0)).float()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y, *pos in batch.micro:  # already there when the loader put them on the device
        # Packed SFT rows come as (x, y, pos): positions restart at each example (dsgpt.data.sft).
        extra = {"pos": pos[0].to(device, non_blocking=True)} if pos else {}
        s, _ = engine(x.to(device, non_blocking=True), targets=y.to(device, non_blocking=True), **extra)
        engine.backward(s * scale, scale_wrt_gas=False)
        engine.step()
        loss_sum += s.detach()
    return PendingStep(loss_sum=dist.all_reduce_tensor(loss_sum),
                       tokens=float(batch.tokens) if batch.tokens is not None else total,
                       skipped=_device_skip_flag(engine))


def _device_skip_flag(engine) -> Optional[torch.Tensor]:
    """GuardedAdamW's flag of the step just taken (the engine holds it unwrapped); None for
    DeepSpeed's optimizers, which say on the host."""
    return getattr(getattr(engine, "optimizer", None), "skipped", None)


def read_back(pending: list[PendingStep]) -> list[StepResult]:
    """The steps' losses, token counts and device-side skips, in one read from the device."""
    if not pending:
        return []
    on_device: list[torch.Tensor] = []

    def slot(value) -> Optional[int]:
        if not torch.is_tensor(value):
            return None
        on_device.append(value.to(torch.float64))
        return len(on_device) - 1
    slots = [(slot(p.loss_sum), slot(p.tokens), slot(p.skipped)) for p in pending]
    read = torch.stack(on_device).tolist()  # the one read back
    out = []
    for p, (loss_at, tokens_at, skipped_at) in zip(pending, slots):
        tokens = read[tokens_at] if tokens_at is not None else p.tokens
        out.append(StepResult(loss=read[loss_at] / max(tokens, 1.0), tokens=int(tokens),
                              skipped_on_device=skipped_at is not None and read[skipped_at] != 0.0))
    return out


@dataclass
class Dispatched:
    step: int
    lr: float  # the learning rate the step used
    applied: bool  # DeepSpeed's word on the host; GuardedAdamW's skips are read back with the loss
    pending: PendingStep


class UnreadSteps:
    """The steps dispatched since the last read-back, and when to read them: when a step is busy
    (it logs, evaluates, saves or samples), when DeepSpeed said on the host that it skipped the
    update (so its handling stays exact to the step), or when `limit` are waiting."""

    def __init__(self, limit: int = 100):
        self.limit = limit
        self.steps: list[Dispatched] = []

    def add(self, dispatched: Dispatched) -> None:
        self.steps.append(dispatched)

    def due(self, busy: bool) -> bool:
        return bool(self.steps) and (busy or not self.steps[-1].applied or len(self.steps) >= self.limit)

    def read(self) -> list[tuple[Dispatched, StepResult]]:
        """Every unread step with its numbers, in one read from the device; then none is unread."""
        out = list(zip(self.steps, read_back([d.pending for d in self.steps])))
        self.steps = []
        return out


def train_step(engine, batch, device) -> StepResult:
    """One optimizer step, read back at once (for callers that want every step's loss now)."""
    return read_back([dispatch_step(engine, batch, device)])[0]


# What DeepSpeed's dynamic loss scaler raises when it cannot lower the scale any further.
LOSS_SCALE_AT_MINIMUM = "loss scale already at minimum"


def step_outcome(loss: float, applied: bool, precision: str) -> str:
    """'ok', 'overflow' (fp16 loss scaling skipped the update: routine, the scale drops) or
    'nonfinite' (the loss itself, or outside fp16 the gradients, were inf/NaN)."""
    if not math.isfinite(loss):
        return "nonfinite"
    if applied:
        return "ok"
    return "overflow" if precision == "fp16" else "nonfinite"
