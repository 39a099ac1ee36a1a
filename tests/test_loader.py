"""The prefetching step loader: the same batches as the data's own function of (seed, step), in
order, from any first step; its thread ends on close (also when it was waiting to hand over a
batch) and its errors reach the loop. The throughput meter averages over its window."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dsgpt.data.dataset import TokenData
from dsgpt.data.loader import StepLoader, step_batch
from dsgpt.metrics import Throughput


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dsgpt-loader"]


@pytest.fixture(scope="module")
def data(corpus):
    return TokenData(corpus, block_size=16, seed=3)


@pytest.mark.parametrize("rank,world,first", [(0, 1, 1), (1, 2, 5)])
def test_the_same_batches_as_the_data_gives(data, rank, world, first):
    with StepLoader(data, rank, world, micro_batch_size=2, grad_accum_steps=3, first=first, last=first + 6,
                    device="cpu", ahead=2) as loader:
        for step in range(first, first + 7):
            batch = loader.get(step)
            want = data.train_micro_batches(step - 1, rank, world, 2, 3)
            assert batch.step == step and len(batch.micro) == 3
            for (x, y), (wx, wy) in zip(batch.micro, want):
                assert torch.equal(x, wx) and torch.equal(y, wy)
            assert batch.tokens == 2 * 3 * 16 * world  # every label counts: no collective needed
    assert not loader_threads()


def test_steps_come_in_order(data):
    with StepLoader(data, 0, 1, 1, 1, first=1, last=5, device="cpu") as loader:
        loader.get(1)
        with pytest.raises(RuntimeError, match="at step 2, asked for step 3"):
            loader.get(3)


def test_close_ends_a_thread_that_waits_to_hand_over(data):
    loader = StepLoader(data, 0, 1, 1, 1, first=1, last=1000, device="cpu", ahead=1)
    time.sleep(0.3)  # the queue is full and the thread waits
    assert loader_threads()
    loader.close()
    assert not loader_threads()


class Broken:
    masks_labels = True

    def train_micro_batches(self, step, *args):
        if step == 2:
            raise ValueError("shard 7 is unreadable")
        return [(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -100))]


def test_a_source_error_reaches_the_loop(data):
    with StepLoader(Broken(), 0, 1, 1, 1, first=1, last=5, device="cpu") as loader:
        assert loader.get(1).tokens is None and loader.get(2).tokens is None  # masked labels: count them
        with pytest.raises(ValueError, match="shard 7"):
            loader.get(3)
    assert not loader_threads()


def test_a_step_made_by_hand_counts_its_tokens():
    assert step_batch([(torch.zeros(1, 2), torch.zeros(1, 2))]).tokens is None


def test_throughput_averages_over_the_window():
    meter = Throughput()
    meter.add(100, 1.0)
    meter.add(300, 1.0)
    assert meter.window() == (200.0, 1.0)
    meter.add(50, 0.5)
    assert meter.window() == (100.0, 0.5)  # a new window
