"""Perplexity and next-token accuracy on held-out tokens, summed over all ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsgpt import dist
from dsgpt.model import token_loss_sum


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def evaluate(engine, batches, device) -> EvalResult:
    """Token-weighted loss and next-token accuracy over the given batches, summed over ranks.

    Every rank must get the same number of batches: under ZeRO-3 each forward gathers parameters
    from all ranks together. Fully masked batches (padding) add nothing to the sums.
    """
    module = getattr(engine, "module", engine)  # a DeepSpeed engine or a plain nn.Module
    was_training = module.training
    engine.eval()
    loss_sum = correct = tokens = 0.0
    for x, y in batches:
        y = y.to(device)
        logits = engine(x.to(device))
        s, n = token_loss_sum(logits, y)
        loss_sum += float(s)
        tokens += float(n)
        correct += float(((logits.argmax(-1) == y) & (y != -100)).sum())
    loss_sum, correct, tokens = dist.all_reduce_sum([loss_sum, correct, tokens], device)
    if was_training:
        engine.train()
    return EvalResult(loss=loss_sum / max(tokens, 1.0), accuracy=correct / max(tokens, 1.0), tokens=int(tokens))


def val_set_size(cfg, batches=None) -> tuple[int, int]:
    """(windows, batch size) of a run's validation set: `batches` (default train.eval_batches)
    batches of the eval batch size. The window count never depends on the number of ranks, so
    the trainer on any world size and `dsgpt eval` score the same windows."""
    batch_size = cfg.eval.batch_size or cfg.train.micro_batch_size
    return (batches or cfg.train.eval_batches) * batch_size, batch_size


def evaluate_data(engine, data, n_windows: int, batch_size: int, rank: int, world: int,
                  device) -> tuple[EvalResult, dict[str, EvalResult]]:
    """The validation result of a run's data, and one per source for a mixture (data.mix), whose
    overall loss and accuracy are the sources' averaged with the mixture's weights."""
    sources = getattr(data, "sources", None)  # a mixture's (dsgpt.data.mixture)
    if sources is None:
        return evaluate(engine, data.val_batches(n_windows, batch_size, rank, world), device), {}
    per = {s.name: evaluate(engine, s.data.val_batches(n_windows, batch_size, rank, world), device) for s in sources}
    weights = {s.name: s.weight for s in sources}
    overall = EvalResult(loss=sum(weights[k] * r.loss for k, r in per.items()),
                         accuracy=sum(weights[k] * r.accuracy for k, r in per.items()),
                         tokens=sum(r.tokens for r in per.values()))
    return overall, per
