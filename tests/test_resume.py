"""Exact resume: 20 steps straight equal 10 steps + a new process that resumes to 20, bit for bit,
under ZeRO 1 and 3 (and bf16-mixed under ZeRO 0: autocast, dsgpt's own AdamW) with dropout on,
gradient accumulation and a warmup spanning the resume."""

from __future__ import annotations

import json

import pytest

from conftest import losses, run_jobs, tiny_overrides

CASES = {"z1": (1, "fp32"), "z3": (3, "fp32"), "mixed_z0": (0, "bf16-mixed")}  # name: (ZeRO stage, precision)


def overrides(corpus, out, name, case, max_steps):
    zero, precision = CASES[case]
    return tiny_overrides(
        corpus, out, name, f"deepspeed.zero_stage={zero}", f"precision={precision}", f"train.max_steps={max_steps}",
        "model.dropout=0.1", "train.grad_accum_steps=2", "train.micro_batch_size=2",
        "optim.warmup_steps=15", "optim.decay_steps=30", "train.save_interval=10", "train.eval_interval=5")


@pytest.fixture(scope="module")
def resumed(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    out = work / "runs"
    a, b = {}, {}
    # Every run in a process of its own: bitwise equality is a property of fresh processes (BLAS
    # kernels may round differently once the allocator hands out differently aligned buffers).
    for c in CASES:
        a.update(run_jobs([{"name": f"straight_{c}", "overrides": overrides(corpus, out, f"straight_{c}", c, 20)}],
                          ranks=2, work=work / f"straight_{c}"))
        a.update(run_jobs([{"name": f"split_{c}", "overrides": overrides(corpus, out, f"split_{c}", c, 10)}],
                          ranks=2, work=work / f"first_{c}"))
        b.update(run_jobs([{"name": f"split_{c}", "overrides": overrides(corpus, out, f"split_{c}", c, 20)}],
                          ranks=2, work=work / f"second_{c}"))
    return a, b, out


@pytest.mark.parametrize("case", CASES)
def test_resumed_run_is_the_run_that_would_have_happened(resumed, case):
    a, b, out = resumed
    straight = a[f"straight_{case}"][0]
    first, second = a[f"split_{case}"][0], b[f"split_{case}"][0]
    assert first["first_step"] == 1 and first["last_step"] == 10
    assert second["first_step"] == 11 and second["last_step"] == 20
    assert second["engine"]["zero_stage"] == CASES[case][0]
    assert (second["engine"]["autocast"] == "bfloat16") is (CASES[case][1] == "bf16-mixed")
    assert losses(first) + losses(second) == losses(straight)  # exact, not approximately
    assert second["val_loss"] == straight["val_loss"]
    # The resumed launch appended to the same metrics file; each step logged once.
    steps = [json.loads(line)["step"] for line in (out / f"split_{case}" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == list(range(1, 21))
