"""The local 2-node Slurm cluster (tests/slurm_cluster.py) does what the Slurm tests will need:
2 nodes × 1 task with the SLURM_* ids a launcher reads, a MASTER_ADDR that resolves, preemption by
USR1 with requeue and restart count, and job arrays."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurm, ensure_packages

pytestmark = pytest.mark.timeout(300)

PY = sys.executable
PROBE = str(Path(__file__).resolve().parent / "workers" / "slurm_env_probe.py")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_packages()  # raises (an error, not a skip) when CI=true on root Debian
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def probes(text: str) -> list[dict]:
    return [json.loads(line[len("PROBE "):]) for line in text.splitlines() if line.startswith("PROBE {")]


def finished(slurm: LocalSlurm, job: str, out: Path, timeout: float = 60) -> str:
    state = slurm.wait(job, timeout)
    text = out.read_text() if out.exists() else "(no output file)"
    assert state == "COMPLETED", f"job {job} ended {state}\n--- output ---\n{text}\n{slurm.log_tail()}"
    return text


def test_two_nodes_one_task_each(slurm, tmp_path):
    out = tmp_path / "job.out"
    script = f"""#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=1
srun {PY} {PROBE}
"""
    job = slurm.sbatch([f"--output={out}"], script)
    text = finished(slurm, job, out)
    tasks = sorted(probes(text), key=lambda p: int(p["SLURM_PROCID"]))
    assert len(tasks) == 2, text
    assert [t["SLURM_PROCID"] for t in tasks] == ["0", "1"]
    assert sorted(t["SLURM_NODEID"] for t in tasks) == ["0", "1"]
    assert {t["SLURM_NTASKS"] for t in tasks} == {"2"}
    assert {t["SLURM_LOCALID"] for t in tasks} == {"0"}
    assert {t["SLURM_JOB_NODELIST"] for t in tasks} == {"node[1-2]"}
    assert sorted(t["SLURMD_NODENAME"] for t in tasks) == ["node1", "node2"]
    assert all(t["hostname"] for t in tasks)
    assert len({t["pid"] for t in tasks}) == 2


def test_master_addr_resolves(slurm, tmp_path):
    out = tmp_path / "job.out"
    script = f"""#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=1
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
echo "MASTER_ADDR=$MASTER_ADDR"
{PY} -c 'import socket, sys; print("RESOLVED=" + socket.gethostbyname(sys.argv[1]))' "$MASTER_ADDR"
"""
    job = slurm.sbatch([f"--output={out}"], script)
    text = finished(slurm, job, out)
    assert "MASTER_ADDR=node1" in text.splitlines(), text
    assert "RESOLVED=127.0.0.1" in text.splitlines(), text


def test_usr1_preemption_requeues_and_restarts(slurm, tmp_path):
    out, marks = tmp_path / "job.out", tmp_path / "marks"
    # The batch shell traps USR1 and forwards it to its srun step (srun passes it on to the tasks),
    # waits for the step, then requeues itself; the requeued run sees SLURM_RESTART_COUNT=1.
    script = f"""#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
echo "START restart=${{SLURM_RESTART_COUNT:-0}}"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then
    srun {PY} {PROBE}
    exit 0
fi
forward() {{ echo "BATCH_GOT_USR1"; kill -USR1 "$SRUN_PID" 2>/dev/null; }}
trap forward USR1
srun {PY} {PROBE} --wait-signal {marks} --timeout 60 &
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done   # a trapped signal ends `wait` early
wait "$SRUN_PID"; echo "STEP_EXIT=$?"
echo "REQUEUE"
scontrol requeue "$SLURM_JOB_ID"
sleep 60
"""
    job = slurm.sbatch([f"--output={out}"], script)
    slurm.wait(job, 30, until={"RUNNING"})
    deadline = time.monotonic() + 30
    while not all((marks / f"ready.{r}").exists() for r in (0, 1)):  # both tasks hold a handler
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.1)

    slurm.scancel("--signal=USR1", "--full", job)
    slurm.release(job, timeout=60)  # pending again (BeginTime ~2 min): start it now
    text = finished(slurm, job, out, timeout=60)

    lines = text.splitlines()
    assert "START restart=0" in lines and "START restart=1" in lines, text
    assert lines.index("START restart=0") < lines.index("REQUEUE") < lines.index("START restart=1"), text
    assert "BATCH_GOT_USR1" in lines and "STEP_EXIT=0" in lines, text
    assert all((marks / f"usr1.{r}").exists() for r in (0, 1)), text
    resumed = probes(text[text.index("START restart=1"):])
    assert sorted(p["SLURM_PROCID"] for p in resumed) == ["0", "1"], text
    assert {p["SLURM_RESTART_COUNT"] for p in resumed} == {"1"}, text
    assert slurm.jobs(job)[0]["Restarts"] == "1"


def test_job_array_runs_both_tasks(slurm, tmp_path):
    script = f"""#!/bin/bash
#SBATCH --array=0-1
#SBATCH --ntasks=1
echo "TASK=$SLURM_ARRAY_TASK_ID JOB=$SLURM_ARRAY_JOB_ID"
{PY} -c 'import time; print("BEGIN=%.3f" % time.time())'
sleep 3
{PY} -c 'import time; print("END=%.3f" % time.time())'
"""
    job = slurm.sbatch([f"--output={tmp_path}/arr_%A_%a.out"], script)
    state = slurm.wait(job, 60)
    outs = {i: tmp_path / f"arr_{job}_{i}.out" for i in (0, 1)}
    texts = {i: p.read_text() if p.exists() else "(missing)" for i, p in outs.items()}
    assert state == "COMPLETED", f"{state}\n{texts}\n{slurm.log_tail()}"
    spans = {}
    for i, text in texts.items():
        assert f"TASK={i} JOB={job}" in text.splitlines(), text
        vals = dict(line.split("=", 1) for line in text.splitlines() if line.startswith(("BEGIN=", "END=")))
        spans[i] = (float(vals["BEGIN"]), float(vals["END"]))
    # both tasks ran at the same time (4 CPU slots on 2 nodes)
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
