"""Making `mpirun` + mpi4py usable for the MPI tests, and the mpirun command line they use.

mpi4py itself is never installed here: the project's `mpi` extra brings it (`pip install -e .[mpi]`).
Its binary wheels load the system's MPI library at import time, so on Debian the missing piece is
usually Open MPI itself (`openmpi-bin`, plus `libopenmpi-dev` for the `libmpi.so` link and for
building mpi4py from source where no wheel fits). That one we install with apt when we may.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Optional

# What each rank needs from the test's environment. OpenMPI 4's mpirun forwards its environment
# to local ranks, but `-x NAME` states it (and is what carries it to ranks on other hosts).
FORWARDED_ENV = ("PYTHONPATH", "DS_ACCELERATOR", "DSGPT_CACHE", "PATH", "LD_LIBRARY_PATH")
APT_PACKAGES = ("openmpi-bin", "libopenmpi-dev")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _is_debian() -> bool:
    return os.path.exists("/etc/debian_version") and shutil.which("apt-get") is not None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _apt_install(packages) -> Optional[str]:
    """apt-get install, quietly; None on success, else why not."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # the package lists may be missing or stale on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True, timeout=600)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()[-800:]}"
    return None


def _mpi4py_problem() -> Optional[str]:
    """Does `import mpi4py.MPI` work in this interpreter? Checked in a child process so this
    process (pytest) never initialises MPI itself."""
    code = "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"`{sys.executable} -c 'import mpi4py.MPI'` hung for 120 s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if "No module named 'mpi4py'" in proc.stderr:
            return (f"mpi4py is not installed in {sys.executable} (install the project's `mpi` extra: "
                    f"pip install -e '.[mpi]')")
        return f"`import mpi4py.MPI` fails in {sys.executable}: {last}"
    return None


def _ensure() -> Optional[str]:
    if shutil.which("mpirun") is None:
        if not (_is_root() and _is_debian()):
            return "mpirun is not installed (on Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)"
        problem = _apt_install(APT_PACKAGES)
        if problem:
            return problem
        if shutil.which("mpirun") is None:
            return f"apt-get installed {' '.join(APT_PACKAGES)} but there is still no mpirun on PATH"
    return _mpi4py_problem()


_checked: list = []  # memo: [result] once ensure_mpi ran in this process


def ensure_mpi() -> Optional[str]:
    """None when `mpirun` and mpi4py are usable here, else the reason to skip with.

    Installs Open MPI with apt when it is missing and we are root on Debian. In CI (CI=true) on
    such a machine, an unusable MPI is an error, not a skip: CI must run the MPI tests.
    """
    if not _checked:
        _checked.append(_ensure())
    problem = _checked[0]
    if problem and _in_ci() and _is_root() and _is_debian():
        raise RuntimeError(f"CI=true on a Debian machine as root, but MPI is not usable: {problem}")
    return problem


def mpirun_cmd(np: int, env: Optional[dict] = None) -> list[str]:
    """`mpirun -np N` for N ranks on this one machine, as root if need be.

    --oversubscribe: more ranks than Open MPI counts slots (cores) is fine for tests.
    --bind-to none: else Open MPI binds each rank to a core (or several ranks to one), defeating
    the per-rank thread counts dsgpt.dist sets.
    -x NAME: for each of FORWARDED_ENV that `env` (the environment mpirun will run in; default
    this process's) has; naming an unset one only makes mpirun warn.
    """
    env = os.environ if env is None else env
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none"]
    if _is_root():
        cmd.append("--allow-run-as-root")  # Open MPI refuses root otherwise (OMPI_ALLOW_RUN_AS_ROOT=1 also works)
    for name in FORWARDED_ENV:
        if name in env:
            cmd += ["-x", name]
    return cmd
