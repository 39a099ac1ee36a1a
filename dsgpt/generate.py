"""Autoregressive generation: greedy, temperature, top-k, top-p (nucleus) and repetition penalty;
EOS and stop strings; batches of prompts of unequal length; streaming; a seeded generator.

The next token's logits come one of two ways, which give the same tokens:

- cached (a GPT, or a DeepSpeed engine wrapping one): the prompt goes through the model once, then
  one token per step against a KV cache. Prompts of unequal length are left-padded; a mask keeps
  every token from attending to padding and each row counts its positions from its own first
  token, so a row computes exactly what its prompt computes alone.
- plain (any callable from tokens to logits): the whole context again every step.

Both see the same context: the last block_size tokens, at positions 0, 1, ... Once the text
outgrows block_size that window slides, and since positions are learned absolute embeddings,
every token's position (hence every cached key) changes each step: the cached path then rebuilds
its cache from the window each step, which costs what the plain path costs.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from dsgpt.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits. temperature 0 is greedy; top_k 0/None and
    top_p 1/None are off; repetition_penalty 1 is off, else it applies to every token of the prompt
    and of the text so far (as Hugging Face's does), even ones the window has slid past."""
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0


GREEDY = Sampling(temperature=0.0)


# ---- choosing the next token --------------------------------------------------------------------

def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty, as Hugging Face applies it: the logit of every token already in the context
    (``seen``, bool like ``logits``) is divided by ``penalty`` when positive, multiplied when negative,
    so penalty > 1 always makes a repeat less likely."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def next_token(logits: torch.Tensor, sampling: Sampling, seen: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """The next token id of each row (B,) from its logits (B, V).

    Ids >= ``vocab_size`` (the tokenizer's) are never picked: the embedding table is padded beyond
    the vocabulary, and those rows stand for no text. Draws are made on the CPU from ``generator``,
    so every rank (and every device) with the same seed draws the same tokens.
    """
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")
    if seen is not None and sampling.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, seen, sampling.repetition_penalty)
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token once the mass before it already reaches top_p (always keep the first).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


# ---- the next token's logits: plain or cached ----------------------------------------------------

def _gpt_inside(model):
    """The GPT that ``model`` is or wraps (a DeepSpeed engine's .module), else None."""
    from dsgpt.model import GPT
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, GPT) else None


class _Plain:
    """Logits of the next token from the whole window, every step."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], block_size: int):
        self.forward, self.block_size = forward, block_size

    def __call__(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if not bool(valid.all()):
            raise ValueError("prompts of unequal length need the cached path: pass a GPT (or an engine "
                             "wrapping one) with use_cache=True")
        return self.forward(tokens[:, -self.block_size:])[:, -1]


class _Cached:
    """Logits of the next token through a KV cache: only the tokens not yet in the cache go through
    the model, unless the window must slide, which rebuilds the cache from the window.

    ``model`` is called rather than the GPT inside it: a DeepSpeed engine's forward is where ZeRO-3
    gathers the parameters, and every rank calls it in lockstep.
    """

    def __init__(self, model, block_size: int, longest: int):
        from dsgpt.model import KVCache
        self.model, self.block_size = model, block_size
        self.cache = KVCache(min(block_size, longest))
        self.fed = 0  # columns of `tokens` already in the cache
        self.next_pos: Optional[torch.Tensor] = None  # (B,) position of each row's next token

    def __call__(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        new_cols = tokens.size(1) - self.fed
        if self.fed == 0 or self.cache.length + new_cols > self.cache.max_len:
            return self._rebuild(tokens, valid)
        new, new_valid = tokens[:, self.fed:], valid[:, self.fed:]
        pos = (self.next_pos[:, None] + new_valid.cumsum(-1) - 1).clamp(min=0)
        return self._feed(new, new_valid, pos, tokens.size(1))

    def _rebuild(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The window, as the plain path sees it: the last block_size columns, positions from 0."""
        window, window_valid = tokens[:, -self.block_size:], valid[:, -self.block_size:]
        self.cache.reset()
        self.next_pos = torch.zeros(tokens.size(0), dtype=torch.long, device=tokens.device)
        pos = (window_valid.cumsum(-1) - 1).clamp(min=0)
        return self._feed(window, window_valid, pos, tokens.size(1))

    def _feed(self, new, new_valid, pos, fed: int) -> torch.Tensor:
        # valid=None when nothing is padded: the cache then skips the mask for one-token steps.
        valid = None if bool(new_valid.all()) else new_valid
        logits, self.cache = self.model(new, cache=self.cache, pos=pos, valid=valid, last_only=True)
        self.next_pos = self.next_pos + new_valid.sum(-1)
        self.fed = fed
        return logits[:, -1]


# ---- the generation loop ------------------------------------------------------------------------

def _left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, valid), both (B, longest prompt): each prompt right-aligned; padding is id 0, invalid."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            valid[row, width - len(prompt):] = True
    return tokens.to(device), valid.to(device)


