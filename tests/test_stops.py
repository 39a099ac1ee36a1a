"""Clean stops from outside the loop: a wall-clock budget and SIGUSR1/SIGTERM. Each saves a
checkpoint the next launch resumes from, and the resumed run continues as if never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import PY, REPO, child_env, losses, run_jobs, tiny_overrides


def test_time_budget_stops_cleanly_and_resume_continues_exactly(corpus, tmp_path):
    out = tmp_path / "runs"
    common = ("train.max_steps=6", "optim.decay_steps=6", "train.save_interval=100")
    straight = run_jobs([{"name": "straight", "overrides": tiny_overrides(corpus, out, "straight", *common)}],
                        ranks=2, work=tmp_path / "a")["straight"][0]
    # A zero budget is spent after the first step: both ranks must agree, save and stop.
    first = run_jobs([{"name": "budget", "overrides": tiny_overrides(corpus, out, "budget", *common,
                                                                       "train.max_minutes=0")}],
                     ranks=2, work=tmp_path / "b")["budget"]
    assert [s["stop_reason"] for s in first] == ["time_budget", "time_budget"]
    assert first[0]["last_step"] == 1 and (out / "budget" / "checkpoints" / "latest").read_text() == "step0000001"
    second = run_jobs([{"name": "budget", "overrides": tiny_overrides(corpus, out, "budget", *common)}],
                      ranks=2, work=tmp_path / "c")["budget"][0]
    assert second["first_step"] == 2 and second["stop_reason"] == "max_steps"
    combined = losses(first[0]) + losses(second)
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(combined, losses(straight), strict=True))


def test_sigusr1_saves_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "runs"
    args = ["--config", "configs/tiny.yaml",
            *tiny_overrides(corpus, out, "sig", "train.max_steps=100000", "train.save_interval=100000")]
    proc = subprocess.Popen([PY, str(REPO / "launch/train.py"), *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "signal:SIGUSR1" in output
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "train/loss" in x]
    latest = (out / "sig" / "checkpoints" / "latest").read_text()
    assert latest == f"step{max(steps):07d}" and 3 <= max(steps) < 100000
