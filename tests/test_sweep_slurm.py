"""`sbatch --array slurm/sweep.sbatch SWEEP.yaml` on the local 2-node Slurm cluster
(tests/slurm_cluster.py): the array's tasks are workers on one optuna study (the journal file in the
sweep dir), each claiming trials and running them with srun until the sweep has them all."""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from conftest import PY, REPO, child_env, tiny_overrides
from dsgpt.train.pruning import read_metrics
from tests.slurm_cluster import LocalSlurm, ensure_packages

pytestmark = pytest.mark.timeout(600)

CPU_NODES = ["--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=1"]  # the test nodes have no GPU


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


def test_array_tasks_are_workers_on_one_study(slurm, corpus, tmp_path):
    base = tiny_overrides(corpus, tmp_path, "unused", "train.eval_interval=5", "optim.warmup_steps=0")
    sweep_file = tmp_path / "tpe.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "tpe", "base": "configs/tiny.yaml", "overrides": [o for o in base if not o.startswith("run.")],
        "space": {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}}, "sampler": "tpe",
        "trials": 3, "budget": {"steps": 10}, "out_dir": str(tmp_path / "runs")}))
    job = slurm.sbatch(["--array=0-1", "-N", "1", *CPU_NODES, f"--output={tmp_path}/worker-%a.log"],
                       str(REPO / "slurm/sweep.sbatch"), script_args=[str(sweep_file)], cwd=REPO, env=job_env())
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
    job = slurm.sbatch(["--array=0-0", "-N", "1", *CPU_NODES, f"--output={log}"],
                       str(REPO / "slurm/sweep.sbatch"), script_args=[str(sweep_file)], cwd=REPO, env=job_env())
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
