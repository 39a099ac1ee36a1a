"""Bits per byte over whole validation documents: a tokenizer-independent language-model score.

bpb = sum of nats over the scored tokens / (ln 2 * UTF-8 bytes of the documents' text). Each
document is scored as it appears in the val shards (its tokens, then its EOS), conditioned on a
leading EOS: the boundary the model saw before every training document. The EOS counts as 0 bytes;
a document's bytes are those of its decoded text (`len(tok.decode(ids).encode())`): decoding a
whole document is exact for any tokenizer, where summing per-token byte strings would have to
undo each tokenizer's byte alphabet.

A document longer than the context is scored with a sliding window of block_size tokens moved by
`stride` (default block_size // 2): the first window scores all its targets, each later window
only its last `stride`, so every target is scored once, with at least block_size - stride tokens
of context (all of them when there are fewer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

_SCAN = 1 << 20  # tokens read at a time when looking for document ends


@dataclass
class BpbResult:
    bpb: float
    nats: float
    bytes: int
    tokens: int
    documents: int
    stride: int


def val_documents(data, max_docs: Optional[int] = None) -> Iterator[np.ndarray]:
    """The val split's documents in order, each as its token ids without the trailing EOS.

    Reads the shards in bounded pieces, so `max_docs` bounds the work on a large val split too. A
    trailing piece with no EOS after it (a split that did not end a document) is left out."""
    eos, done, carry = data.eos_id, 0, []
    for shard in data.val.arrays:
        for begin in range(0, len(shard), _SCAN):
            piece = np.asarray(shard[begin:begin + _SCAN], dtype=np.int64)
            start = 0
            for end in np.flatnonzero(piece == eos).tolist():
                yield np.concatenate(carry + [piece[start:end]])
                carry, start, done = [], end + 1, done + 1
                if max_docs is not None and done >= max_docs:
                    return
            carry.append(piece[start:])


def windows(n_targets: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(a, b, new) for each window over a sequence whose targets are positions 1..n_targets: the
    window feeds tokens [a, b) and scores its last `new` targets, b - new + 1 .. b."""
    out, b = [], min(block_size, n_targets)
    out.append((0, b, b))
    while b < n_targets:
        nb = min(b + stride, n_targets)
        out.append((nb - block_size, nb, nb - b))
        b = nb
    return out


@torch.no_grad()
def document_nats(model, ids: np.ndarray, eos_id: int, block_size: int, stride: int, device,
                  batch_size: int = 16) -> tuple[float, int]:
    """(summed nats, tokens scored) of one document followed by EOS, given a leading EOS."""
    seq = torch.from_numpy(np.concatenate([[eos_id], ids, [eos_id]]).astype(np.int64))
    spans = windows(len(seq) - 1, block_size, stride)
    nats = 0.0
    # Every window but the first is block_size long, so they stack into batches.
    groups = [spans[:1]] + [spans[i:i + batch_size] for i in range(1, len(spans), batch_size)]
    for group in filter(None, groups):
        x = torch.stack([seq[a:b] for a, b, _ in group]).to(device)
        y = torch.stack([seq[a + 1:b + 1] for a, b, _ in group]).to(device)
        keep = torch.zeros_like(y, dtype=torch.bool)
        for row, (a, b, new) in enumerate(group):
            keep[row, b - a - new:] = True
        logits = model(x).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        nats += float(loss[keep.reshape(-1)].sum())
    return nats, len(seq) - 1


def bits_per_byte(lm, data, tok, max_docs: Optional[int] = None, stride: Optional[int] = None,
                  progress: bool = False) -> BpbResult:
    """bpb of a LoadedModel over the first `max_docs` val documents of `data` (a TokenData); on
    several ranks each takes its share of the documents (all of them in ZeRO-3 lockstep)."""
    from tqdm import tqdm
    block_size = lm.config.block_size
    stride = stride or max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride {stride} must be in [1, block_size={block_size}]")
    nats = 0.0
    n_bytes = n_tokens = n_docs = 0
    for i, ids in enumerate(tqdm(val_documents(data, max_docs), desc="bits per byte", unit="doc", total=max_docs,
                                 disable=not progress, leave=False)):
        n_docs += 1
        if not lm.owns(i):
            continue
        doc_nats, doc_tokens = document_nats(lm.forward, ids, data.eos_id, block_size, stride, lm.device)
        nats += doc_nats
        n_tokens += doc_tokens
        n_bytes += len(tok.decode(ids.tolist()).encode("utf-8"))
    nats, n_bytes, n_tokens = lm.sum([nats, float(n_bytes), float(n_tokens)])
    bpb = nats / (math.log(2) * n_bytes) if n_bytes else float("nan")
    return BpbResult(bpb=bpb, nats=nats, bytes=int(n_bytes), tokens=int(n_tokens), documents=n_docs, stride=stride)
