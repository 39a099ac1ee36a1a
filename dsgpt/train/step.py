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

from dsgpt import dist
from dsgpt.model import token_loss_sum


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the whole step (all ranks)
    tokens: int  # target tokens in the whole step (all ranks)


def train_step(engine, micro_batches, world_size: int, device) -> StepResult:
    local_tokens = sum(int((y != -100).sum()) for _, y in micro_batches)
    (total_tokens,) = dist.all_reduce_sum([local_tokens], device)
    scale = world_size / max(total_tokens, 1.0)
    loss_sum = 0.0
    for x, y in micro_batches:
        logits = engine(x.to(device, non_blocking=True))
        s, _ = token_loss_sum(logits, y.to(device, non_blocking=True))
        engine.backward(s * scale, scale_wrt_gas=False)
        engine.step()
        loss_sum += float(s.detach())
    (loss_total,) = dist.all_reduce_sum([loss_sum], device)
    return StepResult(loss=loss_total / max(total_tokens, 1.0), tokens=int(total_tokens))


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
