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
    from all ranks together.
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


def evaluate_run(run_dir, which: str = "latest", batches=None, batch_size=None) -> dict:
    """Evaluate a run's checkpoint in this process; writes `eval/<tag>.json` in the run dir."""
    from pathlib import Path

    from dsgpt.data.dataset import TokenData
    from dsgpt.io import atomic_write_json
    from dsgpt.runs import data_dir, load_model
    model, cfg, tag = load_model(run_dir, which)
    data = TokenData(data_dir(cfg.data.path, cfg.data.builtin_vocab_size), model.config.block_size, cfg.run.seed)
    n = batches or cfg.train.eval_batches
    bs = batch_size or cfg.eval.batch_size or cfg.train.micro_batch_size
    res = evaluate(model, data.val_batches(n, bs, 0, 1), torch.device("cpu"))
    out = {"checkpoint": tag, "val/loss": res.loss, "val/ppl": res.ppl, "val/accuracy": res.accuracy,
           "tokens": res.tokens}
    atomic_write_json(Path(run_dir) / "eval" / f"{tag}.json", out)
    return out
