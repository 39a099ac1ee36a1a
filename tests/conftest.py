"""Shared fixtures: small prepared corpora, and launching real DeepSpeed ranks (2 CPU ranks over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dsgpt.dist import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shm_buffers():
    """Fail the session if it leaves DeepSpeed all-reduce buffers in /dev/shm (RAM) that no live
    process uses; ones in use belong to a concurrent job on this machine and are not counted."""
    from dsgpt import hygiene
    before = set(hygiene.shm_segments())
    yield
    new = [p for p in hygiene.shm_segments() if p not in before]
    leaked = sorted(set(new) - hygiene.held(new, maps=True))
    if leaked:
        for path in leaked:  # give the RAM back; the failure below still names them
            path.unlink(missing_ok=True)
        pytest.fail(f"this test session (or a concurrent one on this machine) leaked {len(leaked)} DeepSpeed "
                    f"shared-memory buffer(s) in /dev/shm, now removed: {', '.join(p.name for p in leaked)}",
                    pytrace=False)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if not _cuda():
        env["DS_ACCELERATOR"] = "cpu"  # explicit, rather than DeepSpeed guessing (and warning) per rank
    env.setdefault("DSGPT_CACHE", str(REPO / ".cache" / "dsgpt"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(script: str, args: list[str], ranks: int = 1, timeout: float = 600, cwd=None,
           check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run a script as 1 plain process, or as `ranks` ranks under the real deepspeed launcher."""
    script = str(REPO / script) if not os.path.isabs(script) else script
    if ranks == 1:
        cmd = [PY, script, *args]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=child_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def tiny_overrides(data: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    """A model small enough for 2 CPU cores: 2 layers, width 64, 32-token context."""
    return [
        f"run.name={name}", f"run.out_dir={out_dir}", f"data.path={data}",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
        "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.max_steps=10",
        "train.eval_interval=5", "train.eval_batches=2", "train.save_interval=100",
        "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=3", "deepspeed.zero_stage=0",
        *extra,
    ]


def run_jobs(jobs: list[dict], ranks: int, work: Path, timeout: float = 900, env: dict | None = None) -> dict:
    """Run training jobs in one launch (tests/workers/train_jobs.py); {name: [summary per rank]}."""
    work.mkdir(parents=True, exist_ok=True)
    jobs_file = work / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    out = work / "results"
    proc = launch("tests/workers/train_jobs.py", [str(jobs_file), str(out)], ranks=ranks, timeout=timeout,
                  **(env or {}))
    results = {}
    for job in jobs:
        per_rank = []
        for r in range(ranks):
            f = out / f"{job['name']}.rank{r}.json"
            assert f.exists(), f"no result for {job['name']} rank {r}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            per_rank.append(json.loads(f.read_text()))
        results[job["name"]] = per_rank
    return results


def losses(summary: dict) -> list[float]:
    return [summary["losses"][k] for k in sorted(summary["losses"], key=int)]


def grad_norms(summary: dict) -> list[float]:
    return [summary["grad_norms"][k] for k in sorted(summary["grad_norms"], key=int)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~400 KB of the standard library's own source, as token shards with a 512-token BPE."""
    from dsgpt.data.prepare import prepare
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in ("argparse.py", "collections/__init__.py", "textwrap.py",
                                        "json/decoder.py", "json/encoder.py", "csv.py", "string.py",
                                        "heapq.py", "bisect.py", "shlex.py", "difflib.py", "fractions.py")]
    src = tmp_path_factory.mktemp("corpus-src")
    for f in files:
        if f.exists():
            (src / (f.parent.name + "_" + f.stem + ".txt")).write_text(f.read_text())
    out = tmp_path_factory.mktemp("corpus") / "data"
    prepare([str(src)], out, vocab_size=512, val_fraction=0.2, seed=1, progress=False)
    return out


# The pretrained model the fine-tuning tests start from (train.init_from): a tiny GPT trained a
# little on `corpus`; wide enough (128) to learn the built-in instruction set in a minute.
PRETRAINED_SHAPE = ("model.n_layer=2", "model.n_head=4", "model.n_embd=128", "model.block_size=64")


@pytest.fixture(scope="session")
def pretrained_tiny(corpus, tmp_path_factory) -> Path:
    """The run dir of a tiny GPT pretrained for 40 steps on `corpus`."""
    out = tmp_path_factory.mktemp("pretrained") / "runs"
    launch("launch/train.py", ["--config", "configs/tiny.yaml", *tiny_overrides(
        corpus, out, "pretrained", *PRETRAINED_SHAPE, "train.max_steps=40", "train.micro_batch_size=8",
        "train.eval_interval=20")], timeout=600)
    return out / "pretrained"
