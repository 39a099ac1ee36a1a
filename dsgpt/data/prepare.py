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
  report.json          what cleaning did and the document lengths (dsgpt.data.clean.report);
  lengths.png          their histogram (when matplotlib is installed)
Every document is followed by one EOS token; a document's tokens may span two shards.

Cleaning (dsgpt.data.clean, off unless asked for) runs on the document stream before everything
else: quality filters -> PII scrubbing -> exact dedup -> near dedup; then the train/val split. The
BPE is trained on the cleaned stream (a fresh pass over the first sample_bytes of it).

`prepare_chat` (dsgpt prepare --chat) writes the same layout with meta kind "chat", plus per split
  train_labels_00000.bin ...  uint8, 1 where the token at that place is a training target
  train_examples.bin          int64 offsets where each example starts, then the split's length
and chat_template.jinja; no EOS is added (the template's end-of-turn token ends each reply).
Format 2 added `kind` ("tokens" | "chat") and the chat files; format-1 token dirs are unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from dsgpt.data.clean import Cleaner, CleanSettings
from dsgpt.data.clean.report import (DEFAULT_BLOCK_SIZES, HISTOGRAM_FILE, REPORT_FILE, build_report,
                                     write_histogram)
from dsgpt.data.sources import check_inputs, compile_separator, iter_documents
from dsgpt.data.tokenizer import configured_eos, eos_id, load_tokenizer, tokenizer_hash, train_bpe, vocab_hash
from dsgpt.errors import UserError
from dsgpt.io import check_output_dir, move_into_place, temp_dir_beside

# --overwrite replaces only a prepared dataset, recognised by its meta.json.
_OUT_DIR = dict(marker="meta.json", kind="a dsgpt data directory", flag="--out")

FORMAT_VERSION = 2
READABLE_TOKEN_VERSIONS = (1, 2)  # a pretraining dir's layout did not change in 2
SPLITS = ("train", "val")
# `--chat --input builtin`: the built-in instruction set (dsgpt.data.instructions), written into
# the output dir with its held-out prompts.
BUILTIN_CHAT = "builtin"
INSTRUCTIONS_FILE, HELD_OUT_FILE = "instructions.jsonl", "held_out.jsonl"
_BATCH_DOCS = 1024  # documents per encode_batch call (the tokenizer parallelises over them)
_BATCH_BYTES = 2 << 20  # ...or fewer, once a batch holds this much text
_FLUSH_TOKENS = 1 << 20  # at most this many tokens wait in memory per split
_PROGRESS_EVERY_S = 30.0  # without a terminal, a progress line this often


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
    doc_separator: str | None = None,
    clean: CleanSettings | None = None,
    block_sizes=DEFAULT_BLOCK_SIZES,
) -> dict:
    """Prepare `inputs` (see sources.iter_documents) into `out_dir`; returns the meta dict.

    Give exactly one of `vocab_size` (train a byte-level BPE of that size on the first
    `sample_bytes` of text) or `tokenizer` (a HF tokenizer dir or tokenizer.json).
    `doc_separator` splits text files into documents at matching lines; `clean` names the
    cleaning stages to run (default: none); `block_sizes` are the candidate context lengths the
    report measures."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(i) for i in inputs]
    check_inputs(inputs)  # fail on a typo before any slow work
    compile_separator(doc_separator)
    recorded = [str(Path(i).expanduser().resolve()) if Path(i).expanduser().exists() else i for i in inputs]
    extra = {"inputs": recorded, "text_field": text_field}
    if doc_separator is not None:
        extra["doc_separator"] = doc_separator
    return prepare_documents(
        lambda: iter_documents(inputs, text_field, doc_separator),
        out_dir,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        val_fraction=val_fraction,
        seed=seed,
        shard_tokens=shard_tokens,
        sample_bytes=sample_bytes,
        progress=progress,
        overwrite=overwrite,
        extra_meta=extra,
        clean=clean,
        block_sizes=block_sizes,
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
    clean: CleanSettings | None = None,
    block_sizes=DEFAULT_BLOCK_SIZES,
) -> dict:
    """`prepare` for any source of documents: `make_documents()` must return a fresh iterator
    over the same documents each time it is called (it is read once or twice)."""
    out_dir = Path(out_dir).expanduser()
    _check_args(vocab_size, tokenizer, val_fraction, seed, shard_tokens, sample_bytes)
    block_sizes = _check_block_sizes(block_sizes)
    settings = clean if clean is not None else CleanSettings()
    check_output_dir(out_dir, overwrite, **_OUT_DIR)

    def documents() -> tuple[Cleaner, Iterable[str]]:
        # A fresh Cleaner per pass: dedup remembers what it has seen.
        cleaner = Cleaner(settings)
        return cleaner, (cleaner.run(make_documents()) if settings.enabled else make_documents())

    tmp = temp_dir_beside(out_dir)
    try:
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            eos = eos_id(tok, configured_eos(tokenizer))
            source = str(Path(tokenizer).expanduser().resolve())
        else:
            what = "cleaned text" if settings.enabled else "text"
            _say(progress, f"training a byte-level BPE (vocab {vocab_size}) on up to {sample_bytes / 1e6:g} MB of {what}")
            tok = train_bpe(documents()[1], vocab_size, sample_bytes)
            eos, source = eos_id(tok), "trained"
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab)
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens, vocab) for s in SPLITS}
        cleaner, docs = documents()
        counts, lengths = _encode_all(docs, tok, eos, writers, val_fraction, seed, progress,
                                      cleaner if settings.enabled else None)
        for w in writers.values():
            w.close()
        shards = {s: writers[s].shards for s in SPLITS}
        tok_json = tok.to_str()
        _write_file(tmp / "tokenizer.json", tok_json.encode("utf-8"))
        if not settings.enabled:
            cleaner.n_read = cleaner.n_kept = counts["n_documents"]
        report = build_report(cleaner.counts(), lengths, block_sizes, cleaner.memory(),
                              {k: counts[k] for k in ("n_train_documents", "n_val_documents", "split_method")})
        report["histogram_png"] = HISTOGRAM_FILE if write_histogram(report, tmp / HISTOGRAM_FILE, block_sizes) else None
        _write_file(tmp / REPORT_FILE, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "tokens",
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
            "cleaning": settings.to_dict() if settings.enabled else None,
            "report": REPORT_FILE,
            **(extra_meta or {}),
        }
        _write_file(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"wrote {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens to {out_dir}")
    return meta


def prepare_chat(
    inputs,
    out_dir,
    *,
    block_size: int,
    vocab_size: int | None = None,
    tokenizer=None,
    chat_template=None,
    pack: bool = True,
    val_fraction: float = 0.005,
    seed: int = 1234,
    shard_tokens: int = 100_000_000,
    sample_bytes: int = 50_000_000,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Conversation JSONL files (see dsgpt.data.chat) -> a chat data dir `out_dir`; returns meta.

    Each example keeps at most block_size + 1 tokens (block_size inputs, each with its next-token
    target). Without `chat_template` the default template is used and its role markers become
    special tokens: the first ids of a trained BPE, or appended after the last id of a given
    `tokenizer` (so a model trained with it keeps every embedding row). `pack` is recorded for the
    reader (dsgpt.data.sft): pack short examples into rows, or one padded example per row."""
    from dsgpt.data import chat

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    builtin = [str(i) == BUILTIN_CHAT and not Path(i).exists() for i in inputs]
    inputs = [Path(i).expanduser() for i in inputs]
    for path, is_builtin in zip(inputs, builtin):
        if not (path.is_file() or is_builtin):
            raise UserError(f"Chat input {path} is not a file. --chat reads JSONL files of conversations "
                            f"(or `{BUILTIN_CHAT}`: the built-in instruction set).")
    _check_args(vocab_size, tokenizer, val_fraction, seed, shard_tokens, sample_bytes)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise UserError(f"--block-size {block_size!r} must be an integer >= 2: the model's block_size, "
                        "which every example must fit.")
    template = chat.ChatTemplate.from_file(chat_template) if chat_template else chat.ChatTemplate()
    out_dir = Path(out_dir).expanduser()
    check_output_dir(out_dir, overwrite, **_OUT_DIR)

    def conversations():
        for path in inputs:
            yield from chat.read_conversations(path)

    markers = () if chat_template else chat.ROLE_MARKERS
    tmp = temp_dir_beside(out_dir)
    try:
        if any(builtin):  # written beside the shards: the user can read what the model trains on
            from dsgpt.data import instructions
            instructions.write(tmp / INSTRUCTIONS_FILE, tmp / HELD_OUT_FILE, seed=seed)
            inputs = [tmp / INSTRUCTIONS_FILE if b else p for p, b in zip(inputs, builtin)]
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            eos = eos_id(tok, configured_eos(tokenizer))
            tok.add_special_tokens([m for m in markers if tok.token_to_id(m) is None])
            source = str(Path(tokenizer).expanduser().resolve())
        else:
            _say(progress, f"training a byte-level BPE (vocab {vocab_size}) on the conversations' text")
            texts = (m["content"] for _, _, msgs in conversations() if msgs for m in msgs)
            tok = train_bpe(texts, vocab_size, sample_bytes, special_tokens=markers)
            eos, source = eos_id(tok), "trained"
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab)
        ids_w = {s: _ShardWriter(tmp, s, dtype, shard_tokens, vocab) for s in SPLITS}
        lab_w = {s: _ShardWriter(tmp, f"{s}_labels", np.dtype(np.uint8), shard_tokens, 2) for s in SPLITS}
        offsets = {s: [0] for s in SPLITS}
        skipped = dict.fromkeys(chat.SKIP_REASONS, 0)

        turn_ends: collections.Counter = collections.Counter()

        def write(split, ex):
            turn_ends.update(chat.turn_ends(ex))
            ids_w[split].add(ex.ids, new_doc=True)
            lab_w[split].add([int(b) for b in ex.labelled], new_doc=True)
            offsets[split].append(offsets[split][-1] + len(ex.ids))

        # As in _encode_all, the last example is held back for whichever split would be empty.
        pending, n = None, 0
        for _, _, messages in conversations():
            ex, reason = chat.fit(tok, template, messages, block_size + 1) if messages else (None, "empty")
            if ex is None:
                skipped[reason] += 1
                continue
            if pending is not None:
                write("val" if in_val(seed, n - 1, val_fraction) else "train", pending)
            pending, n = ex, n + 1
        if n < 2:
            raise UserError(
                f"The chat inputs gave {n} usable example(s); at least 2 are needed (one for train, one for "
                f"val). Skipped: {_skips(skipped)}. Check the files, or raise --block-size if conversations "
                "were too long to keep any reply."
            )
        if len(offsets["val"]) == 1:
            write("val", pending)
        elif len(offsets["train"]) == 1:
            write("train", pending)
        else:
            write("val" if in_val(seed, n - 1, val_fraction) else "train", pending)
        for w in (*ids_w.values(), *lab_w.values()):
            w.close()
        examples = {}
        for split in SPLITS:
            data = np.asarray(offsets[split], dtype="<i8").tobytes()
            _write_file(tmp / f"{split}_examples.bin", data)
            examples[split] = {"file": f"{split}_examples.bin", "n_examples": len(offsets[split]) - 1,
                               "sha256": hashlib.sha256(data).hexdigest()}
        _write_file(tmp / "tokenizer.json", tok.to_str().encode("utf-8"))
        _write_file(tmp / "chat_template.jinja", template.source.encode("utf-8"))
        files = [f for s in SPLITS for f in (*ids_w[s].shards, *lab_w[s].shards, examples[s])]
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "chat",
            "vocab_size": vocab,
            "requested_vocab_size": vocab_size,
            "dtype": dtype.name,
            "eos_id": eos,
            "end_of_turn_id": chat.end_of_turn(turn_ends) if chat_template else tok.token_to_id(chat.END),
            "special_tokens": list(markers),
            "block_size": block_size,
            "pack": bool(pack),
            "n_examples": n,
            "n_train_examples": examples["train"]["n_examples"],
            "n_val_examples": examples["val"]["n_examples"],
            "skipped": skipped,
            "n_train_tokens": offsets["train"][-1],
            "n_val_tokens": offsets["val"][-1],
            "train_shards": ids_w["train"].shards,
            "val_shards": ids_w["val"].shards,
            "train_label_shards": lab_w["train"].shards,
            "val_label_shards": lab_w["val"].shards,
            "train_examples": examples["train"],
            "val_examples": examples["val"],
            "chat_template": "chat_template.jinja",
            "tokenizer_source": source,
            "tokenizer_sha256": tokenizer_hash(tok),
            "vocab_sha256": vocab_hash(tok),
            "data_sha256": data_hash(files),
            "seed": seed,
            "val_fraction": val_fraction,
            "inputs": [BUILTIN_CHAT if b else str(p.resolve()) for p, b in zip(inputs, builtin)],
        }
        if any(builtin):
            meta["held_out"] = HELD_OUT_FILE
        _write_file(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"wrote {n:,} conversations ({meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val "
                   f"tokens) to {out_dir}; skipped {_skips(skipped)}")
    return meta


