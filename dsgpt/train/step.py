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

import torch

from dsgpt import dist
from dsgpt.model import IGNORE_INDEX


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the whole step (all ranks)
    tokens: int  # target tokens in the whole step (all ranks)


def train_step(engine, batch, device) -> StepResult:
    """One optimizer step over a StepBatch (dsgpt.data.loader).

    One host synchronisation: the step's loss, summed on the device over the micro-steps and ranks,
    is read once at the end (the non-finite check needs it every step). The token count costs a
    collective only when labels are masked, and is then read back with the loss. Otherwise the
    loader counted it on the host, where it stays: a 0-dim CPU tensor enters a GPU kernel as a scalar
    argument, with no copy to the device (a copy from pageable memory would be one more sync)."""
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
    loss_sum = dist.all_reduce_tensor(loss_sum)
    if batch.tokens is not None:
        loss_total, tokens = loss_sum.item(), float(batch.tokens)  # the one read back
    else:
        loss_total, tokens = torch.stack([loss_sum, total]).tolist()  # the one read back, both at once
    return StepResult(loss=loss_total / max(tokens, 1.0), tokens=int(tokens))


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
