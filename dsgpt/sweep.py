"""`dsgpt sweep SWEEP.yaml`: a hyperparameter search over run configs, with optuna's samplers and
its journal-file storage (safe on a shared filesystem, unlike SQLite), run trial after trial here.

A sweep file:

    name: lr-tiny                      # the sweep dir is <out_dir>/sweeps/<name> (out_dir: runs)
    base: configs/tiny.yaml            # the run config every trial starts from
    overrides: [train.eval_interval=10]  # applied to every trial, before its own values
    space:                             # dotted keys; a list is a grid axis, a dict a distribution
      optim.lr: [1.0e-5, 1.0e-3, 3.0e-3]
      optim.warmup_steps: {type: int, low: 0, high: 50}
      optim.weight_decay: {type: loguniform, low: 1.0e-3, high: 0.3}
    sampler: grid                      # grid (every value a list), random or tpe (default: grid if it can)
    trials: 3                          # configurations to try (grid: at most the grid's size)
    repeats: 1                         # runs per configuration with run.seed, +1, ... (mean and std reported)
    objective: {metric: val/loss, mode: best, direction: minimize}   # mode: best or last logged value
    budget: {steps: 200}               # or {minutes: 10}: train.max_steps / train.max_minutes per run
    seed: 0                            # the sampler's seed

Each run is `launch/train.py` in its own process (a failure stays in its trial) named by its values
and seed, so a rerun of the sweep finds a finished run's results and skips it, resumes an interrupted
one from its checkpoint, and retries a failed one. A run that stops on a non-finite loss is recorded
as diverged, one that exits with an error as failed (with the error's last lines): neither stops
the sweep. Results: a table on stdout sorted by the objective, sweep.csv and sweep.json in the sweep
dir, and TensorBoard's HParams dashboard in <sweep dir>/tb (one entry per configuration).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dsgpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = ("grid", "random", "tpe")
DISTRIBUTIONS = ("uniform", "loguniform", "int")


@dataclass
class SweepSpec:
    name: str
    base: str
    space: dict
    overrides: list = field(default_factory=list)
    sampler: str = "grid"
    trials: int = 8
    repeats: int = 1
    metric: str = "val/loss"
    mode: str = "best"
    direction: str = "minimize"
    budget_steps: Optional[int] = None
    budget_minutes: Optional[float] = None
    seed: int = 0
    out_dir: str = "runs"
    path: Optional[Path] = None

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / "sweeps" / self.name

    def grid(self) -> Optional[dict]:
        """The grid search space when every entry is a list, else None."""
        return self.space if all(isinstance(v, list) for v in self.space.values()) else None


def load_spec(path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The sweep file '{path}' does not exist. See configs/sweeps/ for an example.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"The sweep file '{path}' is not valid YAML: {err}") from None
    where = f"the sweep file '{path}'"
    known = {"name", "base", "space", "overrides", "sampler", "trials", "repeats", "objective", "budget", "seed",
             "out_dir"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where} has unknown keys {unknown}; the keys are {', '.join(sorted(known))}.")
    for key in ("name", "base", "space"):
        if not raw.get(key):
            raise UserError(f"{where} needs '{key}' (see the example in dsgpt/sweep.py's docstring).")
    if not isinstance(raw["space"], dict):
        raise UserError(f"{where}: 'space' must map dotted keys to a list of values or a distribution.")
    for key, value in raw["space"].items():
        _check_axis(where, key, value)
    objective, budget = raw.get("objective") or {}, raw.get("budget") or {}
    spec = SweepSpec(name=str(raw["name"]), base=str(raw["base"]), space=raw["space"],
                     overrides=list(raw.get("overrides") or []), trials=int(raw.get("trials", 8)),
                     repeats=int(raw.get("repeats", 1)), metric=objective.get("metric", "val/loss"),
                     mode=objective.get("mode", "best"), direction=objective.get("direction", "minimize"),
                     budget_steps=budget.get("steps"), budget_minutes=budget.get("minutes"),
                     seed=int(raw.get("seed", 0)), out_dir=str(raw.get("out_dir", "runs")), path=path)
    spec.sampler = raw.get("sampler") or ("grid" if spec.grid() else "tpe")
    problems = []
    if spec.sampler not in SAMPLERS:
        problems.append(f"sampler {spec.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if spec.sampler == "grid" and not spec.grid():
        problems.append("sampler grid needs every space entry to be a list of values")
    if spec.mode not in ("best", "last"):
        problems.append(f"objective.mode {spec.mode!r} is not best or last")
    if spec.direction not in ("minimize", "maximize"):
        problems.append(f"objective.direction {spec.direction!r} is not minimize or maximize")
    if spec.trials < 1 or spec.repeats < 1:
        problems.append("trials and repeats must be >= 1")
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems) + ".")
    return spec


def _check_axis(where: str, key: str, value) -> None:
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where}: space.{key} is an empty list; give at least one value.")
        return
    if not isinstance(value, dict) or value.get("type") not in DISTRIBUTIONS or "low" not in value or "high" not in value:
        raise UserError(f"{where}: space.{key} must be a list of values or {{type: uniform|loguniform|int, low: .., "
                        f"high: ..}}; got {value!r}.")
    if not value["low"] < value["high"] or (value["type"] == "loguniform" and value["low"] <= 0):
        raise UserError(f"{where}: space.{key} needs low < high (and low > 0 for loguniform); got {value!r}.")


# ---- one configuration: its runs and its objective -----------------------------------------------

def _token(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def config_id(params: dict) -> str:
    """A stable name for a configuration: the same values give the same run dirs on a rerun."""
    text = json.dumps(params, sort_keys=True, default=str)
    short = "-".join(f"{k.split('.')[-1]}{_token(v)}" for k, v in sorted(params.items()))[:60]
    return f"{short}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def run_overrides(spec: SweepSpec, params: dict, seed_offset: int, run_name: str) -> list[str]:
    """What a run of a configuration adds to the base config: the sweep's overrides, then its values
    (they win), the budget, the seed, and where it goes."""
    from dsgpt.config import load_config
    base_seed = load_config(spec.base, spec.overrides).run.seed
    out = [*spec.overrides, *(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in params.items())]
    if spec.budget_steps:
        out.append(f"train.max_steps={int(spec.budget_steps)}")
    if spec.budget_minutes:
        out.append(f"train.max_minutes={float(spec.budget_minutes)}")
    return [*out, f"run.seed={base_seed + seed_offset}", f"run.out_dir={spec.dir / 'runs'}", f"run.name={run_name}"]


@dataclass
class RunOutcome:
    status: str               # complete | diverged | failed
    value: Optional[float]    # the objective of this run
    error: str = ""


def objective_of(run_dir: Path, metric: str, mode: str, direction: str) -> Optional[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not values:
        return None
    if mode == "last":
        return values[-1]
    return min(values) if direction == "minimize" else max(values)


def finished(run_dir: Path) -> Optional[str]:
    """Why the run ended (its last `stopped at step N (REASON)` line), or None when it has not: a
    run stopped by a signal (the sweep was killed) resumes from its checkpoint next time."""
    log = run_dir / "sweep_run.log"
    if not log.is_file():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("stopped at step ") and "(" in line:
            reason = line[line.index("(") + 1:line.index(")")]
            return None if reason.startswith("signal") else reason
    return None


def _die_with_parent() -> None:
    """In the child: SIGTERM when the sweep process dies, however it dies (Linux prctl), so no
    trial outlives a killed sweep; the trainer saves on SIGTERM and the rerun resumes it."""
    import ctypes
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_one(spec: SweepSpec, params: dict, seed_offset: int) -> RunOutcome:
    """Train (or find already trained) one run of a configuration and read its objective."""
    name = f"{config_id(params)}-s{seed_offset}"
    run_dir = spec.dir / "runs" / name
    reason = finished(run_dir)
    if reason is None:
        cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", spec.base,
               *run_overrides(spec, params, seed_offset, name)]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "sweep_run.log", "a") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent).returncode
        reason = finished(run_dir)
        if code != 0 and reason != "nonfinite":  # a diverged run exits non-zero too
            lines = (run_dir / "sweep_run.log").read_text(errors="replace").strip().splitlines()
            errors = [x for x in lines if x.startswith("error:")]
            return RunOutcome("failed", None, errors[-1] if errors else "\n".join(lines[-5:]))
    if reason == "nonfinite":
        return RunOutcome("diverged", None, "the loss became non-finite")
    value = objective_of(run_dir, spec.metric, spec.mode, spec.direction)
    if value is None:
        return RunOutcome("failed", None, f"the run logged no finite {spec.metric}")
    return RunOutcome("complete", value)


# ---- the study -----------------------------------------------------------------------------------

def _sampler(spec: SweepSpec):
    import optuna
    if spec.sampler in ("grid", "random"):  # the grid's points are enqueued one by one (run_sweep)
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def _suggest(trial, space: dict) -> dict:
    params = {}
    for key, axis in space.items():
        if isinstance(axis, list):
            params[key] = trial.suggest_categorical(key, axis)
        elif axis["type"] == "int":
            params[key] = trial.suggest_int(key, int(axis["low"]), int(axis["high"]))
        else:
            params[key] = trial.suggest_float(key, float(axis["low"]), float(axis["high"]),
                                              log=axis["type"] == "loguniform")
    return params


def open_study(spec: SweepSpec):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    spec.dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = str(spec.dir / "journal.log")
    storage = JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))
    return optuna.create_study(study_name=spec.name, storage=storage, sampler=_sampler(spec),
                               direction=spec.direction, load_if_exists=True)


def run_sweep(spec: SweepSpec, on_trial=None) -> list[dict]:
    """Run the sweep's remaining trials here, one after another; returns every configuration's
    record. A configuration whose last attempt failed or was cut off is tried again first."""
    study = open_study(spec)
    for params in _to_retry(study):
        study.enqueue_trial(params)
        _run_trial(spec, study, study.ask(), on_trial)  # an enqueued trial comes first, with its values
    while _settled(study) < min(spec.trials, _grid_size(spec)):
        if spec.sampler == "grid":
            # Grid points in order, each once (optuna's GridSampler stops the study itself, which
            # only works inside study.optimize).
            tried = {json.dumps(r["params"], sort_keys=True, default=str) for r in records(study)}
            study.enqueue_trial(next(p for p in grid_points(spec.grid())
                                     if json.dumps(p, sort_keys=True, default=str) not in tried))
        _run_trial(spec, study, study.ask(), on_trial)
    return records(study)


def grid_points(grid: dict) -> list[dict]:
    import itertools
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _run_trial(spec: SweepSpec, study, trial, on_trial) -> None:
    params = _suggest(trial, spec.space)
    _record(study, trial, [run_one(spec, params, r) for r in range(spec.repeats)])
    if on_trial:
        on_trial(records(study))


def _to_retry(study) -> list[dict]:
    rows = records(study)
    return [r["params"] for r in rows if r["status"] in ("failed", "running")]


def _grid_size(spec: SweepSpec) -> int:
    grid = spec.grid()
    return math.prod(len(v) for v in grid.values()) if spec.sampler == "grid" else 10 ** 9


def _settled(study) -> int:
    return sum(1 for r in records(study) if r["status"] in ("complete", "diverged", "failed"))


def _record(study, trial, outcomes: list[RunOutcome]) -> None:
    import optuna
    values = [o.value for o in outcomes if o.status == "complete"]
    diverged = any(o.status == "diverged" for o in outcomes)
    failed = [o.error for o in outcomes if o.status == "failed"]
    trial.set_user_attr("runs", len(outcomes))
    if failed:
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("error", failed[0])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    elif diverged:
        trial.set_user_attr("status", "diverged")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        trial.set_user_attr("status", "complete")
        trial.set_user_attr("std", statistics.stdev(values) if len(values) > 1 else 0.0)
        study.tell(trial, statistics.fmean(values))


def records(study) -> list[dict]:
    """One record per configuration tried (the last attempt of each), best first."""
    latest: dict[str, dict] = {}
    for t in study.trials:
        if not t.params:
            continue
        status = t.user_attrs.get("status", "running")
        latest[json.dumps(t.params, sort_keys=True, default=str)] = {
            "trial": t.number, "status": status, "params": t.params, "value": t.value,
            "std": t.user_attrs.get("std"), "runs": t.user_attrs.get("runs"), "error": t.user_attrs.get("error", ""),
            "config": config_id(t.params)}
    sign = 1 if study.direction.name == "MINIMIZE" else -1
    return sorted(latest.values(), key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0)))


def write_results(spec: SweepSpec, rows: list[dict]) -> None:
    """sweep.json, sweep.csv and the TensorBoard HParams entries in the sweep dir."""
    from dsgpt.io import atomic_write_json, atomic_write_text
    atomic_write_json(spec.dir / "sweep.json", {"name": spec.name, "objective": {
        "metric": spec.metric, "mode": spec.mode, "direction": spec.direction}, "trials": rows})
    keys = list(spec.space)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "status", *keys, "objective", "std", "runs", "error"])
    for r in rows:
        w.writerow([r["trial"], r["status"], *(r["params"].get(k) for k in keys), r["value"], r["std"], r["runs"],
                    r["error"]])
    atomic_write_text(spec.dir / "sweep.csv", buf.getvalue())
    _write_hparams(spec, rows)


def _write_hparams(spec: SweepSpec, rows: list[dict]) -> None:
    import shutil

    from torch.utils.tensorboard import SummaryWriter
    tb = spec.dir / "tb"
    shutil.rmtree(tb, ignore_errors=True)  # rewritten whole: a rerun's results replace the last ones
    metric = f"hparam/{spec.metric}"
    for r in rows:
        if r["value"] is None:
            continue
        with SummaryWriter(log_dir=str(tb / r["config"])) as w:
            w.add_hparams({k: v for k, v in r["params"].items()}, {metric: r["value"]}, run_name=".")


def format_table(spec: SweepSpec, rows: list[dict]) -> str:
    keys = list(spec.space)
    head = ["trial", "status", *keys, f"{spec.mode} {spec.metric}"]
    lines = [head]
    for r in rows:
        value = "" if r["value"] is None else (f"{r['value']:.4f}" + (f" ± {r['std']:.4f}" if r["std"] else ""))
        lines.append([str(r["trial"]), r["status"], *(_token(r["params"].get(k)) for k in keys), value])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines]
    failed = [r for r in rows if r["status"] == "failed"]
    text += [f"trial {r['trial']} failed: {r['error'].splitlines()[-1] if r['error'] else '?'}" for r in failed]
    return "\n".join(text)


def trial_config(spec: SweepSpec, params: dict, seed_offset: int = 0) -> Any:
    """The exact run config of one run of a configuration (the base plus its overrides)."""
    from dsgpt.config import load_config
    return load_config(spec.base, run_overrides(spec, params, seed_offset, f"{config_id(params)}-s{seed_offset}"))
