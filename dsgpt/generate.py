"""Autoregressive sampling: temperature, top-k and top-p (nucleus), with a seeded generator."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch

from dsgpt.errors import UserError


@torch.no_grad()
def sample(forward: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, max_new_tokens: int,
           block_size: int, temperature: float = 0.8, top_k: Optional[int] = 50, top_p: Optional[float] = None,
           eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Extend idx [B, T] by up to max_new_tokens; `forward` maps tokens to logits [B, T, V].

    Every rank running the same call with the same generator seed draws the same tokens, which
    ZeRO-3 needs (all ranks take part in each forward).
    """
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        logits = forward(context)[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p is not None and top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                probs = torch.softmax(sorted_logits, -1)
                # Drop a token once the mass before it already reaches top_p (always keep the first).
                drop = probs.cumsum(-1) - probs >= top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
            probs = torch.softmax(logits, -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
    return idx


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, num_samples,
                        prompt_tokens: Optional[int] = None, block_size: Optional[int] = None) -> None:
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
    # The prompt must leave room in the context for the first new token to see all of it.
    if prompt_tokens is not None and block_size is not None and prompt_tokens >= block_size:
        problems.append(f"the prompt is {prompt_tokens} tokens; this model's context is {block_size} "
                        f"tokens, so the prompt may have at most {block_size - 1}: shorten it")
    if problems:
        raise UserError("Invalid sampling argument(s):\n" + "\n".join(f"  - {p}" for p in problems))


def generate_text(run_dir, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: Optional[int] = 50, top_p: Optional[float] = None, num_samples: int = 1,
                  seed: int = 0, which: str = "latest") -> list[str]:
    """Continue `prompt` with a run's checkpoint; returns the decoded texts (prompt included)."""
    from dsgpt.data.tokenizer import eos_id
    from dsgpt.runs import load_model, load_tokenizer_for
    sampling = (max_new_tokens, temperature, top_k, top_p, num_samples)
    check_sampling_args(*sampling)  # before the run dir is read: a typo costs no model load
    model, cfg, _ = load_model(run_dir, which)
    tok = load_tokenizer_for(cfg)
    eos = eos_id(tok)
    ids = tok.encode(prompt).ids if prompt else [eos]
    check_sampling_args(*sampling, prompt_tokens=len(ids), block_size=model.config.block_size)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long)
    out = sample(model, idx, max_new_tokens, model.config.block_size, temperature, top_k, top_p,
                 eos_id=eos if num_samples == 1 else None, generator=gen)
    start = 0 if prompt else 1
    return [tok.decode(row[start:].tolist()) for row in out]