def _seen(tokens: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) bool: which ids each row's context holds (padding not counted)."""
    ids = tokens.masked_fill(~valid, vocab)  # padding lands in a spare column, dropped below
    seen = torch.zeros(tokens.size(0), vocab + 1, dtype=torch.bool, device=tokens.device)
    return seen.scatter_(1, ids, True)[:, :vocab]


def _device_of(model) -> torch.device:
    """Where the model's parameters are (a ZeRO-3 shard too); the CPU for a plain callable."""
    gpt = _gpt_inside(model)
    return torch.device("cpu") if gpt is None else next(gpt.parameters()).device


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = GREEDY, *,
             block_size: Optional[int] = None, eos_id: Optional[int] = None, vocab_size: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True, device=None,
             on_token: Optional[Callable[[int, int], bool]] = None) -> list[list[int]]:
    """Continue each prompt (lists of token ids, any lengths >= 1) by up to ``max_new_tokens``.

    Returns each row's new tokens. A row ends at EOS (kept as its last token) or when
    ``on_token(row, token)``, called for every other new token, returns True (a stop string).
    ``model`` is a GPT, a DeepSpeed engine wrapping one, or any callable from tokens (B, T) to
    logits (B, T, V); the KV cache is used for the first two unless ``use_cache`` is False.
    """
    gpt = _gpt_inside(model)
    if block_size is None and gpt is None:
        raise ValueError("block_size is needed when the model is a plain callable (not a GPT)")
    block_size = block_size or gpt.config.block_size
    tokens, valid = _left_pad(prompts, device if device is not None else _device_of(model))
    if use_cache and gpt is not None:
        logits_of = _Cached(model, block_size, tokens.size(1) + max_new_tokens - 1)
    else:
        logits_of = _Plain(model, block_size)
    rows = range(len(prompts))
    new: list[list[int]] = [[] for _ in rows]
    live = [True for _ in rows]
    seen = None
    for _ in range(max_new_tokens):
        logits = logits_of(tokens, valid)
        if sampling.repetition_penalty != 1.0:
            seen = _seen(tokens, valid, logits.size(-1)) if seen is None else seen
        nxt = next_token(logits, sampling, seen, generator, vocab_size)
        for row, token in enumerate(nxt.tolist()):
            if live[row]:
                new[row].append(token)
                stop = token == eos_id or (on_token is not None and on_token(row, token))
                live[row] = not stop
        if not any(live):
            break
        # Ended rows go on with whatever they drew: cheaper than reshaping the batch and the
        # cache, and nothing reads them.
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        valid = torch.cat([valid, valid.new_ones(len(prompts), 1)], dim=1)
        if seen is not None:
            seen[torch.arange(len(prompts), device=seen.device), nxt] = True
    return new


@torch.no_grad()
def sample(forward, idx: torch.Tensor, max_new_tokens: int, block_size: int, temperature: float = 0.8,
           top_k: Optional[int] = 50, top_p: Optional[float] = None, eos_id: Optional[int] = None,
           generator: Optional[torch.Generator] = None, *, repetition_penalty: float = 1.0,
           vocab_size: Optional[int] = None, use_cache: bool = True) -> torch.Tensor:
    """Extend idx [B, T] by up to max_new_tokens; returns [B, T + n]. Rows that ended at EOS are
    filled with EOS up to the longest. ``forward`` is a GPT, a DeepSpeed engine wrapping one (both
    cached), or any callable from tokens to logits [B, T, V].

    Every rank running the same call with the same generator seed draws the same tokens, which
    ZeRO-3 needs (all ranks take part in each forward).
    """
    new = generate(forward, idx.tolist(), max_new_tokens,
                   Sampling(temperature, top_k, top_p, repetition_penalty), block_size=block_size,
                   eos_id=eos_id, vocab_size=vocab_size, generator=generator, use_cache=use_cache,
                   device=idx.device)
    width = max(len(row) for row in new)
    fill = eos_id if eos_id is not None else 0
    tail = torch.tensor([row + [fill] * (width - len(row)) for row in new], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, tail], dim=1)


# ---- text: stop strings and streaming ------------------------------------------------------------

