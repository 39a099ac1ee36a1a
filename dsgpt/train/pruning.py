"""Pruning a sweep trial from inside its training run, with optuna's pruners.

`dsgpt sweep` starts each trial's run with DSGPT_SWEEP_TRIAL in its environment: JSON naming the
study's journal file, the study, the trial's number, the pruner and the objective. After every
evaluation rank 0 reports the objective so far (the `best` or `last` value of the metric that the
sweep ranks trials by, read from the run's metrics.jsonl) to the trial as its value at this step and
asks the study's pruner whether to go on; every rank follows that answer (one all-reduce), so the
run stops cleanly, after a checkpoint like any stop, with the reason `pruned`.

Outside a sweep with a pruner the hook does nothing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional

from dsgpt import dist

ENV = "DSGPT_SWEEP_TRIAL"

# The sweep file's `pruner.type` -> optuna's class and the settings a sweep file may give it.
PRUNERS = {
    "median": ("MedianPruner", ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials")),
    "successive_halving": ("SuccessiveHalvingPruner",
                           ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count")),
}


def make_pruner(settings: dict):
    """The optuna pruner for a sweep file's `pruner` ({type: ..., setting: value, ...})."""
    import optuna
    settings = dict(settings)
    cls, _ = PRUNERS[settings.pop("type")]
    return getattr(optuna.pruners, cls)(**settings)


def journal_storage(path):
    """optuna's journal storage in one file; its lock is a file created with O_EXCL, which works on
    network filesystems where SQLite's locking does not."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    path = str(path)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return rows


def objective_of(rows: list[dict], metric: str, mode: str, direction: str) -> Optional[float]:
    """The run's objective from its logged rows: the last finite value of `metric`, or the best one."""
    values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not values:
        return None
    if mode == "last":
        return values[-1]
    return min(values) if direction == "minimize" else max(values)


class TrialPruning:
    """The training loop's hook: `after_eval(step)` after each evaluation, `reason()` in its stop
    decision ('pruned' once the study said so, '' otherwise)."""

    def __init__(self, run, info: Optional[dict]):
        self.run = run
        self.info = info if info and info.get("pruner") else None
        self.pruned = False
        self._trial = None

    @classmethod
    def for_run(cls, run) -> "TrialPruning":
        raw = os.environ.get(ENV, "")
        return cls(run, json.loads(raw) if raw else None)

    def after_eval(self, step: int) -> None:
        if self.info is None or self.pruned:
            return
        info, verdict, value = self.info, 0.0, None
        if self.run.ctx.is_main:
            value = objective_of(read_metrics(self.run.run_dir), info["metric"], info["mode"], info["direction"])
            if value is not None:
                trial = self._open()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a step reported before a resume: optuna keeps the first
                    trial.report(value, step)
                # The last step ends the run anyway: a trial that got there completes.
                verdict = float(step < self.run.t.max_steps and trial.should_prune())
        (verdict,) = dist.all_reduce_max([verdict], self.run.device)
        if verdict:
            self.pruned = True
            self.run.console(f"step {step}: pruned by the sweep's {info['pruner']['type']} pruner "
                             f"({info['mode']} {info['metric']} so far: {value if value is None else f'{value:.4f}'})")

    def reason(self) -> str:
        return "pruned" if self.pruned else ""

    def _open(self):
        if self._trial is None:
            import optuna
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            storage = journal_storage(self.info["journal"])
            study = optuna.load_study(study_name=self.info["study"], storage=storage,
                                      pruner=make_pruner(self.info["pruner"]))
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(self.info["study"]), int(self.info["trial"]))
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial
