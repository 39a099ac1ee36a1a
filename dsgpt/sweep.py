"""`dsgpt sweep SWEEP.yaml`: a hyperparameter search over run configs, with optuna's samplers, its
pruners and its journal-file storage (safe on a shared filesystem, unlike SQLite).

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
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 100}   # optional, see below
    seed: 0                            # the sampler's seed

Executors. Every one is a worker on the study in the sweep dir (journal.log): it claims the next
trial under a lock, runs it and records it, until the sweep has its trials, so TPE learns from every
worker's results. `dsgpt sweep FILE` is one worker here, trial after trial; `--jobs N` runs N
workers side by side (a GPU each, or an equal share of the cores); `dsgpt sweep --worker FILE|DIR`
is one worker to start as often as wanted, e.g. as the tasks of a Slurm array (slurm/sweep.sbatch).

Each run is `launch/train.py` in its own process (a failure stays in its trial) named by its values
and seed, so a rerun of the sweep finds a finished run's results and skips it, resumes an interrupted
one from its checkpoint, and retries a failed one (once per launch of the sweep). A run that stops on
a non-finite loss is recorded as diverged, one that exits with an error as failed (with the error's
last lines): neither stops the sweep. A sweep that gets Ctrl-C, SIGTERM or SIGUSR1 passes SIGTERM
(USR1) to its trial, which saves a checkpoint, and stops; a killed one takes its trial down with it
(the trial saves on the SIGTERM it gets), and a rerun resumes it.

Pruning (`pruner: median` or `successive_halving`, optuna's MedianPruner / SuccessiveHalvingPruner;
any of their settings may follow `type`): each evaluation of a trial's run reports the objective so
far (best or last value of the metric) at its training step, and the pruner may stop the run there;
the trial is recorded as pruned, with that value. Steps are training steps: `n_warmup_steps: 100`
lets no trial be pruned before step 100. With repeats, the first run of a configuration decides.

Results: a table on stdout sorted by the objective, sweep.csv and sweep.json in the sweep dir,
TensorBoard's HParams dashboard in <sweep dir>/tb (one entry per completed configuration), and PNG
plots: the objective against each swept key (objective_vs_<key>.png) and every run's curve of the
objective's metric (curves.png).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dsgpt import sweep_workers
from dsgpt.errors import UserError
from dsgpt.sweep_workers import Children, locked, try_lock, unlock
from dsgpt.train import pruning

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = ("grid", "random", "tpe")
DISTRIBUTIONS = ("uniform", "loguniform", "int")
SPEC_COPY = "sweep.yaml"  # the sweep file, as the sweep dir keeps it for --worker DIR
STATUS_ORDER = ("complete", "pruned", "diverged", "failed", "running")


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
    pruner: Optional[dict] = None  # {type: median|successive_halving, optuna's settings...}
    seed: int = 0
    out_dir: str = "runs"
    path: Optional[Path] = None
    root: Optional[Path] = None  # the sweep dir when given as such (--worker DIR)

    @property
    def dir(self) -> Path:
        return self.root if self.root is not None else Path(self.out_dir) / "sweeps" / self.name

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
             "out_dir", "pruner"}
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
                     pruner=_check_pruner(where, raw.get("pruner")),
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


def _check_pruner(where: str, raw) -> Optional[dict]:
    """The sweep file's `pruner` as {type: ..., settings...}; None for no pruning."""
    if raw is None or raw is False or raw == "none":
        return None
    settings = {"type": raw} if isinstance(raw, str) else dict(raw) if isinstance(raw, dict) else {}
    kind = settings.get("type")
    if kind not in pruning.PRUNERS:
        raise UserError(f"{where}: pruner {raw!r} is not one of {', '.join(pruning.PRUNERS)}. Write e.g. "
                        f"`pruner: median` or `pruner: {{type: successive_halving, reduction_factor: 3}}`, or "
                        f"leave the key out for no pruning.")
    cls, allowed = pruning.PRUNERS[kind]
    unknown = sorted(set(settings) - {"type", *allowed})
    if unknown:
        raise UserError(f"{where}: pruner {kind} has no setting {', '.join(unknown)}; its settings (those of "
                        f"optuna's {cls}) are {', '.join(allowed)}.")
    wrong = sorted(k for k, v in settings.items() if k != "type" and not (
        (isinstance(v, int) and not isinstance(v, bool)) or (k == "min_resource" and v == "auto")))
    if wrong:
        raise UserError(f"{where}: pruner {kind}'s {', '.join(wrong)} must be whole numbers (min_resource may "
                        f"also be auto); got {', '.join(f'{k}={settings[k]!r}' for k in wrong)}.")
    try:
        pruning.make_pruner(settings)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: optuna's {cls} refuses the settings {settings}: {err}. Fix the value in "
                        f"the sweep file's `pruner`.") from None
    return settings


