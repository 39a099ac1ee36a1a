"""Read prepared token shards: stateless train batches and fixed validation windows.

The train batch of a step is a pure function of (seed, step): the window starts of the whole
global batch come from `np.random.default_rng([seed, step])`, and each rank takes a contiguous
slice of them, cut into consecutive micro-batches. So a resumed run sees exactly the batches it
would have seen, and the same step gives the same sequences whatever the split into ranks and
micro-steps (2 ranks x micro 4 == 1 rank x micro 8 == 1 rank x micro 4 x GAS 2).

The validation set is a fixed list of evenly spaced windows that does not depend on the number
of ranks; each rank evaluates an equal-length share of it, padded with fully masked windows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dsgpt.data.prepare import FORMAT_VERSION, READABLE_TOKEN_VERSIONS
from dsgpt.errors import UserError
from dsgpt.model import IGNORE_INDEX

_PREPARE_HINT = "run `dsgpt prepare --input FILES --out {path} --vocab-size N` to create it"


class _Stream:
    """One split's shards seen as one long array of tokens (windows may cross shard ends)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)
        self.starts = self.ends - np.array([len(a) for a in arrays], dtype=np.int64)
        self.n_tokens = int(self.ends[-1]) if arrays else 0

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 [len(starts), length]: the tokens at [s, s + length) for each start s."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts.tolist()):
            filled = 0
            shard = int(np.searchsorted(self.ends, start, side="right"))
            while filled < length:
                offset = start + filled - int(self.starts[shard])
                piece = self.arrays[shard][offset : offset + length - filled]
                out[row, filled : filled + len(piece)] = piece
                filled += len(piece)
                shard += 1
        return out


class TokenData:
    """A prepared data directory (see dsgpt.data.prepare) opened for training.

    Attributes: path, meta, vocab_size, eos_id, block_size, seed, n_train_tokens, n_val_tokens.
    """

    masks_labels = False  # every window predicts every token: a step's token count needs no collective

    def __init__(self, path, block_size: int, seed: int):
        self.path = Path(path).expanduser()
        self.block_size = int(block_size)
        self.seed = int(seed)
        if self.block_size < 1:
            raise UserError(f"block_size {block_size!r} must be a positive number of tokens.")
        if self.seed < 0:
            raise UserError(f"The data seed {seed!r} must be a non-negative integer.")
        self.meta = self._read_meta()
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"])
        self.data_sha256 = self.meta.get("data_sha256")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.train = _Stream(self._open("train"))
        self.val = _Stream(self._open("val"))
        self.n_train_tokens, self.n_val_tokens = self.train.n_tokens, self.val.n_tokens
        for split, stream in (("train", self.train), ("val", self.val)):
            if stream.n_tokens == 0:
                raise UserError(
                    f"The {split} split of {self.path} holds no tokens. Prepare it again from more "
                    "than one document (" + _PREPARE_HINT.format(path=self.path) + ")."
                )
            if stream.n_tokens < self.block_size + 1:
                raise UserError(
                    f"The {split} split of {self.path} has {stream.n_tokens} tokens, fewer than "
                    f"block_size + 1 = {self.block_size + 1} needed for one training window. Use a "
                    "smaller model block_size, or prepare more text (a larger --val-fraction for val)."
                )

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def _read_meta(self) -> dict:
        return read_meta(self.path, "tokens")

    def _open(self, split: str) -> list[np.ndarray]:
        return open_shards(self.path, self.meta[f"{split}_shards"], self.dtype)

    # ---- training -------------------------------------------------------------------------

    def global_starts(self, step: int, n: int) -> np.ndarray:
        """The `n` window starts of step `step`'s global batch: a pure function of (seed, step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, int(step)])
        # high is exclusive, so start + block_size + 1 <= n_train_tokens.
        return rng.integers(0, self.train.n_tokens - self.block_size, size=n, dtype=np.int64)

    def train_micro_batches(
        self, step: int, rank: int, world: int, micro_batch_size: int, grad_accum_steps: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `grad_accum_steps` micro-batches of step `step`, each (x, y) int64
        [micro_batch_size, block_size] with y = x shifted by one token; the split of the step's
        global batch into ranks and micro-steps is `micro_pieces`'s."""
        return [_pair(self.train.windows(starts, self.block_size + 1))
                for starts in micro_pieces(self.global_starts, step, rank, world, micro_batch_size, grad_accum_steps)]

    # ---- validation -----------------------------------------------------------------------

    def val_starts(self, n_windows: int) -> np.ndarray:
        """Starts of the fixed validation set: `n_windows` windows (fewer if the val split is
        short), evenly spaced over the val split, never overlapping.

        A function of the val split, block_size and n_windows alone, never of the number of
        ranks: the validation loss is the same on 1 rank, on N ranks and in launch/eval.py."""
        available = (self.val.n_tokens - 1) // self.block_size  # >= 1: checked when opened
        count = max(1, min(int(n_windows), available))
        stride = available // count
        return np.arange(count, dtype=np.int64) * stride * self.block_size

    def val_share(self, n_windows: int, rank: int, world: int) -> np.ndarray:
        """Rank `rank`'s share of val_starts(n_windows): a contiguous slice of ceil(count / world)
        starts, padded with -1 (a window whose labels are all masked) to that length.

        Every rank gets a share of the same length, so the same number of forwards: under ZeRO-3
        each forward is a collective, and a rank with one batch more would wait forever."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        starts = self.val_starts(n_windows)
        per_rank = -(-len(starts) // world)
        share = starts[rank * per_rank : (rank + 1) * per_rank]
        return np.concatenate([share, np.full(per_rank - len(share), -1, dtype=np.int64)])

    def val_batches(
        self, n_windows: int, batch_size: int, rank: int, world: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the validation set (see val_share) as (x, y) batches of up to
        `batch_size` windows (the last may be smaller). Padding windows have every label -100,
        so they add no tokens to the summed loss."""
        if n_windows < 1 or batch_size < 1:
            raise ValueError("n_windows and batch_size must be >= 1")
        share = self.val_share(n_windows, rank, world)
        for i in range(0, len(share), batch_size):
            yield self._val_batch(share[i : i + batch_size])

    def _val_batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pad = starts < 0
        # A padding window still needs real token ids for the forward; its labels are masked.
        x, y = _pair(self.val.windows(np.where(pad, 0, starts), self.block_size + 1))
        return x, y.masked_fill(torch.from_numpy(pad)[:, None], IGNORE_INDEX)


