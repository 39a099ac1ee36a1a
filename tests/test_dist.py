"""Launcher discovery (who a rank is, from the deepspeed launcher's, srun's or a plain run's env)
and how a process leaves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, REPO, child_env
from dsgpt import dist

SLURM_VARS = ("SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID",
              "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
              "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_CPUS_PER_TASK")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCH_EXTENSIONS_DIR", "DSGPT_TORCH_EXTENSIONS_BASE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
               "PMIX_RANK", "GROUP_RANK", "NODE_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    # dist writes RANK, MASTER_PORT, ... into os.environ itself: restore the whole environment
    # afterwards, or later tests' child processes inherit a made-up world of 8 ranks.
    saved = dict(os.environ)
    for key in SLURM_VARS + LAUNCH_VARS:
        os.environ.pop(key, None)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_srun_task_finds_its_place(clean_env, tmp_path):
    env = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[07-10]", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    for key, value in env.items():
        clean_env.setenv(key, value)
    launch = dist._discover()
    assert (launch.rank, launch.local_rank, launch.world, launch.local_world, launch.node_rank) == (5, 1, 8, 2, 2)
    assert launch.launcher == "slurm"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    dist._export(launch)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("5", "1", "8")
    # One JIT build dir per node, under the user's own choice of base dir; stable on re-export.
    ext = os.environ["TORCH_EXTENSIONS_DIR"]
    assert ext.startswith(str(tmp_path / "ext")) and ext.endswith("-node2")
    dist._export(launch)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == ext


def test_master_addr_from_environment_wins(clean_env):
    for key, value in {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
                       "MASTER_ADDR": "head", "MASTER_PORT": "29999"}.items():
        clean_env.setenv(key, value)
    dist._discover()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "29999")


def test_deepspeed_launcher_env_wins_over_slurm(clean_env):
    for key, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}.items():
        clean_env.setenv(key, value)
    launch = dist._discover()
    assert (launch.launcher, launch.rank, launch.world, launch.local_world) == ("env", 1, 4, 2)


def test_a_batch_script_without_srun_is_not_a_slurm_rank(clean_env):
    # In the batch shell itself SLURM_PROCID=0 but there is no step: a plain single process.
    for key, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"}.items():
        clean_env.setenv(key, value)
    launch = dist._discover()
    assert launch.launcher == "single" and launch.world == 1


ORIGINAL = {key: os.environ.get(key) for key in SLURM_VARS + LAUNCH_VARS}


def test_the_environment_is_restored_after_each_test():
    # Runs after the tests above (file order): nothing they made up may leak into later tests.
    assert {key: os.environ.get(key) for key in SLURM_VARS + LAUNCH_VARS} == ORIGINAL


def test_one_rank_reductions_make_no_tensor():
    """Without a process group the stop check's reductions stay on the host: on a GPU a tensor there
    would cost a copy to the device and a read back, two synchronisations every step."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        assert dist.all_reduce_max([3.0, 0.0, True], torch.device("cpu")) == [3.0, 0.0, 1.0]
        assert dist.all_reduce_sum([1.5, 2], torch.device("cpu")) == [1.5, 2.0]
    assert ops.seen == []


EXIT_PROBE = """
import atexit, sys
from pathlib import Path
from dsgpt import dist
dist.setup()  # a plain process joins a one-rank gloo group, as `python launch/train.py` does
atexit.register(lambda: Path(sys.argv[1]).write_text("handlers ran"))
class Finalized:  # interpreter teardown, skipped together with the C++ clean-up
    def __init__(self, path):
        self.touch = Path(path).touch  # bound now: module globals may be gone when __del__ runs
    def __del__(self):
        self.touch()
kept = Finalized(sys.argv[1] + ".finalized")
sys.stdout.write("buffered, no newline")
dist.exit_rank(3)
"""


def test_a_plain_process_with_a_group_leaves_through_exit_rank(tmp_path):
    # Left to interpreter exit, gloo's threads now and then abort a finished process (-6); exit_rank
    # skips the C++ clean-up but still runs the exit handlers, flushes output and keeps the code.
    marker = tmp_path / "atexit.txt"
    proc = subprocess.run([PY, "-c", EXIT_PROBE, str(marker)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.endswith("buffered, no newline")
    assert marker.read_text() == "handlers ran"
    assert not Path(f"{marker}.finalized").exists()