def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be shown for good: not a trailing U+FFFD (a byte-level token can
    end inside a UTF-8 character, which decodes as U+FFFD until its other bytes arrive), nor an
    ending that a stop string may still complete (the output is cut before a stop string)."""
    end = len(text.rstrip("\ufffd"))
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k], 0, end)), default=0)
    return end - held


class TextRow:
    """One row's continuation as text, decoded as its tokens arrive: it ends at the first stop
    string (the text is cut before it), and ``emit`` (when given) receives it piece by piece, never
    half a character, the pieces adding up to the final ``text``.

    The continuation is decoded together with the prompt, then the decoded prompt is cut off:
    some decoders (SentencePiece's) drop a leading space on the first token decoded.
    """

    def __init__(self, tok, prompt_ids: list[int], stops: Sequence[str] = (),
                 emit: Optional[Callable[[str], None]] = None):
        self.tok, self.prompt_ids, self.stops, self.emit = tok, prompt_ids, tuple(stops), emit
        self.prompt_text = tok.decode(prompt_ids)
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0

    def _decode(self) -> str:
        full = self.tok.decode(self.prompt_ids + self.ids)
        return full[len(self.prompt_text):] if full.startswith(self.prompt_text) else self.tok.decode(self.ids)

    def push(self, token: int) -> bool:
        """Add a token; True when the text now holds a stop string (the row is done)."""
        self.ids.append(token)
        if not (self.stops or self.emit):
            return False  # nothing to look at until the end: decode once, in finish()
        self.text = self._decode()
        cut = _first_stop(self.text, self.stops)
        if cut is not None:
            self.text = self.text[:cut]
            return True
        self._show(_safe_end(self.text, self.stops))
        return False

    def finish(self) -> str:
        """The final text; whatever was held back is emitted now."""
        if not (self.stops or self.emit):
            self.text = self._decode()
        self._show(len(self.text))
        return self.text

    def _show(self, end: int) -> None:
        if self.emit is not None and end > self.shown:
            self.emit(self.text[self.shown:end])
            self.shown = end


def complete(model, tok, prompts: Sequence[str], max_new_tokens: int, sampling: Sampling = GREEDY, *,
             eos_id: Optional[int] = None, stop: Sequence[str] = (), generator: Optional[torch.Generator] = None,
             on_text: Optional[Callable[[str], None]] = None, use_cache: bool = True,
             block_size: Optional[int] = None) -> list[str]:
    """Each prompt followed by its continuation, as text (all prompts in one batch). ``model`` is
    what `generate` takes (block_size needed only for a plain callable).

    An empty prompt starts from EOS, the boundary the model saw before every training document.
    ``on_text`` streams a single prompt: it receives the prompt, then the continuation piece by
    piece; what it receives adds up to the returned text.
    """
    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming (on_text) shows a single prompt")
    ids = [tok.encode(p).ids if p else [eos_id] for p in prompts]
    rows = [TextRow(tok, row_ids, stop, on_text) for row_ids in ids]
    if on_text is not None:
        on_text(prompts[0])
    generate(model, ids, max_new_tokens, sampling, block_size=block_size, eos_id=eos_id,
             vocab_size=tok.get_vocab_size(), generator=generator, use_cache=use_cache,
             on_token=lambda row, token: rows[row].push(token))
    return [prompt + row.finish() for prompt, row in zip(prompts, rows)]


# ---- checking what the user asked for ------------------------------------------------------------

def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples,
                        prompt_tokens: Optional[int] = None, block_size: Optional[int] = None, *,
                        repetition_penalty=1.0, stop: Sequence[str] = (), batch_size=1) -> None:
    """Raise one UserError naming every sampling argument outside its range, and the range.

    Cheap and independent of the run, so callers check before loading anything; the prompt's
    length is checked too once it is known (prompt_tokens and block_size given).
    """
    problems = []

    def bad(name: str, value, allowed: str) -> None:
        problems.append(f"{name} (--{name.replace('_', '-')}) = {value!r}: must be {allowed}")

    if not (_integer(max_new_tokens) and max_new_tokens >= 1):
        bad("max_new_tokens", max_new_tokens, "an integer >= 1 (how many tokens to add)")
    if not (_number(temperature) and temperature >= 0):
        bad("temperature", temperature, "a number >= 0 (0 = greedy)")
    if top_k is not None and not (_integer(top_k) and top_k >= 0):
        bad("top_k", top_k, "an integer >= 0 (0 or none = off)")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        bad("top_p", top_p, "a number in (0, 1] (1 or none = off)")
    if not (_integer(num_samples) and num_samples >= 1):
        bad("num_samples", num_samples, "an integer >= 1")
    if not (_number(repetition_penalty) and repetition_penalty > 0):
        bad("repetition_penalty", repetition_penalty, "a number > 0 (1 = off, > 1 discourages repeats)")
    if not (_integer(batch_size) and batch_size >= 1):
        bad("batch_size", batch_size, "an integer >= 1 (rows generated together)")
    for s in stop:
        if not (isinstance(s, str) and s):
            problems.append(f"stop (--stop) = {s!r}: must be a non-empty string")
    if prompt_tokens is not None and block_size is not None:
        problems += _long_prompts([prompt_tokens], block_size, ["the prompt"])
    if problems:
        raise UserError("Invalid sampling argument(s):\n" + "\n".join(f"  - {p}" for p in problems))


def _long_prompts(lengths: Sequence[int], block_size: int, names: Sequence[str]) -> list[str]:
    # A prompt must leave room in the context for the first new token to see all of it.
    return [f"{name} is {n} tokens; this model's context is {block_size} tokens, so the prompt may "
            f"have at most {block_size - 1}: shorten it" for n, name in zip(lengths, names) if n >= block_size]


def check_prompt_lengths(lengths: Sequence[int], block_size: int, names: Sequence[str]) -> None:
    problems = _long_prompts(lengths, block_size, names)
    if problems:
        raise UserError("Prompt(s) too long for the model:\n" + "\n".join(f"  - {p}" for p in problems))


def read_prompts(path) -> list[tuple[str, str]]:
    """(name, prompt) pairs from a file: JSONL with a "prompt" field when it ends in .jsonl, else
    one prompt per line (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"Cannot read the prompts file '{path}' ({err}). Pass --prompts-file a UTF-8 text "
                        f"file with one prompt per line, or a .jsonl file with a \"prompt\" field.") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise UserError(f"The prompts file '{path}' holds no prompt. Put one prompt per line in it.")
    if path.suffix != ".jsonl":
        return [(f"line {n} of {path}", line) for n, line in numbered]
    prompts = []
    for n, line in numbered:
        try:
            prompt = json.loads(line)["prompt"]
            if not isinstance(prompt, str):
                raise TypeError(f"its \"prompt\" is a {type(prompt).__name__}, not a string")
        except (ValueError, KeyError, TypeError) as err:
            why = "it has no \"prompt\" field" if isinstance(err, KeyError) else str(err)
            raise UserError(f"Line {n} of the prompts file '{path}' is not a JSON object with a string "
                            f"\"prompt\" field ({why}). Fix that line, or use a file not ending in .jsonl "
                            f"to read one prompt per line.") from None
        prompts.append((f"line {n} of {path}", prompt))
    return prompts


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one, else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {name!r} is not one of auto, cpu, cuda.")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                        "False). Use --device cpu, or --device auto to take a GPU only when there is one.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ---- a run's checkpoint --------------------------------------------------------------------------

