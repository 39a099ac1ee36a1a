"""Learning-rate schedules: warmup, each decay's shape and end value, and the LambdaLR wrapper."""

from __future__ import annotations

import io
import math

import pytest
import torch

from dsgpt.config import OptimSection
from dsgpt.train.schedules import LRSchedule, build_scheduler

KINDS = ["cosine", "linear", "step", "exponential", "constant"]
PEAK, FLOOR, WARMUP, MAX_STEPS = 1e-3, 1e-4, 4, 24   # decay = MAX_STEPS - WARMUP = 20 steps
END = WARMUP + (MAX_STEPS - WARMUP)                   # first step at the end of decay


def optim(kind: str, **kw) -> OptimSection:
    args = dict(schedule=kind, lr=PEAK, min_lr=FLOOR, warmup_steps=WARMUP, step_size=5, step_gamma=0.5)
    args.update(kw)
    return OptimSection(**args)


def schedule(kind: str, max_steps: int = MAX_STEPS, **kw) -> LRSchedule:
    return LRSchedule(optim(kind, **kw), max_steps)


@pytest.mark.parametrize("kind", KINDS)
def test_linear_warmup(kind):
    s = schedule(kind)
    assert s.lr(0) == pytest.approx(PEAK / WARMUP, rel=1e-12)
    for k in range(WARMUP):
        assert s.lr(k) == pytest.approx(PEAK * (k + 1) / WARMUP, rel=1e-12)
    assert s.lr(WARMUP - 1) == PEAK   # peak at the last warmup step
    assert s.lr(WARMUP) == PEAK       # and decay starts from the peak


@pytest.mark.parametrize("kind", KINDS)
def test_no_warmup_starts_at_the_peak(kind):
    s = schedule(kind, warmup_steps=0)
    assert s.lr(0) == PEAK
    assert s.decay == MAX_STEPS


@pytest.mark.parametrize("kind", KINDS)
def test_monotone_non_increasing_after_warmup(kind):
    s = schedule(kind)
    values = [s.lr(k) for k in range(WARMUP - 1, 200)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert min(values) >= FLOOR
    if kind != "constant":
        assert values[-1] < PEAK


@pytest.mark.parametrize("kind", ["cosine", "linear", "exponential"])
@pytest.mark.parametrize("peak, floor", [(1e-3, 1e-4), (6e-4, 6e-5), (3e-4, 3e-5), (0.1, 0.01), (3e-3, 3e-4)])
def test_decay_reaches_min_lr_exactly_and_stays(kind, peak, floor):
    s = schedule(kind, lr=peak, min_lr=floor)
    assert s.lr(END - 1) > floor
    for k in (END, END + 1, END + 50, 10**6):
        assert s.lr(k) == floor


def test_cosine_shape():
    s = schedule("cosine")
    mid = WARMUP + 10   # half-way through the 20 decay steps
    assert s.lr(mid) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-12)
    quarter = WARMUP + 5
    assert s.lr(quarter) == pytest.approx(FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi / 4)), rel=1e-12)


def test_linear_shape():
    s = schedule("linear")
    for t in range(21):
        assert s.lr(WARMUP + t) == pytest.approx(PEAK - (PEAK - FLOOR) * t / 20, rel=1e-12)


def test_exponential_reaching_min_lr():
    s = schedule("exponential")
    ratio = (FLOOR / PEAK) ** (1 / 20)
    for t in range(20):
        assert s.lr(WARMUP + t) == pytest.approx(PEAK * ratio ** t, rel=1e-12)
        assert s.lr(WARMUP + t + 1) / s.lr(WARMUP + t) == pytest.approx(ratio, rel=1e-9)


def test_exponential_with_gamma_is_floored_at_min_lr():
    s = schedule("exponential", exp_gamma=0.5)
    assert [s.lr(WARMUP + t) for t in range(6)] == pytest.approx(
        [1e-3, 5e-4, 2.5e-4, 1.25e-4, 1e-4, 1e-4], rel=1e-12)
    assert s.lr(10**4) == FLOOR


def test_step_multiplies_every_step_size_floored_at_min_lr():
    s = schedule("step")   # step_size 5, step_gamma 0.5
    expected = [1e-3] * 5 + [5e-4] * 5 + [2.5e-4] * 5 + [1.25e-4] * 5 + [1e-4] * 5
    assert [s.lr(WARMUP + t) for t in range(25)] == pytest.approx(expected, rel=1e-12)
    assert s.lr(10**4) == FLOOR


def test_constant_stays_at_the_peak():
    s = schedule("constant")
    assert [s.lr(k) for k in range(WARMUP, 500)] == [PEAK] * (500 - WARMUP)


def test_explicit_decay_steps():
    s = schedule("cosine", decay_steps=10, max_steps=1000)
    assert s.lr(WARMUP + 5) == pytest.approx((PEAK + FLOOR) / 2, rel=1e-12)
    assert s.lr(WARMUP + 10) == FLOOR
    assert s.lr(500) == FLOOR


def test_min_lr_above_lr_is_capped_at_lr():
    s = schedule("cosine", min_lr=1.0)
    assert [s.lr(k) for k in range(WARMUP, 40)] == [PEAK] * (40 - WARMUP)


def test_multiplier_is_lr_over_peak():
    s = schedule("cosine")
    for k in range(30):
        assert s(k) == pytest.approx(s.lr(k) / PEAK, rel=1e-15)


def make_optimizer(lr: float = PEAK):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def train_step(model, opt, sched):
    opt.zero_grad()
    model(torch.ones(3, 4)).pow(2).sum().backward()
    opt.step()
    sched.step()


@pytest.mark.parametrize("kind", KINDS)
def test_lambdalr_drives_the_optimizer_lr(kind):
    ref = schedule(kind)
    model, opt = make_optimizer()
    sched = build_scheduler(opt, optim(kind), MAX_STEPS)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    seen = []
    for step in range(30):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(ref.lr(step), rel=1e-12), step
        assert sched.get_last_lr()[0] == lr
        seen.append(lr)
        train_step(model, opt, sched)
    assert seen[0] == pytest.approx(PEAK / WARMUP)
    assert max(seen) == pytest.approx(PEAK)


@pytest.mark.parametrize("kind", KINDS)
def test_scheduler_state_dict_resumes_exactly(kind):
    # The uninterrupted run.
    model, opt = make_optimizer()
    sched = build_scheduler(opt, optim(kind), MAX_STEPS)
    straight = []
    for _ in range(30):
        straight.append(opt.param_groups[0]["lr"])
        train_step(model, opt, sched)

    # Stop after 12 steps, save as a checkpoint would (through torch.save), resume in fresh objects.
    model, opt = make_optimizer()
    sched = build_scheduler(opt, optim(kind), MAX_STEPS)
    for _ in range(12):
        train_step(model, opt, sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    model2, opt2 = make_optimizer()
    sched2 = build_scheduler(opt2, optim(kind), MAX_STEPS)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.last_epoch == 12
    resumed = []
    for _ in range(18):
        resumed.append(opt2.param_groups[0]["lr"])
        train_step(model2, opt2, sched2)
    assert resumed == straight[12:]   # bitwise, not approximately
