"""Runs leave the machine as they found it: no DeepSpeed all-reduce buffers in /dev/shm after a
launch however it ends, stale ones swept by the next launch, and a killed extension build's lock
cleared, while whatever a live process still uses is never touched."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import DEEPSPEED, PY, REPO, child_env, free_port, tiny_overrides
from dsgpt import hygiene

pytestmark = pytest.mark.skipif(not hygiene.SHM_DIR.is_dir(), reason="needs /dev/shm and /proc (Linux)")

HOLD = """
import mmap, os, sys, time
path, how = sys.argv[1], sys.argv[2]
if how == "map":  # mapped, its fd closed: only /proc/PID/maps shows the use
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    keep = mmap.mmap(fd, 4096)
    os.close(fd)
else:  # like torch's FileBaton: created exclusively, fd held open while building
    keep = os.open(path, os.O_CREAT | os.O_EXCL)
print("ready", flush=True)
time.sleep(120)
"""


class Holder:
    """A live process that maps (`map`) or holds open (`open`) a file until stopped."""

    def __init__(self, path: Path, how: str):
        self.path = path
        self.proc = subprocess.Popen([PY, "-c", HOLD, str(path), how], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.path.unlink(missing_ok=True)


def fake_segment(tag: str) -> Path:
    """A path named like a DeepSpeed buffer of this uid, at an address no job uses."""
    return hygiene.SHM_DIR / hygiene.shm_name(0, addr=f"dsgpt-test-{tag}-{uuid.uuid4().hex[:8]}", port="1")


def dead_segment() -> Path:
    """A segment made by a process that then ended, as a rank killed before releasing it leaves."""
    path = fake_segment("dead")
    subprocess.run([PY, "-c", "import sys; open(sys.argv[1], 'wb').write(b'x' * 4096)", str(path)], check=True)
    return path


def leftovers(port: int) -> list[str]:
    """Buffers in /dev/shm of the job at 127.0.0.1:`port`."""
    prefix = f"{hygiene.SHM_PREFIX}_{os.getuid()}_127.0.0.1_{port}_"
    return [p.name for p in hygiene.shm_segments() if p.name.startswith(prefix)]


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    """The rank processes under a `deepspeed` launcher."""
    pids = []
    for kid in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if any(a.startswith("--local_rank=") for a in kid.cmdline()):
                pids.append(kid.pid)
        except psutil.Error:
            pass  # it ended
    return pids


def wait_for(predicate, launcher: subprocess.Popen, log: Path, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert launcher.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def start(script: str, args: list[str], port: int, log: Path, **env) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(REPO / script),
                                 *args], cwd=REPO, env=child_env(**env), stdout=out, stderr=subprocess.STDOUT)


def private_extensions_dir(tmp_path: Path) -> Path:
    """An extensions dir of the test's own, so no concurrent launch sweeps what the test plants
    there; it starts with a copy of the shm op's build, so the ranks need not compile it."""
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    root = hygiene.extensions_root()
    for built in [*root.glob("deepspeed_shm_comm"), *root.glob("*/deepspeed_shm_comm")]:
        if (built / "deepspeed_shm_comm.so").exists():
            shutil.copytree(built, ext / built.name)  # keeps mtimes: ninja finds nothing to do
            break
    return ext


def kill_all(launcher: subprocess.Popen) -> None:
    for pid in rank_pids(launcher) if launcher.poll() is None else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if launcher.poll() is None:
        launcher.kill()
    launcher.wait()


# ---- the mechanisms, one by one ----------------------------------------------------------------

def test_names_follow_deepspeed():
    assert hygiene.shm_name(1, addr="10.0.0.5", port="29500") == \
        f"deepspeed_allreduce_buffer_{os.getuid()}_10.0.0.5_29500_1"


def test_sweep_removes_dead_buffers_and_keeps_mapped_ones():
    dead, live = dead_segment(), Holder(fake_segment("live"), "map")
    try:
        hygiene.sweep_stale_shm()
        # (a concurrent launch on this machine may have swept `dead` first: either way it is gone)
        assert not dead.exists()
        assert live.path.exists(), "a buffer a live process maps was removed"
    finally:
        live.stop()
        dead.unlink(missing_ok=True)


