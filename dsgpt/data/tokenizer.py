"""Tokenizers: train a byte-level BPE on a bounded sample, or load a local Hugging Face one.

We use the `tokenizers` library for both: it is what HF models ship, so a trained tokenizer
exports as is (tokenizer.json) and a user's existing one loads without `transformers`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsgpt.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# Names that various model families give their end-of-text token, most common first.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "<|im_end|>", "[EOS]")
MIN_VOCAB = 257  # 256 byte tokens + the EOS token


def train_bpe(documents: Iterable[str], vocab_size: int, sample_bytes: int = 50_000_000,
              special_tokens: Iterable[str] = ()) -> Tokenizer:
    """Train a byte-level BPE with the special token `<|endoftext|>` (id 0), then `special_tokens`
    (ids 1, 2, ...: chat role markers), on the first `sample_bytes` of `documents`. BPE keeps all
    its pair counts in memory, so the sample (not the corpus) bounds memory; the corpus itself is
    then encoded in a streaming pass."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocab_size {vocab_size!r} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            "tokens (256 bytes + <|endoftext|>). Pick a larger --vocab-size, e.g. 2048 or 32000."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, *(t for t in special_tokens if t != EOS_TOKEN)],
        # All 256 bytes up front: every input encodes, even bytes the sample never showed.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_bounded(documents, sample_bytes), trainer=trainer)
    return tok


def _bounded(documents: Iterable[str], sample_bytes: int) -> Iterator[str]:
    """The documents up to `sample_bytes` UTF-8 bytes in all; the last one is cut to fit."""
    left = sample_bytes
    for doc in documents:
        if left <= 0:
            return
        size = len(doc.encode("utf-8"))
        if size > left:
            # Cutting by characters is close enough: the budget is a memory bound, not exact.
            doc = doc[:left]
        left -= min(size, left)
        yield doc


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer from a HF tokenizer directory (its tokenizer.json) or a tokenizer.json file."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            raise UserError(
                f"Tokenizer directory {path} has no tokenizer.json. Only 'fast' tokenizers are "
                "supported: load it with transformers.AutoTokenizer and save_pretrained() it again "
                "to write tokenizer.json, or train one with --vocab-size."
            )
        raise UserError(f"Tokenizer {path} does not exist. Pass a tokenizer directory or tokenizer.json file.")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for bad JSON
        raise UserError(f"Cannot load tokenizer {file}: {err}. Check that it is a tokenizers JSON file.") from None


def configured_eos(path) -> str | None:
    """The EOS token a HF tokenizer directory declares in tokenizer_config.json, if any."""
    path = Path(path).expanduser()
    config = path / "tokenizer_config.json" if path.is_dir() else path.with_name("tokenizer_config.json")
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # older transformers write AddedToken as a dict
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def eos_id(tok: Tokenizer, preferred: str | None = None) -> int:
    """The id of the end-of-text token: `preferred` if given and known, else the first of the
    usual names that the vocabulary has."""
    for name in ((preferred,) if preferred else ()) + EOS_CANDIDATES:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    raise UserError(
        f"The tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}). Documents "
        "are separated by EOS, so use a tokenizer that has one, or train one with --vocab-size."
    )


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (the bytes prepare writes as tokenizer.json)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def vocab_hash(tok: Tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, special tokens included) as sorted compact JSON.

    What decides whether a model's embedding rows fit a tokenizer. Unlike `tokenizer_hash` it does
    not change when a tool rewrites other parts of tokenizer.json (transformers' save_pretrained
    adds a post-processor), so a tokenizer has the same vocab hash in a data dir and an HF dir."""
    canonical = json.dumps(tok.get_vocab(with_added_tokens=True), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def added_ids(source: Tokenizer, target: Tokenizer, source_name: str, target_name: str) -> list[int]:
    """The ids `target` adds to `source`, sorted; [] when the vocabularies are equal.

    `target` must equal or extend `source`: every source token keeps its id and new tokens come
    after the source's last id, so a model trained with `source` keeps the meaning of each of its
    embedding rows. Anything else is a UserError naming both vocab hashes."""
    src, tgt = source.get_vocab(with_added_tokens=True), target.get_vocab(with_added_tokens=True)
    problem = _first_conflict(src, tgt)
    if problem:
        raise UserError(
            f"The tokenizer of {target_name} (vocab sha256 {vocab_hash(target)}, {len(tgt)} tokens) "
            f"neither equals nor extends the one of {source_name} (vocab sha256 {vocab_hash(source)}, "
            f"{len(src)} tokens): {problem}. The model's embedding rows would then stand for other tokens. "
            f"Prepare the data with the source's tokenizer (dsgpt prepare --tokenizer ...), or with a copy "
            f"of it to which tokens were only appended (tokenizers' add_tokens), which keeps every id."
        )
    return sorted(set(tgt.values()) - set(src.values()))


def _first_conflict(src: dict, tgt: dict) -> str | None:
    """Why `tgt` does not extend `src`, for the first offending token; None when it does."""
    for token, token_id in sorted(src.items(), key=lambda kv: kv[1]):
        if token not in tgt:
            return f"the source's token {token!r} (id {token_id}) is missing from the new tokenizer"
        if tgt[token] != token_id:
            return f"the source's token {token!r} (id {token_id}) has id {tgt[token]} in the new tokenizer"
    last = max(src.values(), default=-1)
    for token, token_id in sorted(tgt.items(), key=lambda kv: kv[1]):
        if token not in src and token_id <= last:
            return f"the new token {token!r} has id {token_id}, inside the source's ids (up to {last}), not after them"
    return None
