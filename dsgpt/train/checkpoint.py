"""Saving and restoring a training run through its DeepSpeed engine.

DeepSpeed writes the engine state (model, optimizer, scheduler); dsgpt adds each rank's RNG state
and its own `dsgpt_state.json`, then moves `latest` (temp name + rename) only after every rank has
finished writing, so `latest` always names a complete checkpoint. See dsgpt/runs.py for the layout.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dsgpt import dist
from dsgpt.errors import UserError
from dsgpt.io import atomic_write_json, atomic_write_text
from dsgpt.runs import STATE_FILE, list_tags, read_state, tag_for


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, state: dict, rank: int, keep_last: int) -> str:
    """All ranks call this. `latest` moves only after every rank has finished writing."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    tag_dir = ckpt_dir / tag
    rng_path = tag_dir / f"rng_rank{rank:05d}.pt"
    torch.save(_rng_state(), str(rng_path) + ".tmp")
    os.replace(str(rng_path) + ".tmp", rng_path)
    dist.barrier()
    if rank == 0:
        atomic_write_json(tag_dir / STATE_FILE, state)
        atomic_write_text(ckpt_dir / "latest", tag)
        if state.get("is_best"):
            atomic_write_text(ckpt_dir / "best", tag)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    keep = set(list_tags(ckpt_dir)[-keep_last:])
    for name in ("latest", "best"):
        try:  # a damaged pointer must not stop a save that already succeeded
            keep.add((ckpt_dir / name).read_bytes().decode("utf-8", errors="replace").strip())
        except OSError:
            pass
    for tag in list_tags(ckpt_dir):
        if tag not in keep:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; return dsgpt's state."""
    state = read_state(ckpt_dir / tag)
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load checkpoint '{ckpt_dir / tag}'. It may be incomplete; "
                        f"resume from an earlier one with train.resume=PATH.")
    rng_path = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if rng_path.is_file():
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return state


def load_weights(engine, ckpt_dir: Path, tag: str) -> None:
    """Load only the model weights (a fine-tune's starting point): no optimizer, no step count."""
    engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
