"""A run driven to NaN (an absurd learning rate) skips or stops as configured, all ranks agree,
and `latest` still names a checkpoint with finite weights."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_jobs, tiny_overrides
from dsgpt.runs import load_model, read_pointer


@pytest.fixture(scope="module")
def blown_up(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("nonfinite")
    out = work / "runs"
    common = ("optim.lr=1e30", "optim.warmup_steps=0", "optim.schedule=constant", "train.max_steps=8",
              "train.save_interval=1", "train.eval_interval=100", "train.max_nonfinite_steps=3")
    jobs = [
        # ZeRO 1: DeepSpeed's optimizer detects the non-finite gradient norm and skips the update.
        {"name": "skip_z1", "overrides": tiny_overrides(corpus, out, "skip_z1", *common, "deepspeed.zero_stage=1",
                                                        "train.on_nonfinite=skip")},
        # ZeRO 0 in fp32: dsgpt's own guarded AdamW does the same.
        {"name": "stop_z0", "overrides": tiny_overrides(corpus, out, "stop_z0", *common, "deepspeed.zero_stage=0",
                                                        "train.on_nonfinite=stop")},
    ]
    return run_jobs(jobs, ranks=2, work=work), out


def check_latest_is_finite(run_dir):
    tag = read_pointer(run_dir / "checkpoints")
    model, _, loaded = load_model(run_dir)
    assert loaded == tag
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return int(tag.removeprefix("step"))


def test_skip_mode_skips_then_gives_up(blown_up):
    results, out = blown_up
    for summary in results["skip_z1"]:  # both ranks tell the same story
        assert summary["stop_reason"] == "nonfinite"
        assert list(summary["losses"]) == ["1"]  # only step 1 had a finite loss
        assert summary["last_step"] == 5  # steps 2-4 skipped (3 allowed in a row), step 5 gave up
    logged = [json.loads(x) for x in (out / "skip_z1" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if e.get("train/skipped")] == [2, 3, 4, 5]
    # Skipped steps left the weights alone, so the checkpoints written while skipping hold
    # the finite weights of step 1; the last one written is `latest`.
    assert check_latest_is_finite(out / "skip_z1") == 4


def test_stop_mode_stops_at_the_first_nonfinite_step(blown_up):
    results, out = blown_up
    for summary in results["stop_z0"]:
        assert summary["stop_reason"] == "nonfinite" and summary["last_step"] == 2
        assert summary["engine"]["optimizer"] == "GuardedAdamW"
    assert check_latest_is_finite(out / "stop_z0") == 1
