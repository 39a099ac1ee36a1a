"""Read a chat data dir (dsgpt prepare --chat) as SFT batches with the trainer's data interface.

An example of n tokens gives n - 1 inputs with their next-token labels (-100 where the token is
not a target). Examples are packed into rows of `block_size` inputs, first-fit in a seeded order,
none crossing a row, the rest of a row padded with label -100; or, when packing is off, one
example per row. A packed row comes with position ids that restart at 0 at each example start, from
which the model builds its block-diagonal attention (dsgpt.model), so a batch is (x, y, pos);
unpacked rows are (x, y) pairs and use plain causal attention (padding only trails the example).

The global batch of a step is rows [step * G, (step + 1) * G) of an endless sequence of epochs,
each epoch a permutation of all rows seeded by (seed, epoch); G = micro * gas * world and rank r
takes the r-th contiguous slice, as in TokenData. So a batch is a pure function of (seed, step),
and 2 ranks x micro 4 see what 1 rank x micro 8 sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dsgpt.data.dataset import _Stream, micro_pieces, open_shards, read_meta
from dsgpt.errors import UserError
from dsgpt.model import IGNORE_INDEX


class _Examples:
    """One split's examples: token ids, label flags and the offsets where each starts."""

    def __init__(self, path: Path, meta: dict, split: str, dtype: np.dtype):
        self.ids = _Stream(open_shards(path, meta[f"{split}_shards"], dtype))
        self.flags = _Stream(open_shards(path, meta[f"{split}_label_shards"], np.dtype(np.uint8)))
        info = meta[f"{split}_examples"]
        file = path / info["file"]
        n = int(info["n_examples"])
        if not file.is_file() or file.stat().st_size != (n + 1) * 8:
            raise UserError(f"{file} is missing or not the size meta.json says: the data directory is "
                            "damaged. Prepare it again with `dsgpt prepare --chat ... --overwrite`.")
        self.offsets = np.fromfile(file, dtype="<i8")
        self.lengths = np.diff(self.offsets) - 1  # inputs per example (its last token is only a target)

    def __len__(self) -> int:
        return len(self.lengths)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i as (inputs, labels), both int64 of length lengths[i]."""
        start, n = self.offsets[i : i + 1], int(self.lengths[i]) + 1
        ids, flags = self.ids.windows(start, n)[0], self.flags.windows(start, n)[0]
        return ids[:-1], np.where(flags[1:] != 0, ids[1:], IGNORE_INDEX)


def first_fit(lengths: np.ndarray, capacity: int, seed: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `capacity` tokens: each example, in an order
    seeded by `seed`, goes into the first row with room (a new row when none has)."""
    order = np.random.default_rng([seed, 0]).permutation(len(lengths))
    room = np.empty(max(1, len(lengths)), dtype=np.int64)
    rows: list[list[int]] = []
    for i in order.tolist():
        fits = np.flatnonzero(room[: len(rows)] >= lengths[i])
        if len(fits):
            j = int(fits[0])
        else:
            j = len(rows)
            rows.append([])
            room[j] = capacity
        rows[j].append(i)
        room[j] -= lengths[i]
    return rows


