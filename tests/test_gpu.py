"""CUDA paths: bf16 and fp16 (with DeepSpeed's dynamic loss scaling) over NCCL. Skipped without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, losses, run_jobs, tiny_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_runs(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu")
    out = work / "runs"
    ranks = min(2, torch.cuda.device_count())
    jobs = [{"name": f"{p}_z{z}", "overrides": tiny_overrides(corpus, out, f"{p}_z{z}", f"precision={p}",
                                                             f"deepspeed.zero_stage={z}", "train.max_steps=20")}
            for p in ("bf16", "fp16") for z in (0, 2, 3)]
    jobs += [{"name": f"mixed_z{z}", "overrides": tiny_overrides(corpus, out, f"mixed_z{z}", "precision=bf16-mixed",
                                                                f"deepspeed.zero_stage={z}", "train.max_steps=20")}
             for z in (0, 2)]
    # A loss scale of 2**32 overflows at once: DeepSpeed skips steps while it halves the scale.
    template = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    template["fp16"]["initial_scale_power"] = 32
    (work / "overflow.json").write_text(json.dumps(template))
    jobs.append({"name": "fp16_overflow", "overrides": tiny_overrides(
        corpus, out, "fp16_overflow", "precision=fp16", f"deepspeed.config={work / 'overflow.json'}",
        "deepspeed.zero_stage=2", "train.max_steps=20", "train.on_nonfinite=stop")})
    return run_jobs(jobs, ranks=ranks, work=work), out


def test_fp16_overflow_skips_are_routine(gpu_runs):
    results, out = gpu_runs
    summary = results["fp16_overflow"][0]
    assert summary["stop_reason"] == "max_steps" and summary["last_step"] == 20  # on_nonfinite=stop did not fire
    logged = [json.loads(x) for x in (out / "fp16_overflow" / "metrics.jsonl").read_text().splitlines()]
    skips = [r["train/overflow_skips"] for r in logged if "train/overflow_skips" in r]
    assert skips and skips == list(range(1, len(skips) + 1))
    assert not any("train/skipped" in r for r in logged)


@pytest.mark.parametrize("precision,dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
@pytest.mark.parametrize("zero", [0, 2, 3])
def test_half_precision_trains_on_cuda(gpu_runs, precision, dtype, zero):
    results, out = gpu_runs
    summary = results[f"{precision}_z{zero}"][0]
    facts = summary["engine"]
    assert facts["zero_stage"] == zero and facts["param_dtype"] == dtype
    assert facts[precision] is True
    steps = losses(summary)
    assert len(steps) >= 15 and steps[-1] < steps[0]
    if precision == "fp16":
        logged = [json.loads(x) for x in (out / f"fp16_z{zero}" / "metrics.jsonl").read_text().splitlines()]
        assert any("train/loss_scale" in r for r in logged)


@pytest.mark.parametrize("zero", [0, 2])
def test_bf16_mixed_trains_on_cuda_with_fused_adamw(gpu_runs, zero):
    results, _ = gpu_runs
    summary = results[f"mixed_z{zero}"][0]
    facts = summary["engine"]
    assert facts["zero_stage"] == zero and facts["param_dtype"] == "float32" and facts["autocast"] == "bfloat16"
    assert facts["fused_optimizer"]  # torch's fused AdamW: a few multi-tensor kernels per step
    if zero == 0:
        assert facts["optimizer"] == "GuardedAdamW"
    steps = losses(summary)
    assert len(steps) >= 15 and steps[-1] < steps[0]