def load_sweep(target) -> SweepSpec:
    """A sweep file (its sweep dir keeps a copy, for workers that are given the dir) or a sweep dir."""
    from dsgpt.io import atomic_write_text
    target = Path(target)
    if target.is_dir():
        if not (target / SPEC_COPY).is_file():
            raise UserError(f"'{target}' is not a sweep dir: it has no {SPEC_COPY}. Give the sweep file "
                            f"instead (its first run creates <out_dir>/sweeps/<name>/{SPEC_COPY}), or the "
                            f"dir of a sweep that has started.")
        spec = load_spec(target / SPEC_COPY)
        spec.root = target
        return spec
    spec = load_spec(target)
    copy = spec.dir / SPEC_COPY
    text = target.read_text()
    if not copy.is_file() or copy.read_text() != text:
        atomic_write_text(copy, text)
    return spec


# ---- one configuration: its runs and its objective -----------------------------------------------

def _token(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def config_id(params: dict) -> str:
    """A stable name for a configuration: the same values give the same run dirs on a rerun."""
    text = json.dumps(params, sort_keys=True, default=str)
    short = "-".join(f"{k.split('.')[-1]}{_token(v)}" for k, v in sorted(params.items()))[:60]
    return f"{short}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


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
    status: str               # complete | pruned | diverged | failed | interrupted
    value: Optional[float]    # the objective of this run
    error: str = ""


def objective_of(run_dir: Path, metric: str, mode: str, direction: str) -> Optional[float]:
    return pruning.objective_of(pruning.read_metrics(run_dir), metric, mode, direction)


def _stop_reason(text: str) -> Optional[str]:
    """The reason in the last `stopped at step N (REASON)` line of a run's output."""
    for line in reversed(text.splitlines()):
        if line.startswith("stopped at step ") and "(" in line:
            return line[line.index("(") + 1:line.index(")")]
    return None


def finished(run_dir: Path) -> Optional[str]:
    """Why the run ended, or None when it has not: a run stopped by a signal (the sweep was
    stopped or killed) resumes from its checkpoint next time."""
    log = run_dir / "sweep_run.log"
    reason = _stop_reason(log.read_text(errors="replace")) if log.is_file() else None
    return None if reason is None or reason.startswith("signal") else reason


def run_one(spec: SweepSpec, params: dict, seed_offset: int, children: Children, env: Optional[dict] = None,
            lock_fd: Optional[int] = None) -> RunOutcome:
    """Train (or find already trained) one run of a configuration and read its objective. The run
    holds the configuration's lock too (lock_fd), so the lock outlives a killed sweep until the
    run has saved and ended."""
    name = f"{config_id(params)}-s{seed_offset}"
    run_dir = spec.dir / "runs" / name
    reason = finished(run_dir)
    if reason is None:
        cmd = [*sweep_workers.launch_prefix(), sys.executable, str(REPO / "launch" / "train.py"),
               "--config", spec.base, *run_overrides(spec, params, seed_offset, name)]
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / "sweep_run.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "a") as log:
            code = children.run(cmd, dict(os.environ, **(env or {})), log,
                                pass_fds=() if lock_fd is None else (lock_fd,))
        with open(log_path, errors="replace") as log:
            log.seek(start)
            text = log.read()  # this launch's output only
        reason = _stop_reason(text)
        if code is None or (reason or "").startswith("signal") or (reason is None and children.signal):
            return RunOutcome("interrupted", None, "stopped by a signal; a rerun resumes it")
        if code != 0 and reason != "nonfinite":  # a diverged run exits non-zero too
            lines = text.strip().splitlines()
            errors = [x for x in lines if x.startswith("error:")]
            return RunOutcome("failed", None, errors[-1] if errors else "\n".join(lines[-5:]))
    if reason == "nonfinite":
        return RunOutcome("diverged", None, "the loss became non-finite")
    value = objective_of(run_dir, spec.metric, spec.mode, spec.direction)
    if reason == "pruned":
        return RunOutcome("pruned", value)
    if value is None:
        return RunOutcome("failed", None, f"the run logged no finite {spec.metric}")
    return RunOutcome("complete", value)


# ---- the study -----------------------------------------------------------------------------------

def _sampler(spec: SweepSpec, offset: int = 0):
    """A sampler seeded by the sweep's seed and the number of trials so far: the same trials in
    the same order however many workers ask (each worker's own sampler would repeat the others')."""
    import numpy as np
    import optuna
    # Mixed, not seed + offset: generators seeded with neighbouring integers draw alike at first.
    seed = int(np.random.SeedSequence([spec.seed, offset]).generate_state(1)[0])
    if spec.sampler in ("grid", "random"):  # the grid's points are enqueued one by one (claim_next)
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a trial still running counts as a poor result, so workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


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
    spec.dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = pruning.journal_storage(spec.dir / "journal.log")
    return optuna.create_study(study_name=spec.name, storage=storage, sampler=_sampler(spec),
                               direction=spec.direction, load_if_exists=True)


def grid_points(grid: dict) -> list[dict]:
    import itertools
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _grid_size(spec: SweepSpec) -> int:
    """How many configurations the space holds: every axis a list, or (near enough) no end."""
    grid = spec.grid()
    return math.prod(len(v) for v in grid.values()) if grid else 10 ** 9


def _latest(study) -> dict:
    """The last trial of each configuration tried (FrozenTrials by configuration)."""
    latest: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        if t.params:
            latest[_key(t.params)] = t
    return latest


@dataclass
class Claim:
    trial: Any            # an optuna Trial, running
    params: dict
    lock: Optional[int]   # the configuration's lock (an fd)
    how: str              # new | resumed | retried


def _config_lock(spec: SweepSpec, params: dict):
    return spec.dir / "locks" / f"{config_id(params)}.lock"


def claim_next(spec: SweepSpec, study, session: str) -> Optional[Claim]:
    """The next trial for this worker, under the sweep's claim lock: first an interrupted one (running,
    but no worker holds its lock), then one that failed in an earlier launch, then a new one while the
    sweep has fewer settled and running trials than it wants. None when nothing is left."""
    import optuna
    running = optuna.trial.TrialState.RUNNING
    with locked(spec.dir / "locks" / "claim.lock"):
        latest = _latest(study)
        for t in latest.values():
            if t.state == running:
                fd = try_lock(_config_lock(spec, t.params))
                if fd is not None:
                    trial = optuna.trial.Trial(study, t._trial_id)
                    trial.set_user_attr("session", session)
                    return Claim(trial, dict(t.params), fd, "resumed")
        for t in latest.values():
            if t.user_attrs.get("status") == "failed" and t.user_attrs.get("session") != session:
                fd = try_lock(_config_lock(spec, t.params))
                if fd is not None:
                    study.enqueue_trial(dict(t.params))
                    return _ask(spec, study, session, "retried", fd, dict(t.params))
        if len(latest) >= min(spec.trials, _grid_size(spec)):
            return None
        if spec.sampler == "grid":
            # Grid points in order, each once (optuna's GridSampler stops the study itself, which
            # only works inside study.optimize).
            study.enqueue_trial(next(p for p in grid_points(spec.grid()) if _key(p) not in latest))
        return _ask(spec, study, session, "new")


def _ask(spec: SweepSpec, study, session: str, how: str, fd: Optional[int] = None, expected: Optional[dict] = None
         ) -> Claim:
    """Ask the study for a trial; `fd` locks the configuration `expected` (one enqueued to retry)."""
    study.sampler = _sampler(spec, len(study.get_trials(deepcopy=False)))
    trial = study.ask()  # an enqueued trial comes first, with its values
    params = _suggest(trial, spec.space)
    trial.set_user_attr("session", session)
    if fd is not None and _key(params) != _key(expected):
        unlock(fd)  # a trial left enqueued by a worker that died came first, with other values
        fd = None
    if fd is None:
        # A new configuration's lock is free, unless a sampler proposed one that another worker
        # runs now: then this worker waits for it (outside the claim lock) and finds its results.
        fd = try_lock(_config_lock(spec, params))
    return Claim(trial, params, fd, how)


def run_claim(spec: SweepSpec, claim: Claim, children: Children) -> Optional[list[RunOutcome]]:
    """The runs of a claimed configuration; None when a stop signal interrupted one."""
    if claim.lock is None:
        claim.lock = sweep_workers.lock(_config_lock(spec, claim.params))
    outcomes = []
    for r in range(spec.repeats):
        env = {}
        if spec.pruner and r == 0:
            env[pruning.ENV] = json.dumps({
                "journal": str((spec.dir / "journal.log").resolve()), "study": spec.name,
                "trial": claim.trial.number, "pruner": spec.pruner, "metric": spec.metric, "mode": spec.mode,
                "direction": spec.direction})
        outcome = run_one(spec, claim.params, r, children, env, claim.lock)
        if outcome.status == "interrupted":
            return None
        outcomes.append(outcome)
        if outcome.status == "pruned":
            break
    return outcomes


def _record(study, trial, outcomes: list[RunOutcome]) -> None:
    import optuna
    values = [o.value for o in outcomes if o.status == "complete"]
    diverged = any(o.status == "diverged" for o in outcomes)
    failed = [o.error for o in outcomes if o.status == "failed"]
    trial.set_user_attr("runs", len(outcomes))
    if failed:
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("error", failed[0])
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    elif diverged:
        trial.set_user_attr("status", "diverged")
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    elif any(o.status == "pruned" for o in outcomes):
        trial.set_user_attr("status", "pruned")  # its value: the last one reported, at the step it stopped
        study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
    else:
        trial.set_user_attr("status", "complete")
        trial.set_user_attr("std", statistics.stdev(values) if len(values) > 1 else 0.0)
        study.tell(trial, statistics.fmean(values), skip_if_finished=True)


def run_worker(spec: SweepSpec, children: Children, on_trial=None) -> Optional[int]:
    """Claim, run and record trials until the sweep has its trials or a stop signal came. Returns
    the number of a trial left interrupted (a rerun resumes it), else None."""
    study = open_study(spec)
    session = sweep_workers.session()
    while not children.signal:
        claim = claim_next(spec, study, session)
        if claim is None:
            return None
        if claim.how != "new":
            what = "resuming it from its checkpoint" if claim.how == "resumed" else "trying again what failed before"
            print(f"trial {claim.trial.number}: {what}: {claim.params}", flush=True)
        try:
            outcomes = run_claim(spec, claim, children)
            if outcomes is None:
                return claim.trial.number  # its run saved on the signal: left running, resumed later
            _record(study, claim.trial, outcomes)
        finally:
            unlock(claim.lock)
        if on_trial:
            on_trial(records(study), claim.trial.number)
    return None


def run_sweep(spec: SweepSpec, on_trial=None) -> list[dict]:
    """Run the sweep's remaining trials here, one after another; returns every configuration's record."""
    run_worker(spec, Children().install(), on_trial)
    return records(open_study(spec))


def records(study) -> list[dict]:
    """One record per configuration tried (the last attempt of each), best first."""
    rows = []
    for t in _latest(study).values():
        status = t.user_attrs.get("status", "running")
        rows.append({"trial": t.number, "status": status, "params": t.params, "value": t.value,
                     "std": t.user_attrs.get("std"), "runs": t.user_attrs.get("runs"),
                     "step": t.last_step if status == "pruned" else None,
                     "error": t.user_attrs.get("error", ""), "config": config_id(t.params)})
    sign = 1 if study.direction.name == "MINIMIZE" else -1
    return sorted(rows, key=lambda r: (STATUS_ORDER.index(r["status"]) if r["status"] in STATUS_ORDER else 9,
                                       r["value"] is None, sign * (r["value"] or 0.0)))


# ---- results -------------------------------------------------------------------------------------

def write_results(spec: SweepSpec, rows: list[dict], plots: bool = False) -> None:
    """sweep.json, sweep.csv and the TensorBoard HParams entries in the sweep dir (and the plots)."""
    from dsgpt.io import atomic_write_json, atomic_write_text
    with locked(spec.dir / "locks" / "results.lock"):  # workers finishing together take turns
        atomic_write_json(spec.dir / "sweep.json", {"name": spec.name, "objective": {
            "metric": spec.metric, "mode": spec.mode, "direction": spec.direction}, "pruner": spec.pruner,
            "trials": rows})
        keys = list(spec.space)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["trial", "status", *keys, "objective", "std", "runs", "pruned_at_step", "error"])
        for r in rows:
            w.writerow([r["trial"], r["status"], *(r["params"].get(k) for k in keys), r["value"], r["std"],
                        r["runs"], r["step"], r["error"]])
        atomic_write_text(spec.dir / "sweep.csv", buf.getvalue())
        _write_hparams(spec, rows)
        if plots:
            from dsgpt.sweep_plots import write_plots
            write_plots(spec, rows)


