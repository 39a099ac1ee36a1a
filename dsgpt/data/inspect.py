"""`dsgpt inspect DATA_DIR`: the prepare report again, and a few random documents decoded from the
shards, exactly as the model reads them (tokens -> text, special tokens shown).

Documents are drawn uniformly (seeded) from one split. In a pretraining dir a document is the run
of tokens up to and including its EOS; in a chat dir, an example between two offsets of
`<split>_examples.bin`. The shards are read in chunks, twice (count, then collect), so memory does
not grow with the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsgpt.data.clean.report import read_report, summary_lines
from dsgpt.errors import UserError

_CHUNK = 1 << 24  # tokens scanned at a time


def inspect_lines(data_dir, n: int = 3, seed: int = 0, split: str = "train", max_chars: int = 2000) -> list[str]:
    from dsgpt.data.dataset import open_shards, read_meta
    from dsgpt.data.prepared import data_kind
    from dsgpt.data.tokenizer import load_tokenizer

    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"--n {n!r} must be a number of documents >= 0.")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed {seed!r} must be a non-negative integer.")
    if split not in ("train", "val"):
        raise UserError(f"--split {split!r} must be train or val.")
    if max_chars < 1:
        raise UserError(f"--max-chars {max_chars!r} must be >= 1.")
    path = Path(data_dir).expanduser()
    kind = data_kind(path)
    meta = read_meta(path, kind)
    lines = [f"{path}: {kind} data, vocab {meta['vocab_size']}, {meta['n_train_tokens']:,} train + "
             f"{meta['n_val_tokens']:,} val tokens, data sha256 {meta['data_sha256'][:12]}"]
    report = read_report(path)
    if report is None:
        lines.append("(no report.json: this directory was prepared before prepare wrote reports, or holds chat data)")
    else:
        lines += summary_lines(report)
        if report.get("histogram_png"):
            lines.append(f"length histogram: {path / report['histogram_png']}")
    if not n:
        return lines
    tok = load_tokenizer(path / "tokenizer.json")
    arrays = open_shards(path, meta[f"{split}_shards"], np.dtype(meta["dtype"]).newbyteorder("<"))
    if kind == "chat":
        docs, total = _chat_examples(path, meta, split, arrays, n, seed)
        what = "example"
    else:
        docs, total = _documents(arrays, int(meta["eos_id"]), n, seed)
        what = "document"
    lines.append(f"{len(docs)} random {what}(s) of {total:,} in {split} (seed {seed}), decoded as the model reads them:")
    for index, ids in docs:
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        more = len(text) - max_chars
        lines.append(f"--- {split} {what} {index:,} ({len(ids):,} tokens) ---")
        lines.append(text[:max_chars] + (f"\n[... {more:,} more characters]" if more > 0 else ""))
    return lines


def _chunks(arrays):
    """(global offset, tokens) pieces of the split, in order."""
    offset = 0
    for arr in arrays:
        for start in range(0, len(arr), _CHUNK):
            piece = np.asarray(arr[start : start + _CHUNK])
            yield offset + start, piece
        offset += len(arr)


def _documents(arrays, eos: int, n: int, seed: int):
    """n random EOS-terminated documents of a split (a last one without EOS counts too)."""
    total = last = 0
    for _, piece in _chunks(arrays):
        total += int(np.count_nonzero(piece == eos))
        last = int(piece[-1]) if len(piece) else last
    if sum(len(a) for a in arrays) and last != eos:
        total += 1  # a split that ends inside a document (one document cut into train and val)
    chosen = _choose(total, n, seed)
    wanted, found = set(chosen), {}
    doc, parts = 0, []
    for _, piece in _chunks(arrays):
        ends = np.flatnonzero(piece == eos)
        begin = 0
        for end in ends.tolist():
            if doc in wanted:
                parts.append(piece[begin : end + 1])
                found[doc] = np.concatenate(parts)
            parts, doc, begin = [], doc + 1, end + 1
        if doc in wanted and begin < len(piece):
            parts.append(piece[begin:])
        if len(found) == len(wanted):
            break
    if doc in wanted and doc not in found and parts:
        found[doc] = np.concatenate(parts)
    return [(i, found[i]) for i in chosen if i in found], total


def _chat_examples(path: Path, meta: dict, split: str, arrays, n: int, seed: int):
    offsets = np.fromfile(path / meta[f"{split}_examples"]["file"], dtype="<i8")
    total = max(len(offsets) - 1, 0)
    return [(i, _read_range(arrays, int(offsets[i]), int(offsets[i + 1]))) for i in _choose(total, n, seed)], total


def _read_range(arrays, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the split, across shard ends."""
    parts, offset = [], 0
    for arr in arrays:
        lo, hi = max(start - offset, 0), min(stop - offset, len(arr))
        if lo < hi:
            parts.append(np.asarray(arr[lo:hi]))
        offset += len(arr)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _choose(total: int, n: int, seed: int) -> list[int]:
    if not total:
        return []
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(total, size=min(n, total), replace=False).tolist())
