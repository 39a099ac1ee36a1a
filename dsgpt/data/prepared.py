"""Open a prepared data dir as what it holds: pretraining token windows (TokenData) or chat
examples for supervised fine-tuning (SFTData). meta.json's `kind` decides; both readers offer the
trainer the same interface (train_micro_batches, val_batches, masks_labels, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dsgpt.errors import UserError


def data_kind(path) -> str:
    """"chat" or "tokens" (also for a missing or unreadable meta.json: TokenData then says why)."""
    try:
        return json.loads((Path(path).expanduser() / "meta.json").read_text(encoding="utf-8")).get("kind", "tokens")
    except (OSError, ValueError, AttributeError):
        return "tokens"


def open_prepared(path, block_size: int, seed: int, pack: Optional[bool] = None):
    """TokenData or SFTData for `path`; `pack` (chat dirs only) overrides how it was prepared."""
    if data_kind(path) == "chat":
        from dsgpt.data.sft import SFTData
        return SFTData(path, block_size=block_size, seed=seed, pack=pack)
    from dsgpt.data.dataset import TokenData
    return TokenData(path, block_size=block_size, seed=seed)


def open_run_data(cfg, block_size: int):
    """A run config's data: token windows for pretraining, SFT examples for a chat dir (meta.json's
    kind), or a mixture of pretraining dirs (data.mix). The built-in corpus is prepared on first
    use by one process; the others wait."""
    from dsgpt.data.builtin import BUILTIN, data_dir, ensure_builtin
    if cfg.data.mix is not None:
        return _open_mixture(cfg, block_size)
    path = data_dir(cfg.data.path, cfg.data.builtin_vocab_size)
    if cfg.data.path == BUILTIN:
        ensure_builtin(path, cfg.data.builtin_vocab_size)
    if cfg.data.pack is not None and data_kind(path) != "chat":
        raise UserError(f"data.pack={cfg.data.pack} applies to chat data (dsgpt prepare --chat), but '{cfg.data.path}' "
                        "holds pretraining documents, which are read as full windows. Remove data.pack.")
    return open_prepared(path, block_size, cfg.run.seed, pack=cfg.data.pack)


def _open_mixture(cfg, block_size: int):
    from dsgpt.config import resolve_path
    from dsgpt.data.builtin import BUILTIN
    from dsgpt.data.mixture import MixedData
    if cfg.data.path != BUILTIN or cfg.data.pack is not None:
        raise UserError("data.mix lists the run's data dirs, so data.path and data.pack must be left unset "
                        f"(data.path is '{cfg.data.path}'). Put that dir into data.mix with a weight, or remove data.mix.")
    sources, names = [], set()
    for entry in cfg.data.mix:
        path = resolve_path(entry.path)
        name = entry.name or path.name
        if name in names:
            raise UserError(f"data.mix names two sources '{name}'; give each a distinct name: "
                            "{path: DIR, weight: W, name: NAME}.")
        names.add(name)
        sources.append((name, path, entry.weight))
    return MixedData(sources, block_size, cfg.run.seed)