def _write_hparams(spec: SweepSpec, rows: list[dict]) -> None:
    import shutil

    from torch.utils.tensorboard import SummaryWriter
    tb = spec.dir / "tb"
    shutil.rmtree(tb, ignore_errors=True)  # rewritten whole: a rerun's results replace the last ones
    metric = f"hparam/{spec.metric}"
    for r in rows:
        if r["status"] != "complete" or r["value"] is None:  # a pruned trial's value is from earlier on
            continue
        with SummaryWriter(log_dir=str(tb / r["config"])) as w:
            w.add_hparams({k: v for k, v in r["params"].items()}, {metric: r["value"]}, run_name=".")


def format_table(spec: SweepSpec, rows: list[dict]) -> str:
    keys = list(spec.space)
    head = ["trial", "status", *keys, f"{spec.mode} {spec.metric}"]
    lines = [head]
    for r in rows:
        value = "" if r["value"] is None else (f"{r['value']:.4f}" + (f" ± {r['std']:.4f}" if r["std"] else ""))
        if r["status"] == "pruned" and r["step"] is not None:
            value += f" (step {r['step']})"
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


# ---- the command ---------------------------------------------------------------------------------

def _progress(spec: SweepSpec):
    def show(rows: list[dict], number: int) -> None:
        write_results(spec, rows)  # after every trial: a killed sweep leaves its results so far
        row = next((r for r in rows if r["trial"] == number), None)
        if row is None:  # a later trial of the same values (another worker's) stands for them
            print(f"trial {number} done", flush=True)
            return
        value = "" if row["value"] is None else f" {row['value']:.4f}"
        at = f" at step {row['step']}" if row["step"] is not None else ""
        print(f"trial {number} {row['status']}{value}{at}: {row['params']}", flush=True)
    return show


