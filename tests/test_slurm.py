"""`sbatch slurm/train.sbatch` on a real 2-node Slurm cluster (tests/slurm_cluster.py): ranks from
SLURM_*, preemption with checkpoint + requeue + exact continuation, job-array sweeps, and
`slurm/sweep.sbatch SWEEP.yaml`: array tasks as workers on one optuna study (the journal file in the
sweep dir), each claiming trials and running them with srun until the sweep has them all."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from conftest import PY, REPO, child_env, tiny_overrides
from dsgpt.train.pruning import read_metrics
from tests.slurm_cluster import LocalSlurm, ensure_packages

pytestmark = pytest.mark.timeout(600)

# The script's defaults are for GPU nodes; the test partition has 2 CPU slots per node.
CPU_NODES = ["--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_packages()  # an error, not a skip, when CI=true on root Debian
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def job_env() -> dict:
    env = child_env(DSGPT_PYTHON=PY)
    return {k: env[k] for k in ("PYTHONPATH", "DSGPT_CACHE", "DSGPT_PYTHON", "DS_ACCELERATOR") if k in env}


def submit(slurm: LocalSlurm, script: str, args: list[str], script_args: list[str]) -> str:
    return slurm.sbatch(args, str(REPO / script), script_args=script_args, cwd=REPO, env=job_env())


def finished(slurm: LocalSlurm, job: str, log: Path, timeout: float = 240) -> str:
    state = slurm.wait(job, timeout)
    text = log.read_text() if log.exists() else "(no log)"
    assert state == "COMPLETED", f"job {job} ended {state}\n--- log ---\n{text[-6000:]}\n{slurm.log_tail()}"
    return text


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_nodes_train_one_rank_each(slurm, corpus, tmp_path):
    log = tmp_path / "train.log"
    overrides = tiny_overrides(corpus, tmp_path / "runs", "two_nodes", "train.max_steps=8")
    job = submit(slurm, "slurm/train.sbatch", ["-N", "2", *CPU_NODES, f"--output={log}"],
                 ["configs/tiny.yaml", *overrides])
    text = finished(slurm, job, log)
    ranks = re.findall(r"\[dsgpt\] rank (\d)/(\d) local_rank (\d) node (\d) .* launcher (\w+)", text)
    assert sorted(ranks) == [("0", "2", "0", "0", "slurm"), ("1", "2", "0", "1", "slurm")], text[-3000:]
    run_dir = tmp_path / "runs" / "two_nodes"
    assert sorted(step_losses(run_dir)) == list(range(1, 9))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step0000008"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / f"slurm-{job}.log").resolve() == log.resolve()  # the log, linked into the run dir
    prov = json.loads((run_dir / "provenance.jsonl").read_text().splitlines()[0])
    assert prov["slurm"]["SLURM_JOB_ID"] == job and prov["world_size"] == 2


def test_preempted_job_checkpoints_requeues_and_continues_exactly(slurm, corpus, tmp_path):
    steps = 60
    common = ("train.max_steps=%d" % steps, "train.save_interval=1000", "train.eval_interval=1000")
    straight_log, preempt_log = tmp_path / "straight.log", tmp_path / "preempt.log"
    straight = submit(slurm, "slurm/train.sbatch", ["-N", "2", *CPU_NODES, f"--output={straight_log}"],
                      ["configs/tiny.yaml", *tiny_overrides(corpus, tmp_path / "runs", "straight", *common)])
    finished(slurm, straight, straight_log)

    run_dir = tmp_path / "runs" / "preempt"
    job = submit(slurm, "slurm/train.sbatch", ["-N", "2", *CPU_NODES, f"--output={preempt_log}"],
                 ["configs/tiny.yaml", *tiny_overrides(corpus, tmp_path / "runs", "preempt", *common)])
    deadline = time.time() + 180
    while not ((run_dir / "metrics.jsonl").exists() and len(step_losses(run_dir)) >= 5):
        assert time.time() < deadline, f"no progress\n{preempt_log.read_text() if preempt_log.exists() else ''}"
        time.sleep(0.2)
    slurm.scancel("--signal=USR1", "--full", job)
    slurm.release(job, timeout=120)  # requeued by the script: make it eligible now
    text = finished(slurm, job, preempt_log)

    assert "requeueing job" in text and re.search(r"start 1 on", text), text[-4000:]
    saved = int(re.search(r"stopped at step (\d+) \(signal:SIGUSR1\)", text).group(1))
    assert 5 <= saved < steps
    assert text.count("[dsgpt] rank 0/2") == 2  # two launches
    resumed = json.loads(next(line for line in (run_dir / "provenance.jsonl").read_text().splitlines()[1:]))
    assert resumed["slurm"]["SLURM_RESTART_COUNT"] == "1"
    a, b = step_losses(tmp_path / "runs" / "straight"), step_losses(run_dir)
    assert sorted(b) == list(range(1, steps + 1))  # every step once: resumed at saved + 1
    assert b == a  # the interrupted run is the uninterrupted one, step for step


def test_sweep_array_runs_each_line(slurm, corpus, tmp_path):
    sweep = tmp_path / "lr.txt"
    base = " ".join(tiny_overrides(corpus, tmp_path / "runs", "ignored", "train.max_steps=3"))
    sweep.write_text(f"# learning rates\nconfigs/tiny.yaml {base} optim.lr=1e-3\n\n"
                     f"configs/tiny.yaml {base} optim.lr=3e-3\n")
    job = submit(slurm, "slurm/sweep.sbatch", ["--array=0-1", "-N", "1", *CPU_NODES,
                                               f"--output={tmp_path}/sweep-%a.log"], [str(sweep)])
    state = slurm.wait(job, 240)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("sweep-*.log"))
    assert state == "COMPLETED", logs[-4000:]
    for index, lr in ((0, 1e-3), (1, 3e-3)):
        run_dir = tmp_path / "runs" / f"lr-{index}"
        cfg = (run_dir / "config.yaml").read_text()
        assert f"lr: {lr}" in cfg and "name: lr-%d" % index in cfg
        assert sorted(step_losses(run_dir)) == [1, 2, 3]


def test_deepspeed_launcher_mode(slurm, corpus, tmp_path):
    log = tmp_path / "ds.log"
    overrides = tiny_overrides(corpus, tmp_path / "runs", "ds_mode", "train.max_steps=4")
    env = dict(job_env(), DSGPT_LAUNCHER="deepspeed")
    job = slurm.sbatch(["-N", "2", *CPU_NODES, f"--output={log}"], str(REPO / "slurm/train.sbatch"),
                       script_args=["configs/tiny.yaml", *overrides], cwd=REPO, env=env)
    text = finished(slurm, job, log)
    assert "--launcher slurm" in text or "srun" in text
    assert sorted(re.findall(r"\[dsgpt\] rank (\d)/2 .* node (\d)", text)) == [("0", "0"), ("1", "1")], text[-3000:]
    assert sorted(step_losses(tmp_path / "runs" / "ds_mode")) == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
def test_a_hung_or_dead_rank_ends_the_job_and_is_named(slurm, corpus, tmp_path, sig):
    import os
    import signal as signals
    log = tmp_path / "job.log"
    timeout_s = 8
    overrides = tiny_overrides(corpus, tmp_path / "runs", "hang", "train.max_steps=100000",
                               "train.save_interval=100000", "train.eval_interval=100000",
                               f"train.hang_timeout_s={timeout_s}")
    job = submit(slurm, "slurm/train.sbatch", ["-N", "2", *CPU_NODES, f"--output={log}"],
                 ["configs/tiny.yaml", *overrides])
    run_dir = tmp_path / "runs" / "hang"
    deadline = time.time() + 180
    while not ((run_dir / "metrics.jsonl").exists() and len(step_losses(run_dir)) >= 3):
        assert time.time() < deadline and slurm.state(job) in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        time.sleep(0.2)
    pid = int(re.search(r"\[dsgpt\] rank 1/2 .* pid (\d+)", log.read_text()).group(1))
    os.kill(pid, getattr(signals, sig))
    t0 = time.time()
    try:
        state = slurm.wait(job, timeout=timeout_s + 60)
    finally:
        try:
            os.kill(pid, signals.SIGKILL)  # a stopped rank must not outlive the test
        except ProcessLookupError:
            pass
    elapsed = time.time() - t0
    text = log.read_text()
    assert state == "FAILED", f"{state}\n{text[-4000:]}"
    assert elapsed < timeout_s + 30, elapsed
    assert re.search(r"rank 1 on host \S+ \(node 1", text), text[-4000:]


# ---- sweeps: array tasks as workers on one study -------------------------------------------------

def test_array_tasks_are_workers_on_one_study(slurm, corpus, tmp_path):
    base = tiny_overrides(corpus, tmp_path, "unused", "train.eval_interval=5", "optim.warmup_steps=0")
    sweep_file = tmp_path / "tpe.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "tpe", "base": "configs/tiny.yaml", "overrides": [o for o in base if not o.startswith("run.")],
        "space": {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}}, "sampler": "tpe",
        "trials": 3, "budget": {"steps": 10}, "out_dir": str(tmp_path / "runs")}))
    job = submit(slurm, "slurm/sweep.sbatch", ["--array=0-1", "-N", "1", *CPU_NODES,
                                               f"--output={tmp_path}/worker-%a.log"], [str(sweep_file)])
    state = slurm.wait(job, 300)
    logs = {p.name: p.read_text() for p in tmp_path.glob("worker-*.log")}
    assert state == "COMPLETED", "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in logs.items()) + slurm.log_tail()

    sweep_dir = tmp_path / "runs" / "sweeps" / "tpe"
    rows = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    assert [r["status"] for r in rows] == ["complete"] * 3, rows
    assert len({r["params"]["optim.lr"] for r in rows}) == 3  # the workers did not repeat each other
    tasks = set()
    for run_dir in sweep_dir.glob("runs/*-s0"):
        (prov,) = [json.loads(x) for x in (run_dir / "provenance.jsonl").read_text().splitlines()]
        tasks.add(prov["slurm"]["SLURM_ARRAY_TASK_ID"])
        assert "launcher slurm" in (run_dir / "sweep_run.log").read_text()  # the trial ran under srun
    assert tasks == {"0", "1"}, tasks  # both array tasks ran trials of the one study
    tables = [len(re.findall(r"^\d+\s+complete\s", text, re.M)) for text in logs.values()]
    assert max(tables) == 3, logs  # the worker that ended last printed the whole table


def test_a_preempted_worker_requeues_and_resumes_its_trial(slurm, corpus, tmp_path):
    steps = 60
    base = tiny_overrides(corpus, tmp_path, "unused", "train.eval_interval=20", "train.save_interval=1000")
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "grid", "base": "configs/tiny.yaml", "overrides": [o for o in base if not o.startswith("run.")],
        "space": {"optim.lr": [1.0e-3, 3.0e-3]}, "budget": {"steps": steps}, "out_dir": str(tmp_path / "runs")}))
    log = tmp_path / "worker.log"
    job = submit(slurm, "slurm/sweep.sbatch", ["--array=0-0", "-N", "1", *CPU_NODES, f"--output={log}"],
                 [str(sweep_file)])
    runs = tmp_path / "runs" / "sweeps" / "grid" / "runs"
    deadline = time.time() + 180
    while not any(len(_train_steps(d)) >= 5 for d in runs.glob("*-s0")):
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "(no log)"
        time.sleep(0.1)
    slurm.scancel("--signal=USR1", "--full", f"{job}_0")  # what Slurm sends before a time limit
    slurm.release(f"{job}_0", timeout=120)  # requeued by the script: make it eligible now
    state = slurm.wait(job, 300)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:] + slurm.log_tail()

    assert "requeueing" in text and "start 1 on" in text, text[-4000:]
    rows = json.loads((runs.parent / "sweep.json").read_text())["trials"]
    assert [r["status"] for r in rows] == ["complete"] * 2, rows
    (first,) = [d for d in runs.glob("*-s0") if "signal:SIGUSR1" in (d / "sweep_run.log").read_text()]
    saved = int(re.search(r"stopped at step (\d+) \(signal:SIGUSR1\)", (first / "sweep_run.log").read_text())[1])
    assert 5 <= saved < steps
    provs = [json.loads(x) for x in (first / "provenance.jsonl").read_text().splitlines()]
    assert [p["slurm"].get("SLURM_RESTART_COUNT", "0") for p in provs] == ["0", "1"]  # resumed after the requeue
    assert _train_steps(first) == list(range(1, steps + 1))


def _train_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
