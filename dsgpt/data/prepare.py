"""Turn documents into memory-mappable token shards, a tokenizer.json and a meta.json.

Two passes over the inputs: (1) train a BPE on a bounded sample (skipped when a tokenizer is
given), (2) encode in batches and append to shard files, keeping only one batch in memory.
Everything is written into a hidden temp dir next to `out_dir` and renamed into place at the
end, so `out_dir` either holds a complete dataset or nothing new.

Layout of out_dir:
  train_00000.bin ...  raw little-endian token ids (uint16 if vocab <= 65536, else uint32)
  val_00000.bin ...    same, for the validation split
  tokenizer.json       the tokenizer's canonical JSON (its sha256 is meta's tokenizer_sha256)
  meta.json            counts, shard list with per-shard sha256, provenance
Every document is followed by one EOS token; a document's tokens may span two shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from dsgpt.data.sources import check_inputs, iter_documents
from dsgpt.data.tokenizer import configured_eos, eos_id, load_tokenizer, tokenizer_hash, train_bpe, vocab_hash
from dsgpt.errors import UserError
from dsgpt.io import check_output_dir, move_into_place, temp_dir_beside

# --overwrite replaces only a prepared dataset, recognised by its meta.json.
_OUT_DIR = dict(marker="meta.json", kind="a dsgpt data directory", flag="--out")

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_BATCH_DOCS = 1024  # documents per encode_batch call (the tokenizer parallelises over them)
_BATCH_BYTES = 2 << 20  # ...or fewer, once a batch holds this much text
_FLUSH_TOKENS = 1 << 20  # at most this many tokens wait in memory per split


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare(
    inputs,
    out_dir,
    vocab_size: int | None = None,
    tokenizer=None,
    val_fraction: float = 0.005,
    seed: int = 1234,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    sample_bytes: int = 50_000_000,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Prepare `inputs` (see sources.iter_documents) into `out_dir`; returns the meta dict.

    Give exactly one of `vocab_size` (train a byte-level BPE of that size on the first
    `sample_bytes` of text) or `tokenizer` (a HF tokenizer dir or tokenizer.json)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(i) for i in inputs]
    check_inputs(inputs)  # fail on a typo before any slow work
    recorded = [str(Path(i).expanduser().resolve()) if Path(i).expanduser().exists() else i for i in inputs]
    return prepare_documents(
        lambda: iter_documents(inputs, text_field),
        out_dir,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        val_fraction=val_fraction,
        seed=seed,
        shard_tokens=shard_tokens,
        sample_bytes=sample_bytes,
        progress=progress,
        overwrite=overwrite,
        extra_meta={"inputs": recorded, "text_field": text_field},
    )


def prepare_documents(
    make_documents: Callable[[], Iterable[str]],
    out_dir,
    *,
    vocab_size: int | None = None,
    tokenizer=None,
    val_fraction: float = 0.005,
    seed: int = 1234,
    shard_tokens: int = 100_000_000,
    sample_bytes: int = 50_000_000,
    progress: bool = True,
    overwrite: bool = False,
    extra_meta: dict | None = None,
) -> dict:
    """`prepare` for any source of documents: `make_documents()` must return a fresh iterator
    over the same documents each time it is called (it is read once or twice)."""
    out_dir = Path(out_dir).expanduser()
    _check_args(vocab_size, tokenizer, val_fraction, seed, shard_tokens, sample_bytes)
    check_output_dir(out_dir, overwrite, **_OUT_DIR)
    tmp = temp_dir_beside(out_dir)
    try:
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            eos = eos_id(tok, configured_eos(tokenizer))
            source = str(Path(tokenizer).expanduser().resolve())
        else:
            _say(progress, f"training a byte-level BPE (vocab {vocab_size}) on up to {sample_bytes / 1e6:g} MB of text")
            tok = train_bpe(make_documents(), vocab_size, sample_bytes)
            eos, source = eos_id(tok), "trained"
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab)
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens, vocab) for s in SPLITS}
        counts = _encode_all(make_documents(), tok, eos, writers, val_fraction, seed, progress)
        for w in writers.values():
            w.close()
        shards = {s: writers[s].shards for s in SPLITS}
        tok_json = tok.to_str()
        _write_file(tmp / "tokenizer.json", tok_json.encode("utf-8"))
        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": vocab,
            "requested_vocab_size": vocab_size,
            "dtype": dtype.name,
            "eos_id": eos,
            "n_train_tokens": sum(s["n_tokens"] for s in shards["train"]),
            "n_val_tokens": sum(s["n_tokens"] for s in shards["val"]),
            **counts,
            "train_shards": shards["train"],
            "val_shards": shards["val"],
            "tokenizer_source": source,
            "tokenizer_sha256": tokenizer_hash(tok),
            "vocab_sha256": vocab_hash(tok),  # what train.init_from's tokenizer check names
            "data_sha256": data_hash(shards["train"] + shards["val"]),
            "seed": seed,
            "val_fraction": val_fraction,
            **(extra_meta or {}),
        }
        _write_file(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"wrote {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens to {out_dir}")
    return meta


def data_hash(shards: list[dict]) -> str:
    """sha256 over the shard list written the way `sha256sum` prints it ("<sha256>  <file>\\n"
    per shard, train then val), so `sha256sum *.bin` can be checked against meta by hand."""
    listing = "".join(f"{s['sha256']}  {s['file']}\n" for s in shards)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def in_val(seed: int, index: int, val_fraction: float) -> bool:
    """Whether document `index` belongs to the validation split: a hash of (seed, index), so the
    split is deterministic, independent of document content and needs no look-ahead."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def _check_args(vocab_size, tokenizer, val_fraction, seed, shard_tokens, sample_bytes) -> None:
    if (vocab_size is None) == (tokenizer is None):
        raise UserError(
            "Give exactly one of a vocabulary size (--vocab-size N: train a new BPE tokenizer) or "
            "an existing tokenizer (--tokenizer DIR); "
            + ("both were given." if vocab_size is not None else "neither was given.")
        )
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction!r} must be between 0 and 1 (exclusive), e.g. 0.005.")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed {seed!r} must be a non-negative integer.")
    if shard_tokens < 1 or sample_bytes < 1:
        raise UserError("shard_tokens and sample_bytes must be positive.")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _batches(documents: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """Groups of documents for encode_batch, with their UTF-8 size in bytes."""
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc.encode("utf-8"))
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def _encode_all(documents, tok, eos, writers, val_fraction, seed, progress) -> dict:
    """Encode and write every document; returns the document counts for meta."""
    from tqdm import tqdm

    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: skips offsets
    n_docs = 0
    n_tokens = 0
    # The last document is held back so it can be routed to whichever split would otherwise be
    # empty: a deterministic split that still guarantees both splits when there are >= 2 docs.
    pending = None
    bar = tqdm(
        desc="encode", unit="B", unit_scale=True, disable=not progress or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    try:
        for batch, size in _batches(documents):
            for enc in encode(batch, add_special_tokens=False):
                ids = enc.ids
                ids.append(eos)
                if pending is not None:
                    _write_doc(writers, pending, val_fraction, seed)
                pending = (n_docs, ids)
                n_docs += 1
                n_tokens += len(ids)
            for w in writers.values():  # drop this batch's id lists before the next batch
                w.flush()
            bar.update(size)
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - start, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
    finally:
        bar.close()
    if pending is None:
        raise UserError(
            "The inputs hold no documents (all files or records were empty). Check --input and, "
            "for JSONL/parquet/datasets, that --text-field names the column with the text."
        )
    _, ids = pending
    train, val = writers["train"], writers["val"]
    split = "by_document"
    if n_docs == 1:
        # One document (e.g. a single book in one .txt): give val the tail of its tokens.
        cut = len(ids) - max(1, round(len(ids) * val_fraction))
        train.add(ids[:cut], new_doc=True)
        val.add(ids[cut:], new_doc=True)
        split = "single_document_tail"
    elif val.n_docs == 0:
        val.add(ids, new_doc=True)
    elif train.n_docs == 0:
        train.add(ids, new_doc=True)
    else:
        _write_doc(writers, pending, val_fraction, seed)
    return {"n_documents": n_docs, "n_train_documents": train.n_docs, "n_val_documents": val.n_docs, "split_method": split}


def _write_doc(writers, doc, val_fraction, seed) -> None:
    index, ids = doc
    writers["val" if in_val(seed, index, val_fraction) else "train"].add(ids, new_doc=True)


class _ShardWriter:
    """Appends token ids to `<split>_NNNNN.bin` files of at most `shard_tokens` each, hashing
    the bytes as they are written."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, vocab_size: int):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        self.shards: list[dict] = []
        self.n_docs = 0
        self._lists: list[list[int]] = []  # the encoder's own id lists: no copy until flush
        self._buffered = 0
        self._file = None

    def add(self, ids: list[int], new_doc: bool) -> None:
        self.n_docs += new_doc
        self._lists.append(ids)
        self._buffered += len(ids)
        if self._buffered >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        arr = np.fromiter(itertools.chain.from_iterable(self._lists), dtype=np.int64, count=self._buffered)
        self._lists, self._buffered = [], 0
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise RuntimeError(f"tokenizer produced id {arr.max()} outside its vocabulary of {self.vocab_size}")
        arr = arr.astype(self.dtype.newbyteorder("<"))
        while len(arr):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self._file = open(self.folder / name, "wb")
                self._hash = hashlib.sha256()
                self.shards.append({"file": name, "n_tokens": 0})
            room = self.shard_tokens - self.shards[-1]["n_tokens"]
            piece, arr = arr[:room], arr[room:]
            data = piece.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["n_tokens"] += len(piece)
            if self.shards[-1]["n_tokens"] == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards[-1]["sha256"] = self._hash.hexdigest()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._close_shard()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp dir to `out_dir`; with overwrite, the old dir is moved aside
    first and deleted only once the new one is in place."""
    check_output_dir(out_dir, overwrite, **_OUT_DIR)  # again: something may have appeared meanwhile
    try:
        move_into_place(tmp, out_dir)
    except OSError as err:
        raise UserError(f"Could not move the prepared data into {out_dir}: {err}. Was another prepare writing there?") from None