def main(sweep_file: Optional[str] = None, worker: Optional[str] = None, jobs: int = 1) -> int:
    """`dsgpt sweep FILE [--jobs N]` and `dsgpt sweep --worker FILE|DIR`."""
    if (sweep_file is None) == (worker is None):
        raise UserError("dsgpt sweep needs either a sweep file (`dsgpt sweep configs/sweeps/lr-tiny.yaml`) or "
                        "--worker with a sweep file or sweep dir (`dsgpt sweep --worker runs/sweeps/lr-tiny`), "
                        "not both and not neither.")
    if jobs < 1 or (worker is not None and jobs != 1):
        raise UserError(f"--jobs {jobs}: give a number >= 1 of workers to run here side by side, with a sweep "
                        f"file (`dsgpt sweep FILE --jobs 2`); a --worker is one worker: start several for more.")
    spec = load_sweep(worker if worker is not None else sweep_file)
    pruner = f", pruner {spec.pruner['type']}" if spec.pruner else ""
    print(f"sweep {spec.name}: {spec.sampler}, {min(spec.trials, _grid_size(spec))} trial(s) x {spec.repeats} "
          f"run(s), {spec.mode} {spec.metric} ({spec.direction}){pruner}; {jobs} worker(s) here; results in "
          f"{spec.dir}", flush=True)
    children = Children().install()
    if jobs > 1:
        bad = sweep_workers.run_workers(spec.dir, jobs, children)
        left = None
    else:
        bad, left = 0, run_worker(spec, children, _progress(spec))
    rows = records(open_study(spec))
    write_results(spec, rows, plots=True)
    print(format_table(spec, rows))
    if children.signal or left is not None:
        import signal
        why = signal.Signals(children.signal).name if children.signal else "a signal to its trial"
        saved = f"; trial {left} saved a checkpoint" if left is not None else ""
        again = f"dsgpt sweep --worker {worker}" if worker is not None else f"dsgpt sweep {sweep_file}"
        print(f"sweep stopped by {why}{saved}. Run `{again}` again to resume and go on.", flush=True)
    return 1 if bad else 0


def _worker_main(sweep_dir: str) -> int:
    """One of the `--jobs` workers: trials and a line each; the parent writes the plots and the table."""
    sweep_workers.apply_cpu_share()
    spec = load_sweep(sweep_dir)
    run_worker(spec, Children().install(), _progress(spec))
    return 0


if __name__ == "__main__":
    from dsgpt.sweep import _worker_main as entry  # the module itself, not a second copy as __main__
    sys.exit(entry(sys.argv[1]))
