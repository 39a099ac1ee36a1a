"""Harness tasks on the live model during training: `eval.tasks` every `eval.interval` steps.

Every rank takes part (ZeRO-3 forwards are collective; under ZeRO 0-2 the ranks split the work) and
rank 0 logs `eval/<task>/<metric>` beside the training curves. The global RNG states are restored
after each evaluation and the engine goes back to training mode, so a run with `eval.tasks` has
the same training losses, bit for bit, as the same run without.
"""

from __future__ import annotations

from typing import Optional

from dsgpt.config import Config
from dsgpt.errors import UserError


class TaskEvals:
    def __init__(self, cfg: Config, tokenizer, eos_id: int):
        from dsgpt.eval.harness import EvalOptions, prepare_tasks
        e = cfg.eval
        # No bootstrap: a curve needs the scores, not lm-eval's standard errors (seconds each time).
        self.opts = EvalOptions(tasks=e.tasks, include_path=e.include_path, limit=e.limit,
                                max_new_tokens=e.max_new_tokens, progress=False, bootstrap_iters=0)
        try:  # every task, file and name checked before the first step
            self.tasks, self.examples = prepare_tasks(self.opts)
        except UserError as err:
            raise UserError(f"eval.tasks={e.tasks!r}: {err}") from None
        self.interval = e.interval or cfg.train.eval_interval
        self.cfg, self.tok, self.eos = cfg, tokenizer, eos_id

    @classmethod
    def from_config(cls, cfg: Config, data) -> Optional["TaskEvals"]:
        if not cfg.eval.tasks:
            return None
        from dsgpt.data.tokenizer import load_tokenizer
        return cls(cfg, load_tokenizer(data.tokenizer_path), data.eos_id)

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.interval == 0 or step == max_steps

    def run(self, engine, ctx) -> dict[str, float]:
        """{`eval/<task>/<metric>`: value} of the engine's current weights (on every rank)."""
        from dsgpt.eval import loaded
        from dsgpt.eval.harness import scalars, score
        lm = loaded.from_engine(engine, ctx)
        was_training = engine.module.training
        engine.eval()
        try:
            return scalars(score(lm, self.cfg, self.tok, self.eos, self.tasks, self.examples, self.opts))
        finally:
            if was_training:
                engine.train()

    @staticmethod
    def summary(scores: dict[str, float]) -> str:
        return ", ".join(f"{tag[len('eval/'):]} {value:.4f}" for tag, value in scores.items())
