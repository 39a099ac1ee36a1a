"""Learning-rate schedules: linear warmup, then cosine / linear / step / exponential / constant.

Each schedule is a closed form of the step, wrapped in torch's LambdaLR so DeepSpeed steps it and
saves it like any torch scheduler. A closed form (rather than chaining torch's recursive
schedulers with SequentialLR) gives the same value at step k whether or not the run was resumed,
and lets a test check every schedule point by point.
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from dsgpt.config import OptimSection


class LRSchedule:
    """lr(step) for optimizer steps 0, 1, 2, ... as a multiple of the peak lr (LambdaLR's contract).

    A plain object (not a closure) so LambdaLR's state_dict can save and restore it.
    """

    def __init__(self, optim: OptimSection, max_steps: int):
        self.kind = optim.schedule
        self.peak = optim.lr
        self.floor = min(optim.min_lr, optim.lr)
        self.warmup = optim.warmup_steps
        self.decay = optim.decay_steps or max(1, max_steps - optim.warmup_steps)
        self.step_size = optim.step_size
        self.step_gamma = optim.step_gamma
        self.exp_gamma = optim.exp_gamma

    def lr(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.peak
        t = step - self.warmup  # steps since the end of warmup
        if self.kind == "step":
            return max(self.floor, self.peak * self.step_gamma ** (t // self.step_size))
        if self.kind == "exponential":
            gamma = self.exp_gamma
            if gamma is None:  # reach min_lr exactly at the end of decay
                if t >= self.decay:
                    return self.floor  # peak * gamma**decay rounds to a hair above min_lr
                gamma = (self.floor / self.peak) ** (1.0 / self.decay) if self.floor > 0 else 0.0
            return max(self.floor, self.peak * gamma ** t)
        progress = min(1.0, t / self.decay)
        if self.kind == "linear":
            # Written from the floor so progress 1 gives min_lr exactly (peak + (floor - peak) can
            # land an ulp off).
            return self.floor + (self.peak - self.floor) * (1.0 - progress)
        # cosine
        return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.peak if self.peak else 0.0


def build_scheduler(optimizer, optim: OptimSection, max_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, LRSchedule(optim, max_steps))
