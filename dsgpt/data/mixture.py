"""`data.mix`: pretraining on several prepared dirs at once, each with a weight.

Every row of a step's global batch first draws its source from the weights, then a window start in
that source's train split, both from generators seeded by (seed, step): the global batch stays a
pure function of (seed, step), so exact resume and "2 ranks x micro 4 = 1 rank x micro 8" hold as
for one dir. Over many steps each source's share of the training tokens tends to its weight (each
row is an independent draw: after S steps of B rows the share of a source of weight w is within
about 2·sqrt(w(1-w)/(S·B)) of w, 95% of the time).

All sources must share one tokenizer (their vocab_sha256). The mixture's data_sha256 hashes the
sources' data hashes with their weights, so a resumed run with other weights or dirs is refused.
Validation is per source (each source's own fixed windows); the run's val/loss is their
weight-averaged loss, the expected loss under the training mixture.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dsgpt.data.dataset import TokenData, micro_pieces
from dsgpt.errors import UserError


@dataclass
class Source:
    name: str
    data: TokenData
    weight: float  # normalised: the weights sum to 1


class MixedData:
    """Several TokenData dirs read as one, with TokenData's training interface."""

    masks_labels = False

    def __init__(self, sources: list[tuple[str, Path, float]], block_size: int, seed: int):
        if not sources:
            raise UserError("data.mix is empty: list at least one {path: DIR, weight: W} (or use data.path).")
        total = float(sum(w for _, _, w in sources))
        self.sources = [Source(name, TokenData(path, block_size, seed), w / total) for name, path, w in sources]
        self.block_size, self.seed = int(block_size), int(seed)
        first = self.sources[0].data
        for s in self.sources[1:]:
            mine, theirs = first.meta.get("vocab_sha256"), s.data.meta.get("vocab_sha256")
            if mine is None or mine != theirs or first.eos_id != s.data.eos_id:
                raise UserError(
                    f"data.mix: '{s.data.path}' was prepared with another tokenizer than '{first.path}' "
                    f"(vocab_sha256 {str(theirs)[:12]} vs {str(mine)[:12]}), so the same id would mean different "
                    f"text in the two. Prepare every source with one tokenizer: `dsgpt prepare ... --tokenizer "
                    f"{first.path}/tokenizer.json`.")
        self.path = first.path  # its tokenizer is every source's
        self.vocab_size, self.eos_id = first.vocab_size, first.eos_id
        self.n_train_tokens = sum(s.data.n_train_tokens for s in self.sources)
        self.n_val_tokens = sum(s.data.n_val_tokens for s in self.sources)
        weights = [(s.data.data_sha256, round(s.weight, 12)) for s in self.sources]
        self.data_sha256 = hashlib.sha256(json.dumps(weights).encode()).hexdigest()
        self.meta = {"kind": "tokens", "data_sha256": self.data_sha256, "vocab_sha256": first.meta.get("vocab_sha256"),
                     "mix": [{"name": s.name, "path": str(s.data.path), "weight": s.weight,
                              "data_sha256": s.data.data_sha256} for s in self.sources]}
        self._p = np.array([s.weight for s in self.sources])

    @property
    def tokenizer_path(self) -> Path:
        return self.sources[0].data.tokenizer_path

    # ---- training -------------------------------------------------------------------------

    def global_rows(self, step: int, n: int) -> np.ndarray:
        """int64 [n, 2]: (source index, window start) of each row of step `step`'s global batch."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        which = np.random.default_rng([self.seed, int(step), 1]).choice(len(self.sources), size=n, p=self._p)
        rows = np.zeros((n, 2), dtype=np.int64)
        rows[:, 0] = which
        for k, s in enumerate(self.sources):
            mine = np.flatnonzero(which == k)
            if len(mine):
                rng = np.random.default_rng([self.seed, int(step), 2, k])
                rows[mine, 1] = rng.integers(0, s.data.train.n_tokens - self.block_size, size=len(mine))
        return rows

    def train_micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int,
                            grad_accum_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """As TokenData's: this rank's micro-batches of step `step`, (x, y) [micro, block_size]."""
        out = []
        for rows in micro_pieces(self.global_rows, step, rank, world, micro_batch_size, grad_accum_steps):
            tokens = np.empty((len(rows), self.block_size + 1), dtype=np.int64)
            for k, s in enumerate(self.sources):
                mine = np.flatnonzero(rows[:, 0] == k)
                if len(mine):
                    tokens[mine] = s.data.train.windows(rows[mine, 1], self.block_size + 1)
            t = torch.from_numpy(tokens)
            out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        return out

    def source_shares(self, first_step: int, last_step: int, rows_per_step: int) -> np.ndarray:
        """Each source's share of the rows of steps [first_step, last_step] (0-based step indices)."""
        counts = np.zeros(len(self.sources))
        for step in range(first_step, last_step + 1):
            counts += np.bincount(self.global_rows(step, rows_per_step)[:, 0], minlength=len(self.sources))
        return counts / counts.sum()

    def epochs(self, steps: int, tokens_per_step: int) -> dict[str, float]:
        """How many passes over each source's train tokens `steps` steps make, in expectation."""
        return {s.name: steps * tokens_per_step * s.weight / max(1, s.data.n_train_tokens) for s in self.sources}

    # ---- validation -----------------------------------------------------------------------

    def val_batches(self, n_windows: int, batch_size: int, rank: int,
                    world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every source's validation windows in turn (samples, `dsgpt eval` over the whole mixture)."""
        for s in self.sources:
            yield from s.data.val_batches(n_windows, batch_size, rank, world)


def weighted_val(losses: dict[str, float], sources: list[Source]) -> float:
    """The run's val/loss: the sources' losses averaged with the mixture's weights."""
    return float(sum(s.weight * losses[s.name] for s in sources))
