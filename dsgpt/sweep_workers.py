"""The processes of a sweep: trial runs started so that none outlives the sweep, stop signals passed
on to them, file locks that tell workers apart, and `--jobs N` worker processes side by side.

A sweep process (`dsgpt sweep`, a `--worker`, or one of the `--jobs` workers) starts each child in
a session of its own, so a Ctrl-C or a signal to the sweep's process group reaches the sweep alone;
the sweep passes SIGTERM on (USR1 as USR1, for Slurm's warning before a time limit) and waits while
the trial saves its checkpoint. A child also gets SIGTERM from the kernel when its parent dies,
SIGKILL included (Linux PR_SET_PDEATHSIG), so no trial outlives a killed sweep.

Locks are `flock`s on files in the sweep dir (`locks/`), which the kernel drops when their holder
dies, however it dies: one for claiming the next trial, one per configuration held while it runs
(an interrupted trial's lock is free, so a later worker resumes it), one for writing the results.
On NFS, Linux implements flock with the server's byte-range locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies, however it dies (Linux prctl)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Children:
    """The child processes of this sweep process, and the stop signal it has been sent (0: none)."""

    def __init__(self):
        self.procs: set = set()
        self.signal = 0

    def install(self) -> "Children":
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.signal = self.signal or signum
        # The trainer saves and stops on TERM and USR1; Ctrl-C means the same here.
        forward = signal.SIGTERM if signum == signal.SIGINT else signum
        for proc in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, forward)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def start(self, cmd: list[str], env: dict, stdout=None, pass_fds=()) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                                stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=pass_fds,
                                preexec_fn=_die_with_parent)
        self.procs.add(proc)
        return proc

    def wait(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait()
        finally:
            self.procs.discard(proc)

    def run(self, cmd: list[str], env: dict, stdout, pass_fds=()) -> Optional[int]:
        """Run one child to its end; None when a stop was requested before it could start."""
        if self.signal:
            return None
        return self.wait(self.start(cmd, env, stdout, pass_fds))


# ---- locks ---------------------------------------------------------------------------------------

def try_lock(path: Path) -> Optional[int]:
    """An exclusive lock on `path` (its fd; keep it open to hold the lock), or None when another
    process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lock(path: Path) -> int:
    """Like try_lock, waiting for the holder to let go."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)  # the lock goes with the last open copy of fd (a child may hold one)


@contextlib.contextmanager
def locked(path: Path):
    fd = lock(path)
    try:
        yield
    finally:
        unlock(fd)


# ---- who is working ------------------------------------------------------------------------------

SESSION_ENV = "DSGPT_SWEEP_SESSION"
CPUS_ENV = "DSGPT_SWEEP_CPUS"
LAUNCH_ENV = "DSGPT_SWEEP_LAUNCH"


def session() -> str:
    """What one launch of a sweep shares: its --jobs workers, or the tasks of one Slurm array (a
    requeued task included). A trial that failed in an earlier session is tried again."""
    if os.environ.get(SESSION_ENV):
        return os.environ[SESSION_ENV]
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    return f"slurm-{slurm}" if slurm else uuid.uuid4().hex[:12]


def launch_prefix() -> list[str]:
    """What a trial's `python launch/train.py` runs under: DSGPT_SWEEP_LAUNCH (e.g. `srun
    --kill-on-bad-exit=1` in a Slurm worker, so a trial uses the task's whole allocation), or nothing."""
    import shlex
    return shlex.split(os.environ.get(LAUNCH_ENV, ""))


def apply_cpu_share() -> Optional[list[int]]:
    """In a --jobs worker: keep to the cores it was given (its trials inherit them, and dsgpt.dist
    gives each one thread per core it may use)."""
    spec = os.environ.get(CPUS_ENV, "")
    if not spec:
        return None
    cpus = [int(c) for c in spec.split(",")]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    return cpus


def _visible_gpus() -> list[str]:
    from dsgpt.dist import gpu_available
    if not gpu_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if listed:
        return listed
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def slots(jobs: int) -> list[dict]:
    """The environment of each of `jobs` workers: a GPU each (round robin over the visible ones) and
    an equal share of this process's cores."""
    gpus = _visible_gpus()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    out = []
    for i in range(jobs):
        share = cpus[i * len(cpus) // jobs:(i + 1) * len(cpus) // jobs] or [cpus[i % len(cpus)]]
        env = {CPUS_ENV: ",".join(map(str, share))}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        out.append(env)
    return out


def run_workers(sweep_dir: Path, jobs: int, children: Children) -> int:
    """`dsgpt sweep FILE --jobs N`: N worker processes on the same study, side by side; returns
    how many ended badly."""
    shared = {SESSION_ENV: session()}
    procs = []
    for i, slot in enumerate(slots(jobs)):
        if children.signal:
            break
        gpu = f", GPU {slot['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in slot else ""
        print(f"worker {i}: CPUs {slot[CPUS_ENV]}{gpu}", flush=True)
        env = dict(os.environ, **shared, **slot)
        procs.append(children.start([sys.executable, "-m", "dsgpt.sweep", str(sweep_dir)], env))
    return sum(1 for p in procs if children.wait(p) != 0)
