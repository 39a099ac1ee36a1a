"""What a run leaves behind: TensorBoard events that agree with metrics.jsonl, the resolved
configs, provenance, pruned checkpoints with `latest` and `best`."""

from __future__ import annotations

import json

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_jobs, tiny_overrides

TAGS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "val/loss", "val/ppl")


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("outputs")
    out = work / "runs"
    overrides = tiny_overrides(corpus, out, "outputs", "train.max_steps=12", "train.eval_interval=4",
                               "train.save_interval=4", "train.keep_last=1", "train.sample_interval=6",
                               "train.sample_tokens=8", "deepspeed.zero_stage=2")
    # Early stopping: no evaluation can beat the first by 10 nats, so patience 2 runs out at the third.
    early = tiny_overrides(corpus, out, "early", "train.max_steps=40", "train.eval_interval=3",
                           "train.early_stop_patience=2", "train.early_stop_min_delta=10")
    results = run_jobs([{"name": "outputs", "overrides": overrides}, {"name": "early", "overrides": early}],
                       ranks=2, work=work)
    return out / "outputs", results["outputs"], results["early"]


def test_tensorboard_events_equal_metrics_jsonl(run):
    run_dir, *_ = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in TAGS:
        assert tag in scalars, (tag, scalars)
        from_tb = {e.step: e.value for e in acc.Scalars(tag)}
        from_jsonl = {r["step"]: r[tag] for r in records if tag in r}
        assert from_tb.keys() == from_jsonl.keys() and from_tb, tag
        for step, value in from_jsonl.items():
            assert from_tb[step] == pytest.approx(value, rel=1e-6), (tag, step)  # TB stores float32
    assert sorted({r["step"] for r in records if "val/loss" in r}) == [4, 8, 12]
    assert any(t.startswith("mem/") for t in scalars)
    assert 0 < records[-1].get("train/mfu", records[-2].get("train/mfu", 0)) < 1


def test_text_samples_are_logged(run):
    run_dir, *_ = run
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "samples/val_prompt/text_summary" in acc.Tags()["tensors"]
    steps = [e.step for e in acc.Tensors("samples/val_prompt/text_summary")]
    assert steps == [6, 12]


def test_run_dir_records_config_and_provenance(run):
    run_dir, summaries, _ = run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 12 and cfg["deepspeed"]["zero_stage"] == 2
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8
    assert summaries[0]["engine"]["zero_stage"] == 2
    prov = [json.loads(line) for line in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert len(prov) == 1
    assert prov[0]["packages"]["deepspeed"] and prov[0]["packages"]["torch"]
    assert prov[0]["world_size"] == 2 and len(prov[0]["data_sha256"]) == 64


def test_checkpoints_pruned_to_keep_last_plus_best(run):
    run_dir, summaries, _ = run
    ckpt = run_dir / "checkpoints"
    latest = (ckpt / "latest").read_text()
    best = (ckpt / "best").read_text()
    assert latest == "step0000012"
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert tags == sorted({latest, best})
    state = json.loads((ckpt / best / "dsgpt_state.json").read_text())
    assert state["val_loss"] == state["best_val_loss"] == summaries[0]["best_val_loss"]


def test_early_stopping_stops_when_patience_runs_out(run):
    _, _, early = run
    for summary in early:
        assert summary["stop_reason"] == "early_stop" and summary["last_step"] == 9
    run_dir = early[0]["run_dir"]
    from pathlib import Path
    assert (Path(run_dir) / "checkpoints" / "latest").read_text() == "step0000009"
    # The first evaluation was the best: saved then (train.save_best), kept through pruning.
    assert (Path(run_dir) / "checkpoints" / "best").read_text() == "step0000003"
    assert (Path(run_dir) / "checkpoints" / "step0000003").is_dir()