def generate_text(run_dir, prompt: str | Sequence[str] = "", max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: Optional[int] = 50, top_p: Optional[float] = None, num_samples: int = 1,
                  seed: int = 0, which: str = "latest", *, repetition_penalty: float = 1.0,
                  stop: Sequence[str] = (), device: str = "auto", batch_size: int = 8,
                  on_text: Optional[Callable[[str], None]] = None, use_cache: bool = True,
                  prompt_names: Optional[Sequence[str]] = None) -> list[str]:
    """Continue a prompt (or each of a list of prompts) with a run's checkpoint; returns the texts,
    prompt included: ``num_samples`` per prompt, prompt by prompt.

    Rows go through the model ``batch_size`` at a time. ``on_text`` streams (one prompt, one
    sample). ``prompt_names`` name the prompts in errors (e.g. "line 3 of prompts.txt").
    """
    from dsgpt.runs import load_model, run_tokenizer
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    # Before the run dir is read: a typo costs no model load.
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples,
                        repetition_penalty=repetition_penalty, stop=stop, batch_size=batch_size)
    dev = resolve_device(device)
    if on_text is not None and len(prompts) * num_samples != 1:
        raise UserError("Streaming shows one text: use it with one prompt and --num-samples 1 (or --no-stream).")
    model, cfg, tag = load_model(run_dir, which)
    tok, eos = run_tokenizer(run_dir, cfg, tag, model.config.vocab_size)
    block = model.config.block_size
    names = prompt_names or (["the prompt"] if len(prompts) == 1 else [f"prompt {i + 1}" for i in range(len(prompts))])
    check_prompt_lengths([len(tok.encode(p).ids) for p in prompts], block, names)
    model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    rows = [p for p in prompts for _ in range(num_samples)]
    texts = []
    for start in range(0, len(rows), batch_size):
        texts += complete(model, tok, rows[start:start + batch_size], max_new_tokens, sampling, eos_id=eos,
                          stop=stop, generator=gen, on_text=on_text, use_cache=use_cache)
    return texts
