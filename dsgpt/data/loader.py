"""The training data loader: each step's micro-batches for this rank, prepared ahead of the step.

A background thread reads the next `ahead` steps' windows while the current step runs (on a GPU
into pinned memory, so the copies to the device are really asynchronous). What a step gets stays a
pure function of (seed, step): the thread calls the same `train_micro_batches(step, ...)` the loop
would, only earlier, so a resumed run and a run on another number of ranks see the same global
batches.

A source is anything with `train_micro_batches(step, rank, world, micro_batch_size, grad_accum_steps)`
and `masks_labels` (True when some labels are -100: the step then counts its target tokens, which
costs a collective; pretraining windows count every token, so the count is known).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class StepBatch:
    step: int
    micro: list[tuple[torch.Tensor, ...]]  # (x, y) or packed SFT (x, y, pos) per micro-step, on the device
    tokens: Optional[int]  # target tokens of the whole step on all ranks; None: labels are masked, count them


def step_batch(micro: list[tuple[torch.Tensor, torch.Tensor]], step: int = 0) -> StepBatch:
    """A step of micro-batches made by hand (tests, benchmarks); its tokens are counted."""
    return StepBatch(step=step, micro=list(micro), tokens=None)


class StepLoader:
    """Steps `first`..`last` of a source for one rank; `get(step)` in order, `close()` when done."""

    def __init__(self, source, rank: int, world: int, micro_batch_size: int, grad_accum_steps: int,
                 first: int, last: int, device, ahead: int = 2):
        self.source, self.rank, self.world = source, rank, world
        self.micro, self.gas = micro_batch_size, grad_accum_steps
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.next_step, self.last = first, last
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(first,), name="dsgpt-loader", daemon=True)
        self._thread.start()

    def _fill(self, first: int) -> None:
        try:
            for step in range(first, self.last + 1):
                micro = self.source.train_micro_batches(step - 1, self.rank, self.world, self.micro, self.gas)
                if self.pin:
                    micro = [tuple(t.pin_memory() for t in m) for m in micro]
                if not self._put((step, micro)):
                    return
        except BaseException as err:  # the loop re-raises it at its next get()
            self._put((None, err))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int) -> StepBatch:
        if step != self.next_step:
            raise RuntimeError(f"the loader is at step {self.next_step}, asked for step {step}")
        got, micro = self._queue.get()
        if got is None:
            raise micro
        self.next_step += 1
        on_device = [tuple(t.to(self.device, non_blocking=True) for t in m) for m in micro]
        masked = bool(getattr(self.source, "masks_labels", True))
        tokens = None if masked else sum(m[1].numel() for m in micro) * self.world
        return StepBatch(step=step, micro=on_device, tokens=tokens)

    def close(self) -> None:
        """Stop the thread (it may be waiting to hand over a batch) and wait for it."""
        self._stop.set()
        while True:  # make room, so a put in progress returns
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