class SFTData:
    """A chat data dir opened for supervised fine-tuning.

    Attributes as TokenData's: path, meta, vocab_size, eos_id, block_size, seed, data_sha256,
    n_train_tokens, n_val_tokens, tokenizer_path; plus pack, n_rows and masks_labels = True."""

    masks_labels = True

    def __init__(self, path, block_size: int, seed: int, pack: bool | None = None):
        self.path = Path(path).expanduser()
        self.block_size, self.seed = int(block_size), int(seed)
        if self.block_size < 1 or self.seed < 0:
            raise UserError(f"block_size {block_size!r} must be >= 1 and the data seed {seed!r} >= 0.")
        self.meta = read_meta(self.path, "chat")
        if int(self.meta["block_size"]) > self.block_size:
            raise UserError(
                f"{self.path} was prepared for block_size {self.meta['block_size']}, longer than this "
                f"model's block_size {self.block_size}: some examples would not fit. Prepare it again with "
                f"`dsgpt prepare --chat ... --block-size {self.block_size} --overwrite`."
            )
        self.vocab_size, self.eos_id = int(self.meta["vocab_size"]), int(self.meta["eos_id"])
        self.data_sha256 = self.meta.get("data_sha256")
        self.pack = bool(self.meta.get("pack", True)) if pack is None else bool(pack)
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.train, self.val = (_Examples(self.path, self.meta, s, dtype) for s in ("train", "val"))
        self.n_train_tokens, self.n_val_tokens = self.train.ids.n_tokens, self.val.ids.n_tokens
        n = len(self.train)
        self.rows = first_fit(self.train.lengths, self.block_size, self.seed) if self.pack else [[i] for i in range(n)]
        self.n_rows = len(self.rows)
        self._perms: dict[int, np.ndarray] = {}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    # ---- training -------------------------------------------------------------------------

    def global_rows(self, step: int, n: int) -> np.ndarray:
        """The row indices of step `step`'s global batch of `n` rows: a pure function of (seed, step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        k = np.arange(step * n, (step + 1) * n, dtype=np.int64)
        epochs, places = np.divmod(k, self.n_rows)
        return np.array([self._perm(int(e))[p] for e, p in zip(epochs, places)], dtype=np.int64)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # a step spans at most a few epochs; keep the cache small
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n_rows)
        return self._perms[epoch]

    def train_micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int,
                            grad_accum_steps: int) -> list[tuple[torch.Tensor, ...]]:
        """This rank's `grad_accum_steps` micro-batches of step `step`: (x, y, pos) int64
        [micro_batch_size, block_size] when packing, else (x, y)."""
        out = []
        for mine in micro_pieces(self.global_rows, step, rank, world, micro_batch_size, grad_accum_steps):
            batch = self._batch(self.train, [self.rows[r] for r in mine])
            out.append(batch if self.pack else batch[:2])
        return out

    def _batch(self, split: _Examples, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T = len(rows), self.block_size
        x = np.full((B, T), self.eos_id, dtype=np.int64)
        y = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        for b, row in enumerate(rows):
            at = 0
            for i in row:
                xi, yi = split.pair(i)
                n = len(xi)
                x[b, at : at + n], y[b, at : at + n], pos[b, at : at + n] = xi, yi, np.arange(n)
                at += n
            pos[b, at:] = np.arange(T - at)  # the padding is one more (unlabelled) example
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos)

    # ---- validation -----------------------------------------------------------------------

    def val_share(self, n_windows: int, rank: int, world: int) -> np.ndarray:
        """Rank `rank`'s share of the fixed validation set (the first min(n_windows, all) val
        examples, whatever the rank count), padded with -1 (a fully masked row) to equal length."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        count = max(1, min(int(n_windows), len(self.val)))
        per_rank = -(-count // world)
        share = np.arange(count, dtype=np.int64)[rank * per_rank : (rank + 1) * per_rank]
        return np.concatenate([share, np.full(per_rank - len(share), -1, dtype=np.int64)])

    def val_batches(self, n_windows: int, batch_size: int, rank: int,
                    world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the val examples as (x, y) batches, one example per row (plain
        causal attention is then exact: padding only trails the example)."""
        if n_windows < 1 or batch_size < 1:
            raise ValueError("n_windows and batch_size must be >= 1")
        share = self.val_share(n_windows, rank, world)
        for i in range(0, len(share), batch_size):
            idx = share[i : i + batch_size]
            x, y, _ = self._batch(self.val, [[max(int(j), 0)] for j in idx])
            yield x, y.masked_fill(torch.from_numpy(idx < 0)[:, None], IGNORE_INDEX)
