"""`mpirun -np 2 python launch/train.py ...` trains: ranks come from the MPI runtime (mpi4py), the
rendezvous from rank 0, and the run is the same run the deepspeed launcher gives."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import PY, REPO, child_env, launch, tiny_overrides
from mpi_support import ensure_mpi, mpirun_cmd

RANKS = 2
STEPS = 10  # what tiny_overrides sets


@pytest.fixture(scope="module")
def mpi_ready():
    problem = ensure_mpi()
    if problem:
        pytest.skip(problem)


def step_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out[record["step"]] = record["train/loss"]
    return out


def test_mpirun_trains_like_the_deepspeed_launcher(mpi_ready, corpus, tmp_path):
    train = ["--config", "configs/tiny.yaml"]

    env = child_env()
    cmd = [*mpirun_cmd(RANKS, env), PY, str(REPO / "launch/train.py"), *train,
           *tiny_overrides(corpus, tmp_path / "mpi", "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = f"{' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log

    # Every rank found itself through MPI, not through RANK/WORLD_SIZE or as a world of one.
    # Not anchored to line starts: mpirun forwards the ranks' output in chunks, and one rank's
    # line can land before the other's newline.
    for r in range(RANKS):
        assert re.search(rf"\[dsgpt\] rank {r}/{RANKS} [^\[\n]*launcher mpi\b", proc.stdout), log

    run_dir = tmp_path / "mpi" / "run"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    tag_dir = run_dir / "checkpoints" / latest
    assert sorted(p.name for p in tag_dir.glob("rng_rank*.json")) == ["rng_rank00000.json", "rng_rank00001.json"]

    mpi = step_losses(run_dir)
    assert sorted(mpi) == list(range(1, STEPS + 1)), mpi

    # The same config under the deepspeed launcher: a step's global batch is a pure function of
    # the step, so the losses must agree.
    launch("launch/train.py", [*train, *tiny_overrides(corpus, tmp_path / "ds", "run")], ranks=RANKS,
           timeout=300)
    ds = step_losses(tmp_path / "ds" / "run")
    assert sorted(ds) == sorted(mpi)
    for step in mpi:
        assert mpi[step] == pytest.approx(ds[step], rel=1e-5), (step, mpi, ds)