def read_meta(path: Path, kind: str) -> dict:
    """meta.json of a prepared dir, checked to be readable as `kind` ("tokens": pretraining windows,
    "chat": SFT examples); a UserError saying how to fix anything else."""
    chat = kind == "chat"
    hint = (f"run `dsgpt prepare --chat --input FILE.jsonl --out {path} --block-size N --vocab-size N`"
            if chat else _PREPARE_HINT.format(path=path))
    if not path.is_dir():
        raise UserError(f"Data directory {path} does not exist: {hint}, or fix the data path.")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{path} has no meta.json, so it is not a prepared dsgpt data directory: {hint}.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{meta_path} is not valid JSON ({err}): {hint} again (with --overwrite).") from None
    version = meta.get("format_version")
    readable = (FORMAT_VERSION,) if chat else READABLE_TOKEN_VERSIONS
    if version not in readable:
        raise UserError(
            f"{meta_path} has data format_version {version!r}, but this dsgpt reads {kind} data of "
            f"version {' or '.join(map(str, readable))}"
            + (" (chat labels and example starts came with version 2)" if chat and version == 1 else "")
            + f": it was prepared by another dsgpt version. Prepare it again with this one: {hint} (with --overwrite)."
        )
    found = meta.get("kind", "tokens")
    if found != kind:
        what = {"chat": "chat (SFT) examples", "tokens": "pretraining token windows"}
        raise UserError(
            f"{path} holds {what.get(found, repr(found))} (meta.json kind {found!r}), but was opened as "
            f"{what[kind]}. Point the run at a directory prepared "
            + ("with `dsgpt prepare --chat`." if chat else "from plain documents (dsgpt prepare without --chat).")
        )
    return meta


def open_shards(path: Path, shards: list[dict], dtype: np.dtype) -> list[np.ndarray]:
    """Memory maps of a split's shard files, each checked against its size in meta."""
    arrays = []
    for shard in shards:
        file = path / shard["file"]
        expected = int(shard["n_tokens"]) * dtype.itemsize
        size = file.stat().st_size if file.is_file() else None
        if size != expected:
            raise UserError(
                f"Shard {file} is {'missing' if size is None else f'{size} bytes'}, but meta.json "
                f"says {expected} bytes: the data directory is damaged. Prepare it again (the "
                "`dsgpt prepare` command that made it, with --overwrite)."
            )
        if expected:
            arrays.append(np.memmap(file, dtype=dtype, mode="r"))
    return arrays


def micro_pieces(global_items, step: int, rank: int, world: int, micro_batch_size: int,
                 grad_accum_steps: int) -> list[np.ndarray]:
    """This rank's micro-steps of step `step`, each a piece of `global_items(step, n)` (the whole
    step's n = micro * gas * world items): rank r owns the contiguous slice
    [r * micro * gas, (r + 1) * micro * gas), and its micro-step i is piece i of that slice. So
    the global batch is the same however it is split across ranks and micro-steps."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if micro_batch_size < 1 or grad_accum_steps < 1:
        raise ValueError("micro_batch_size and grad_accum_steps must be >= 1")
    per_rank = micro_batch_size * grad_accum_steps
    mine = global_items(step, per_rank * world)[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(grad_accum_steps)]


def _pair(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(tokens)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