def _skips(skipped: dict) -> str:
    return ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in skipped.items())


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


def _check_block_sizes(block_sizes) -> tuple[int, ...]:
    sizes = tuple(block_sizes or ())
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise UserError(f"--block-sizes {','.join(map(str, sizes)) or '(none)'} must be one or more positive "
                        "integers, e.g. 128,256,512,1024,2048: the context lengths the report measures.")
    return tuple(sorted(set(sizes)))


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


def _encode_all(documents, tok, eos, writers, val_fraction, seed, progress, cleaner=None) -> tuple[dict, Counter]:
    """Encode and write every document; returns the document counts for meta and a Counter of
    document lengths in tokens (EOS not counted) for the report."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: skips offsets
    n_docs = 0
    lengths: Counter = Counter()
    # The last document is held back so it can be routed to whichever split would otherwise be
    # empty: a deterministic split that still guarantees both splits when there are >= 2 docs.
    pending = None
    meter = _Progress(progress, cleaner)
    try:
        for encodings, size in _encoded(_batches(documents), encode):
            batch_lengths = []
            for enc in encodings:
                ids = enc.ids
                batch_lengths.append(len(ids))
                ids.append(eos)
                if pending is not None:
                    _write_doc(writers, pending, val_fraction, seed)
                pending = (n_docs, ids)
                n_docs += 1
            lengths.update(batch_lengths)
            for w in writers.values():  # drop this batch's id lists before the next batch
                w.flush()
            meter.update(size, len(batch_lengths), sum(batch_lengths) + len(batch_lengths))
    finally:
        meter.close()
    if pending is None:
        if cleaner is not None and cleaner.n_read:
            from dsgpt.data.clean.report import summary_lines
            raise UserError(
                f"Cleaning dropped every one of the {cleaner.n_read:,} documents read: "
                + "; ".join(line.strip() for line in summary_lines({"cleaning": cleaner.counts(), "lengths": {}})[1:])
                + ". Loosen the thresholds in --clean-config, switch rules off, or check that the inputs "
                "are split into documents as intended (--doc-separator)."
            )
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
    counts = {"n_documents": n_docs, "n_train_documents": train.n_docs, "n_val_documents": val.n_docs,
              "split_method": split}
    return counts, lengths


class _Progress:
    """Bytes, documents/s and tokens/s of the encoding pass: a tqdm bar on a terminal, otherwise
    a line on stderr every _PROGRESS_EVERY_S seconds (long runs under Slurm or nohup)."""

    def __init__(self, enabled: bool, cleaner=None):
        from tqdm import tqdm

        self.enabled, self.cleaner = enabled, cleaner
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(desc="encode", unit="B", unit_scale=True, disable=not self.tty, dynamic_ncols=True)
        self.start = self.last = time.perf_counter()
        self.bytes = self.docs = self.tokens = 0

    def update(self, size: int, docs: int, tokens: int) -> None:
        self.bytes += size
        self.docs += docs
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self._rates(now)
        if self.tty:
            self.bar.update(size)
            self.bar.set_postfix_str(rate, refresh=False)
        elif now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            print(f"encode: {self.bytes / 1e6:,.1f} MB, {rate}", file=sys.stderr, flush=True)

    def _rates(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        read = f", {self.cleaner.n_read:,} read ({self.cleaner.n_read / elapsed:,.0f}/s)" if self.cleaner else ""
        return (f"{self.docs:,} docs ({self.docs / elapsed:,.0f} docs/s){read}, "
                f"{self.tokens / elapsed / 1e6:.2f}M tok/s")

    def close(self) -> None:
        self.bar.close()


def _encoded(batches, encode) -> Iterator[tuple[list, int]]:
    """(encodings, bytes) per batch, in order. The tokenizer encodes the next batch on a thread
    (it releases the GIL) while this one is written and the one after is read and cleaned, so
    the Python work overlaps the encoding instead of adding to it. At most two batches wait."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsgpt-encode") as pool:
        previous = None
        for batch, size in batches:
            job = (pool.submit(encode, batch, add_special_tokens=False), size)
            if previous is not None:
                yield previous[0].result(), previous[1]
            previous = job
        if previous is not None:
            yield previous[0].result(), previous[1]


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
