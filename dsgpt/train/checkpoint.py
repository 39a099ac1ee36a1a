"""Saving and restoring a training run through its DeepSpeed engine.

A save, in order: DeepSpeed writes the engine state (model, optimizer, scheduler) → each rank
writes its RNG state (JSON) → barrier → rank 0 writes `dsgpt_state.json`, then `manifest.json`
(every file with its size) → `latest` moves (temp name + rename) → barrier. A crash anywhere
leaves either the previous `latest` or a checkpoint whose manifest proves it complete; resume
checks the manifest (dsgpt/runs.py) and falls back to the newest intact checkpoint.

`DSGPT_FAULT_AT=<point>[@rank]` kills this process (SIGKILL) at a named point of the save, so the
tests and bench/crash_saves.py can prove each point recoverable: after_deepspeed, after_rng,
before_state, before_latest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from dsgpt import dist
from dsgpt.errors import UserError
from dsgpt.io import atomic_write_json, atomic_write_text
from dsgpt.runs import MANIFEST_FILE, STATE_FILE, list_tags, read_state, tag_files, tag_for
from dsgpt.train import rng

FAULT_POINTS = ("after_deepspeed", "after_rng", "before_state", "before_latest")


def _fault_point(name: str, rank: int) -> None:
    """Die here when DSGPT_FAULT_AT names this point (and this rank, if a rank is given)."""
    spec = os.environ.get("DSGPT_FAULT_AT", "")
    if not spec:
        return
    point, _, only_rank = spec.partition("@")
    if point == name and (not only_rank or int(only_rank) == rank):
        os.kill(os.getpid(), signal.SIGKILL)


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank:05d}.json"


def save(engine, ckpt_dir: Path, step: int, state: dict, rank: int, keep_last: int) -> str:
    """All ranks call this. `latest` moves only after every rank has finished writing."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists() and tag not in _pointed_at(ckpt_dir):
        shutil.rmtree(tag_dir)  # left by a save that crashed: start this tag from nothing
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    _fault_point("after_deepspeed", rank)
    atomic_write_json(rng_file(tag_dir, rank), rng.capture())
    _fault_point("after_rng", rank)
    dist.barrier()
    if rank == 0:
        _fault_point("before_state", rank)
        atomic_write_json(tag_dir / STATE_FILE, state)
        atomic_write_json(tag_dir / MANIFEST_FILE, {"step": step, "files": tag_files(tag_dir)})
        _fault_point("before_latest", rank)
        atomic_write_text(ckpt_dir / "latest", tag)
        if state.get("is_best"):
            atomic_write_text(ckpt_dir / "best", tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def _pointed_at(ckpt_dir: Path) -> set[str]:
    names = set()
    for name in ("latest", "best"):
        try:  # a damaged pointer must not stop a save
            names.add((ckpt_dir / name).read_bytes().decode("utf-8", errors="replace").strip())
        except OSError:
            pass
    return names


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    keep = set(list_tags(ckpt_dir)[-keep_last:]) | _pointed_at(ckpt_dir)
    for tag in list_tags(ckpt_dir):
        if tag not in keep:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str, rank: int, seed: int) -> tuple[dict, str]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; return dsgpt's state and
    a note ('' when the RNG state was restored as saved)."""
    state = read_state(ckpt_dir / tag)
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load checkpoint '{ckpt_dir / tag}'. It may be incomplete; "
                        f"resume from an earlier one with train.resume=PATH.")
    return state, restore_rng(ckpt_dir / tag, rank, seed, int(state.get("step", 0)))


def restore_rng(tag_dir: Path, rank: int, seed: int, step: int) -> str:
    """This rank's saved RNG state, or a seed derived from (seed, rank, step) when there is none
    this dsgpt can read. Returns a note saying which, '' when restored exactly."""
    path = rng_file(tag_dir, rank)
    if path.is_file():
        try:
            rng.restore(json.loads(path.read_bytes()))
            return ""
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"The RNG state '{path}' is corrupt ({err}). Resume from another checkpoint "
                            f"with train.resume=PATH, or delete the file to continue with fresh random "
                            f"draws (seeded from run.seed, the rank and the step).") from None
    rng.seed_everything(rng.derived_seed(seed, rank, step))
    if (tag_dir / f"rng_rank{rank:05d}.pt").is_file():
        # Written by an earlier dsgpt as a pickle, which is never unpickled: loading it could run code.
        return (f"rank {rank}: the checkpoint's RNG state is in the old pickle format, which dsgpt does "
                f"not load; random draws (dropout) continue from a seed derived from run.seed, rank and step")
    return f"rank {rank}: no saved RNG state; random draws continue from a seed derived from run.seed, rank and step"

