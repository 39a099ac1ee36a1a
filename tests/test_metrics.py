"""Peak-FLOP/s lookup and measurement, and the metrics logger's jsonl and TensorBoard output."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsgpt.metrics import GPU_PEAK_FLOPS, MetricsLogger, gpu_peak_flops, measure_cpu_peak_flops


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 80GB HBM3", "tf32", 495e12),
    ("NVIDIA H100 80GB HBM3", "fp32", 67e12),   # TF32 off: plain fp32, not the TF32 figure
    ("NVIDIA H100 PCIe", "bf16", 756e12),       # not the SXM form
    ("NVIDIA H100 PCIe", "tf32", 378e12),
    ("NVIDIA H100 PCIe", "fp32", 51e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA H200 NVL", "bf16", 835e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "tf32", 156e12),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5e12),
    ("NVIDIA A10G", "fp16", 125e12),
    ("NVIDIA L40S", "bf16", 362e12),        # not L4
    ("NVIDIA L40S", "fp32", 91.6e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("Tesla V100S-PCIE-32GB", "fp32", 15.7e12),
    ("Tesla T4", "fp16", 65e12),
])
def test_gpu_peak_flops_picks_the_right_row(name, precision, expected):
    assert gpu_peak_flops(name, precision) == expected


@pytest.mark.parametrize("name", ["AMD Instinct MI300X", "Intel(R) Data Center GPU Max 1550", "NVIDIA A10",
                                  "NVIDIA L40", "NVIDIA GeForce RTX 4090", ""])
def test_gpu_peak_flops_unknown_device_is_none(name):
    # "NVIDIA L40" used to be read as an L4 (a substring match), a third off its real peak.
    assert gpu_peak_flops(name, "bf16") is None


def test_gpu_peak_flops_no_bf16_on_older_parts():
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert gpu_peak_flops("Tesla T4", "bf16") is None
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "tf32") is None


def test_math_mode_follows_the_tf32_switch():
    from dsgpt.metrics import math_mode
    assert math_mode("fp32", False) == "fp32" and math_mode("fp32", True) == "tf32"
    assert math_mode("bf16", True) == "bf16"  # bf16 matmuls use the bf16 column either way
    assert math_mode("bf16-mixed", False) == "bf16"  # autocast: the matmuls run in bf16


def test_every_row_matches_its_own_name():
    for key, row in GPU_PEAK_FLOPS.items():
        assert gpu_peak_flops(f"NVIDIA {key}", "fp32") == row["fp32"], key


def test_measured_cpu_peak_is_plausible():
    for precision in ("fp32", "bf16"):  # bf16 emulated or on matrix units: either way a finite rate
        flops = measure_cpu_peak_flops(precision, seconds=0.05)
        assert isinstance(flops, float)
        assert 1e8 < flops < 1e14


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "exp"   # created by the logger
    log = MetricsLogger(run, enabled=True)
    log.log(0, {"train/loss": 2.5, "train/lr": 1e-3, "train/mfu": None})
    log.log(1, {"train/loss": float("nan"), "train/lr": 5e-4, "train/grad_norm": torch.tensor(0.75)})
    log.log(2, {"train/loss": float("inf"), "val/loss": 1.25})
    log.close()

    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(isinstance(r["time"], float) for r in records)
    assert {k: v for k, v in records[0].items() if k != "time"} == {"step": 0, "train/loss": 2.5, "train/lr": 1e-3}
    assert records[1]["train/loss"] == "nan" and records[1]["train/grad_norm"] == 0.75
    assert records[2]["train/loss"] == "inf" and records[2]["val/loss"] == 1.25
    assert "train/mfu" not in records[0]   # None means "not measured", not a value

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/grad_norm", "val/loss"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert loss[0].value == 2.5 and math.isnan(loss[1].value) and loss[2].value == math.inf
    lr = acc.Scalars("train/lr")
    assert [e.step for e in lr] == [0, 1]
    assert [e.value for e in lr] == pytest.approx([1e-3, 5e-4], rel=1e-6)   # stored as float32
    assert [(e.step, e.value) for e in acc.Scalars("train/grad_norm")] == [(1, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(2, 1.25)]


def test_logger_appends_on_resume(tmp_path):
    first = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    first.log(0, {"train/loss": 3.0})
    first.close()
    second = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    second.log(1, {"train/loss": 2.0})
    second.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in records] == [(0, 3.0), (1, 2.0)]
    assert not (tmp_path / "tb").exists()


def test_jsonl_line_is_on_disk_before_close(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    log.log(5, {"train/loss": 1.5})
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["train/loss"] == 1.5   # line-buffered
    log.close()


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    log = MetricsLogger(run, enabled=False)
    log.log(0, {"train/loss": 1.0})
    log.text(0, "samples", "hello")
    log.hparams({"lr": 1e-3}, {"val/loss": 1.0}, step=5)
    log.flush()
    log.close()
    assert not run.exists()
    assert list(tmp_path.iterdir()) == []


def test_hparams_land_at_the_last_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = MetricsLogger(tmp_path / "run", enabled=True)
    log.log(7, {"train/loss": 2.0})
    log.hparams({"optim/lr": 1e-3, "precision": "fp32"}, {"hparam/val_loss": 1.5}, step=7)
    log.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("hparam/val_loss")
    assert [(e.step, e.value) for e in events] == [(7, 1.5)]  # not a one-point chart at step 0