def test_sweep_spares_this_jobs_own_names(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", f"dsgpt-test-own-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("MASTER_PORT", "1")
    own = hygiene.SHM_DIR / hygiene.shm_name(1)  # a sibling rank may be creating it right now
    own.write_bytes(b"x")
    try:
        hygiene.sweep_stale_shm(world_size=2)
        assert own.exists()
    finally:
        own.unlink(missing_ok=True)


def test_release_unlinks_only_a_buffer_this_process_maps(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", f"dsgpt-test-rel-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("MASTER_PORT", "1")
    mine, other = hygiene.SHM_DIR / hygiene.shm_name(0), hygiene.SHM_DIR / hygiene.shm_name(1)
    other.write_bytes(b"x" * 4096)
    fd = os.open(mine, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 4096)
        view = mmap.mmap(fd, 4096)
        view[:5] = b"hello"
        assert hygiene.release_own_shm(0) == mine and not mine.exists()
        assert view[:5] == b"hello"  # the mapping outlives the name
        assert hygiene.release_own_shm(1) is None and other.exists()  # not mapped here: not ours
        view.close()
    finally:
        os.close(fd)
        mine.unlink(missing_ok=True)
        other.unlink(missing_ok=True)


def test_stale_build_lock_is_cleared_and_a_held_one_kept(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "cpu_adam" / "lock"
    nested = tmp_path / "py311_cpu" / "fused_adam" / "lock"  # the layout without TORCH_EXTENSIONS_DIR
    for lock in (stale, nested):
        lock.parent.mkdir(parents=True)
        lock.touch()
    (tmp_path / "deepspeed_shm_comm").mkdir()
    building = Holder(tmp_path / "deepspeed_shm_comm" / "lock", "open")
    try:
        assert hygiene.extensions_root() == tmp_path
        assert sorted(hygiene.sweep_stale_build_locks()) == sorted([stale, nested])
        assert not stale.exists() and not nested.exists()
        assert building.path.exists(), "the lock of a build in progress was removed"
        assert f"removed a stale extension-build lock (a build was killed) {stale}" in capfd.readouterr().err
    finally:
        building.stop()


def test_locks_on_a_shared_filesystem_are_left_alone(tmp_path, monkeypatch):
    mountinfo = (f"22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
                 f"40 22 0:40 / {tmp_path} rw,relatime - nfs4 server:/home rw\n")
    assert hygiene.on_network_fs(tmp_path / "x", mountinfo)
    assert not hygiene.on_network_fs(Path("/var/tmp"), mountinfo)
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "lock").touch()
    monkeypatch.setattr(hygiene, "on_network_fs", lambda path, mountinfo=None: True)
    assert hygiene.sweep_stale_build_locks(tmp_path) == [] and (tmp_path / "op" / "lock").exists()
    # dsgpt's per-node dir (slurm, mpirun) is swept even there: only this node builds in it
    assert hygiene.sweep_stale_build_locks(tmp_path, per_node=True) == [tmp_path / "op" / "lock"]


# ---- real launches ------------------------------------------------------------------------------

def test_a_launch_releases_its_buffers_and_sweeps_what_others_left(tmp_path):
    """2 ranks through dist.setup: the buffers work but have no name once set up, so a SIGKILL
    leaves none; stale buffers and build locks are swept at setup, live ones kept."""
    dead, live = dead_segment(), Holder(fake_segment("live"), "map")
    ext = private_extensions_dir(tmp_path)
    lock = ext / "cpu_adam" / "lock"  # a killed build's lock where the ranks build ops
    lock.parent.mkdir()
    lock.touch()
    port, out, log = free_port(), tmp_path / "out", tmp_path / "launch.log"
    launcher = start("tests/workers/shm_probe.py", [str(out), "--hold"], port, log, TORCH_EXTENSIONS_DIR=ext)
    try:
        wait_for(lambda: all((out / f"rank{r}.json").exists() for r in (0, 1)), launcher, log)
        reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        names = [f"/dev/shm/{hygiene.shm_name(r, '127.0.0.1', str(port))} (deleted)" for r in (0, 1)]
        for report in reports:
            assert report["shm_op"] and report["sums_ok"] == [True, True], report  # DeepSpeed's shm path works
            assert report["mapped"] == names, report  # mapped, yet no longer named
        assert leftovers(port) == []
        # (a concurrent launch on this machine may have swept `dead` first: either way it is gone)
        assert not dead.exists()
        assert live.path.exists(), "a buffer a live process maps was removed"
        assert not lock.exists() and f"extension-build lock (a build was killed) {lock}" in log.read_text()
        for pid in rank_pids(launcher):
            os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=60)
        assert leftovers(port) == []
    finally:
        kill_all(launcher)
        live.stop()
        dead.unlink(missing_ok=True)


def test_a_run_stopped_by_sigusr1_leaves_no_buffers(corpus, tmp_path):
    out, port, log = tmp_path / "runs", free_port(), tmp_path / "train.log"
    launcher = start("launch/train.py", ["--config", "configs/tiny.yaml", *tiny_overrides(
        corpus, out, "usr1", "train.max_steps=100000", "train.save_interval=100000")], port, log)
    metrics = out / "usr1" / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and sum(1 for _ in metrics.open()) >= 2, launcher, log)
        assert leftovers(port) == []  # released while training
        for pid in rank_pids(launcher):  # the launcher does not forward USR1: Slurm signals ranks
            os.kill(pid, signal.SIGUSR1)
        assert launcher.wait(timeout=120) == 0, log.read_text()[-4000:]
        assert "signal:SIGUSR1" in log.read_text()
        assert leftovers(port) == []
    finally:
        kill_all(launcher)
