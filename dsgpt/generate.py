"""Autoregressive sampling: temperature, top-k and top-p (nucleus), with a seeded generator."""

from __future__ import annotations

from typing import Callable, Optional

import torch


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


def generate_text(run_dir, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: Optional[int] = 50, top_p: Optional[float] = None, num_samples: int = 1,
                  seed: int = 0, which: str = "latest") -> list[str]:
    """Continue `prompt` with a run's checkpoint; returns the decoded texts (prompt included)."""
    from dsgpt.data.tokenizer import eos_id
    from dsgpt.errors import UserError
    from dsgpt.runs import load_model, load_tokenizer_for
    model, cfg, _ = load_model(run_dir, which)
    tok = load_tokenizer_for(cfg)
    eos = eos_id(tok)
    ids = tok.encode(prompt).ids if prompt else [eos]
    if len(ids) >= model.config.block_size:
        raise UserError(f"The prompt is {len(ids)} tokens; the model sees at most {model.config.block_size}. "
                        f"Shorten the prompt.")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long)
    out = sample(model, idx, max_new_tokens, model.config.block_size, temperature, top_k, top_p,
                 eos_id=eos if num_samples == 1 else None, generator=gen)
    start = 0 if prompt else 1
    return [tok.decode(row[start:].tolist()) for row in out]
