"""What produced a run: code version, packages, command line, cluster job, data. One JSON line per
launch in `provenance.jsonl`, so a requeued or resumed run keeps its whole history."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from dsgpt.config import REPO_ROOT

PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "numpy", "dsgpt")
MAX_DIFF_BYTES = 200_000


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
        return out.stdout if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def collect(argv: list[str], world_size: int, data_sha256: str) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    diff = _git("diff", "HEAD")
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": _git("rev-parse", "HEAD").strip() or None,
        "git_dirty": bool(diff),
        "git_diff": diff[:MAX_DIFF_BYTES],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": versions,
        "argv": argv,
        "world_size": world_size,
        "slurm": {k: v for k, v in os.environ.items() if k in (
            "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
            "SLURM_JOB_NODELIST", "SLURM_NNODES")},
        "data_sha256": data_sha256,
    }


def record(run_dir: Path, info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "provenance.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")
