"""A demo corpus that every machine already has: the Python standard library's own sources.

No download, deterministic for a given Python version (a fixed, sorted file list, capped at
CORPUS_BYTES), big enough (~6 MB) for a tiny GPT to learn something visible. Ranks and
processes that ask for it at once are serialised by a file lock: one prepares, the rest reuse.
"""

from __future__ import annotations

import fcntl
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

from dsgpt.data.prepare import prepare_documents
from dsgpt.errors import UserError

BUILTIN = "builtin"  # the data path name that means "this corpus"
CORPUS_BYTES = 6_000_000
SAMPLE_BYTES = 2_500_000  # BPE training sample: keeps vocab-2048 training to seconds
VAL_FRACTION = 0.02  # a few whole files: enough validation tokens for small block sizes
SEED = 1234
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def builtin_files(limit_bytes: int = None) -> list[Path]:
    """The stdlib .py files of the corpus: top-level modules first, then packages, each sorted,
    until `limit_bytes` (default CORPUS_BYTES)."""
    limit = CORPUS_BYTES if limit_bytes is None else limit_bytes
    root = Path(sysconfig.get_paths()["stdlib"])
    top = sorted(p for p in root.glob("*.py") if p.is_file())
    nested = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune rather than filter: site-packages can be far bigger than the stdlib itself.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        if Path(dirpath) != root:
            nested += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    nested.sort(key=lambda p: p.relative_to(root).as_posix())
    chosen, total = [], 0
    for path in top + nested:
        size = path.stat().st_size
        if total + size > limit:
            continue  # a smaller later file may still fit; the order stays fixed
        chosen.append(path)
        total += size
    if not chosen:
        raise UserError(
            f"The built-in corpus needs the Python standard library's .py sources, but {root} has "
            "none (some minimal Python installs ship only bytecode). Prepare your own text with "
            "`dsgpt prepare --input FILES --out DIR --vocab-size N` and point the data path at DIR."
        )
    return chosen


def builtin_documents(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        # errors="replace": a stray byte in one stdlib file should not stop the demo.
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if text:
            yield text


def ensure_builtin(out_dir, vocab_size: int, files: Sequence[Path] | None = None, progress: bool = False) -> Path:
    """Return `out_dir` holding the prepared built-in corpus, preparing it first if needed.

    Safe to call from every rank at once: an exclusive lock on `<out_dir>.lock` lets one process
    prepare while the others wait, then they find meta.json and reuse it. `files` replaces the
    default stdlib file list (tests use a few small files)."""
    out_dir = Path(out_dir).expanduser()
    if not (out_dir / "meta.json").is_file():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock_path = out_dir.with_name(out_dir.name + ".lock")
        # The lock file stays: deleting it would let a late process lock a different inode.
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not (out_dir / "meta.json").is_file():  # someone may have finished meanwhile
                    _prepare_corpus(out_dir, vocab_size, files, progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    _check_vocab(out_dir, vocab_size)
    return out_dir


def _prepare_corpus(out_dir: Path, vocab_size: int, files, progress: bool) -> dict:
    files = [Path(f) for f in (builtin_files() if files is None else files)]
    return prepare_documents(
        lambda: builtin_documents(files),
        out_dir,
        vocab_size=vocab_size,
        val_fraction=VAL_FRACTION,
        seed=SEED,
        sample_bytes=SAMPLE_BYTES,
        progress=progress,
        extra_meta={"inputs": [BUILTIN], "builtin_files": [_shown(f) for f in files]},
    )


def _shown(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _check_vocab(out_dir: Path, vocab_size: int) -> None:
    meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    if meta.get("requested_vocab_size") != vocab_size:
        raise UserError(
            f"The built-in corpus in {out_dir} was prepared with vocab size "
            f"{meta.get('requested_vocab_size')}, but {vocab_size} was asked for. Delete {out_dir} "
            "to prepare it again, or use a different data directory for each vocab size."
        )


def cache_dir() -> Path:
    """Where dsgpt keeps what it prepares on first use (DSGPT_CACHE, default ~/.cache/dsgpt)."""
    return Path(os.environ.get("DSGPT_CACHE", Path.home() / ".cache" / "dsgpt"))


def data_dir(data_path: str, builtin_vocab_size: int) -> Path:
    """Where a config's data lives; `builtin` maps to a per-vocab folder in the cache."""
    from dsgpt.config import resolve_path
    if data_path == BUILTIN:
        return cache_dir() / f"builtin-v{builtin_vocab_size}"
    return resolve_path(data_path)
