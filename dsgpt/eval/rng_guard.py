"""Global RNG states kept across a block: evaluating inside a training run must not change the draws
that follow (dropout masks, sampling), so a run that evaluates trains exactly as one that does not."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def keep_rng():
    """Python, numpy and torch (CPU and every CUDA device) RNG states as they were before the block."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        py, npy, cpu, cuda = states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
