"""`dsgpt sweep`: a 4-trial grid over the learning rate of the tiny model, including a near-zero and a
diverging rate, end to end, with its table, HParams and plots; a pruner stops a hopeless trial; a
crashing trial is recorded as failed; a rerun skips what finished; a killed sweep leaves no trial
running and its rerun resumes the interrupted trial; `--jobs 2` runs trials side by side; the sweep
file's and the command line's mistakes are clear errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import PY, REPO, child_env, launch, tiny_overrides
from dsgpt import cli
from dsgpt.errors import UserError
from dsgpt.runs import STATE_FILE
from dsgpt.sweep import load_spec, open_study, trial_config
from dsgpt.train.pruning import read_metrics

LRS = [1.0e-7, 3.0e-3, 1.0e-2, 1.0e30]


def write_sweep(path, corpus, out_dir, **extra) -> None:
    base = tiny_overrides(corpus, out_dir, "unused", "train.eval_interval=10", "train.save_interval=100",
                          "optim.warmup_steps=0", "optim.schedule=constant", "train.max_nonfinite_steps=2")
    spec = {"name": "lr", "base": "configs/tiny.yaml", "overrides": [o for o in base if not o.startswith("run.")],
            "space": {"optim.lr": LRS}, "trials": 4, "budget": {"steps": 30}, "out_dir": str(out_dir),
            "objective": {"metric": "val/loss", "mode": "best", "direction": "minimize"}, **extra}
    path.write_text(yaml.safe_dump(spec))


@pytest.fixture(scope="module")
def swept(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    sweep_file = work / "lr.yaml"
    write_sweep(sweep_file, corpus, work / "runs")
    proc = launch("dsgpt/cli.py", ["sweep", str(sweep_file)], timeout=900)
    return {"file": sweep_file, "dir": work / "runs" / "sweeps" / "lr", "stdout": proc.stdout, "work": work}


def test_the_sweep_ranks_its_trials(swept):
    result = json.loads((swept["dir"] / "sweep.json").read_text())
    rows = {r["params"]["optim.lr"]: r for r in result["trials"]}
    assert sorted(rows) == sorted(LRS)
    assert rows[1.0e30]["status"] == "diverged" and rows[1.0e30]["value"] is None
    best = result["trials"][0]
    assert best["status"] == "complete" and best["params"]["optim.lr"] not in (min(LRS), max(LRS))
    assert rows[1.0e-7]["value"] - best["value"] >= 0.3, result["trials"]  # the near-zero rate learnt nothing
    assert "diverged" in swept["stdout"] and (swept["dir"] / "sweep.csv").read_text().count("\n") == 5


def test_hparams_hold_every_trial(swept):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(swept["dir"] / "tb"))
    mux.Reload()
    found = {}
    for run in mux.Runs():
        content = mux.PluginRunToTagToContent("hparams").get(run, {})
        for tag, raw in content.items():
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            if data.HasField("session_start_info"):
                found[run] = data.session_start_info.hparams["optim.lr"].number_value
        scalars = mux.GetAccumulator(run).Tags()["scalars"]
        assert "hparam/val/loss" in scalars, (run, scalars)
    assert sorted(found.values()) == sorted(x for x in LRS if x != 1.0e30)  # the diverged one has no objective


def test_each_trial_is_the_base_config_plus_its_values(swept):
    spec = load_spec(swept["file"])
    cfg = trial_config(spec, {"optim.lr": 3.0e-3})
    assert cfg.optim.lr == 3.0e-3 and cfg.train.max_steps == 30 and cfg.optim.schedule == "constant"
    assert cfg.run.dir.parent == spec.dir / "runs"


def test_a_rerun_skips_finished_trials(swept):
    proc = launch("dsgpt/cli.py", ["sweep", str(swept["file"])], timeout=300)
    for prov in (swept["dir"] / "runs").glob("*/provenance.jsonl"):
        assert len(prov.read_text().splitlines()) == 1, prov  # launched once
    assert proc.stdout.count("diverged") >= 1


def test_a_crashing_trial_is_recorded_as_failed(corpus, tmp_path):
    sweep_file = tmp_path / "bad.yaml"
    write_sweep(sweep_file, corpus, tmp_path / "runs", name="heads", space={"model.n_head": [2, 5]}, trials=2)
    proc = launch("dsgpt/cli.py", ["sweep", str(sweep_file)], timeout=600)
    rows = {r["params"]["model.n_head"]: r for r in
            json.loads((tmp_path / "runs" / "sweeps" / "heads" / "sweep.json").read_text())["trials"]}
    assert rows[2]["status"] == "complete"
    assert rows[5]["status"] == "failed" and "n_head" in rows[5]["error"], rows[5]
    assert "trial" in proc.stdout and "failed" in proc.stdout


@pytest.mark.parametrize("edit, words", [
    ({"space": {"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}}, "low > 0"),
    ({"sampler": "annealing"}, "not one of grid, random, tpe"),
    ({"objective": {"mode": "median"}}, "objective.mode"),
    ({"spaces": {}}, "unknown keys"),
    ({"pruner": "hyperband"}, "not one of median, successive_halving"),
    ({"pruner": {"type": "median", "patience": 3}}, "has no setting patience"),
    ({"pruner": {"type": "median", "n_warmup_steps": "10"}}, "must be whole numbers"),
    ({"pruner": {"type": "successive_halving", "reduction_factor": 1}}, "reduction_factor >= 2"),
])
def test_sweep_file_mistakes(tmp_path, corpus, edit, words, capsys):
    path = tmp_path / "s.yaml"
    write_sweep(path, corpus, tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw.update(edit)
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["sweep", str(path)]) == 2
    assert words in capsys.readouterr().err
    with pytest.raises(UserError):
        load_spec(path)
    assert REPO.is_dir()


@pytest.mark.parametrize("args, words", [
    ([], "either a sweep file"),
    (["{file}", "--worker", "{file}"], "not both"),
    (["{file}", "--jobs", "0"], "--jobs 0"),
    (["--worker", "{tmp}"], "is not a sweep dir"),
])
def test_sweep_command_mistakes(tmp_path, corpus, args, words, capsys):
    path = tmp_path / "s.yaml"
    write_sweep(path, corpus, tmp_path)
    argv = ["sweep", *(a.format(file=path, tmp=tmp_path) for a in args)]
    assert cli.main(argv) == 2
    assert words in capsys.readouterr().err


def test_plots_are_written(swept):
    import matplotlib.image
    for name in ("objective_vs_optim.lr.png", "curves.png"):
        path = swept["dir"] / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        height, width = matplotlib.image.imread(path).shape[:2]
        assert height >= 300 and width >= 500


def test_a_hopeless_trial_is_pruned(corpus, tmp_path):
    sweep_file = tmp_path / "prune.yaml"
    # Trial 0 (a good rate) completes first; the near-zero rate may be pruned from step 11 on, so
    # at its second evaluation (step 20), below trial 0's median there.
    write_sweep(sweep_file, corpus, tmp_path / "runs", name="prune", space={"optim.lr": [3.0e-3, 1.0e-7]},
                trials=2, pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 11})
    proc = launch("dsgpt/cli.py", ["sweep", str(sweep_file)], timeout=600)
    sweep_dir = tmp_path / "runs" / "sweeps" / "prune"
    rows = {r["params"]["optim.lr"]: r for r in json.loads((sweep_dir / "sweep.json").read_text())["trials"]}
    assert rows[3.0e-3]["status"] == "complete", rows
    low = rows[1.0e-7]
    assert low["status"] == "pruned" and low["step"] == 20, low
    run_dir = sweep_dir / "runs" / f"{low['config']}-s0"
    assert "stopped at step 20 (pruned)" in (run_dir / "sweep_run.log").read_text()
    assert [r["step"] for r in read_metrics(run_dir) if "val/loss" in r] == [10, 20]  # no evaluation after
    assert (run_dir / "checkpoints" / "latest").read_text() == "step0000020"  # a clean stop saves
    trial = open_study(load_spec(sweep_file)).trials[low["trial"]]
    assert trial.state.name == "PRUNED" and sorted(trial.intermediate_values) == [10, 20]
    assert low["value"] == trial.intermediate_values[20]
    assert re.search(r"trial 1 pruned [\d.]+ at step 20", proc.stdout), proc.stdout


def test_every_rank_follows_the_pruner(corpus, tmp_path):
    import optuna

    from dsgpt.train.pruning import journal_storage
    study = optuna.create_study(study_name="s", storage=journal_storage(tmp_path / "journal.log"))
    done = study.ask()
    for step in (10, 20, 30):
        done.report(1.0, step)  # a finished trial far better than any run of this model
    study.tell(done, 1.0)
    trial = study.ask()
    info = {"journal": str(tmp_path / "journal.log"), "study": "s", "trial": trial.number,
            "pruner": {"type": "median", "n_startup_trials": 1}, "metric": "val/loss", "mode": "best",
            "direction": "minimize"}
    overrides = tiny_overrides(corpus, tmp_path / "runs", "ranks", "train.max_steps=30", "train.eval_interval=10")
    proc = launch("launch/train.py", ["--config", "configs/tiny.yaml", *overrides], ranks=2,
                  DSGPT_SWEEP_TRIAL=json.dumps(info))
    assert "[dsgpt] rank 1/2" in proc.stdout and "stopped at step 10 (pruned)" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "runs/ranks/checkpoints/latest").read_text() == "step0000010"  # both ranks saved
    assert list(study.trials[trial.number].intermediate_values) == [10]


def _sweep_processes(marker: str) -> list[int]:
    """Live processes (not zombies) whose command line names `marker`."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(x for x in (pid_dir / "status").read_text().splitlines() if x.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker in cmd and "zombie" not in state:
            found.append(int(pid_dir.name))
    return found


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.mark.parametrize("how", ["sigkill_sweep", "ctrl_c_group"])
def test_a_killed_sweep_resumes(corpus, tmp_path, how):
    steps = 60
    lrs = [1.0e-3, 3.0e-3, 1.0e-2] if how == "sigkill_sweep" else [1.0e-3, 3.0e-3]  # one never started, or none
    sweep_file = tmp_path / "kill.yaml"
    write_sweep(sweep_file, corpus, tmp_path / "runs", name="kill", space={"optim.lr": lrs}, trials=len(lrs),
                budget={"steps": steps})
    sweep_dir = tmp_path / "runs" / "sweeps" / "kill"
    out = open(tmp_path / "first.out", "w")
    sweep = subprocess.Popen([PY, str(REPO / "dsgpt/cli.py"), "sweep", str(sweep_file)], cwd=REPO, env=child_env(),
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Mid-way: the first trial finished, the second has trained a few steps.
        deadline = time.time() + 240
        while True:
            assert time.time() < deadline and sweep.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
            logs = {p.parent: p.read_text() for p in sweep_dir.glob("runs/*/sweep_run.log")}
            done = [d for d, text in logs.items() if "stopped at step" in text]
            going = [d for d, text in logs.items() if "stopped at step" not in text and len(_train_steps(d)) >= 5]
            if len(done) == 1 and going:
                break
            time.sleep(0.05)
        (first,), (second,) = done, going
        trial_pid = int(re.search(r"\[dsgpt\] rank 0/1 .* pid (\d+)", logs[second]).group(1))
        assert trial_pid in _sweep_processes(str(sweep_dir))
        if how == "sigkill_sweep":
            os.kill(sweep.pid, signal.SIGKILL)  # no handler runs: the trial hears of it from the kernel
        else:
            os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C in the sweep's terminal
        code = sweep.wait(timeout=120)
        deadline = time.time() + 120
        while _sweep_processes(str(sweep_dir)):
            assert time.time() < deadline, f"trial processes outlived the sweep: {_sweep_processes(str(sweep_dir))}"
            time.sleep(0.2)
        text = (second / "sweep_run.log").read_text()
        saved = int(re.search(r"stopped at step (\d+) \(signal:SIGTERM\)", text).group(1))
        assert 5 <= saved < steps, text[-2000:]
        if how == "ctrl_c_group":
            assert code == 0 and "sweep stopped by SIGINT" in (tmp_path / "first.out").read_text()

        rerun = launch("dsgpt/cli.py", ["sweep", str(sweep_file)], timeout=600)
    finally:
        out.close()
        _kill_all([sweep.pid, *_sweep_processes(str(sweep_dir))])
    rows = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    assert [r["status"] for r in rows] == ["complete"] * len(lrs), rows
    assert "resuming it from its checkpoint" in rerun.stdout, rerun.stdout
    assert len(re.findall(r"^\d+\s+complete", rerun.stdout, re.M)) == len(lrs), rerun.stdout  # the table
    runs = {p.parent: len(p.read_text().splitlines()) for p in sweep_dir.glob("runs/*/provenance.jsonl")}
    assert len(runs) == len(lrs) and runs[first] == 1 and runs[second] == 2, runs  # finished: not run again
    assert _train_steps(second) == list(range(1, steps + 1))  # every step once
    latest = (second / "checkpoints" / "latest").read_text()
    history = json.loads((second / "checkpoints" / latest / STATE_FILE).read_text())["history"]
    assert [h["start_step"] for h in history] == [1, saved + 1]  # resumed from the checkpoint it saved


def test_jobs_run_trials_side_by_side(corpus, tmp_path):
    sweep_file = tmp_path / "jobs.yaml"
    write_sweep(sweep_file, corpus, tmp_path / "runs", name="jobs", space={"optim.lr": [1.0e-3, 3.0e-3]},
                trials=2, budget={"steps": 20})
    sweep_dir = tmp_path / "runs" / "sweeps" / "jobs"
    out = open(tmp_path / "sweep.out", "w")
    sweep = subprocess.Popen([PY, str(REPO / "dsgpt/cli.py"), "sweep", str(sweep_file), "--jobs", "2"], cwd=REPO,
                             env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    together = {}  # trial pid -> the cores it may use, for trials seen alive at the same time
    try:
        deadline = time.time() + 300
        while sweep.poll() is None:
            assert time.time() < deadline, (tmp_path / "sweep.out").read_text()[-3000:]
            trials = {}
            for pid in _sweep_processes(str(sweep_dir)):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    if "launch/train.py" in Path(f"/proc/{pid}/cmdline").read_text():
                        trials[pid] = re.search(r"Cpus_allowed_list:\s*(\S+)", status).group(1)
                except OSError:
                    continue
            if len(trials) > len(together):
                together = trials
            time.sleep(0.1)
    finally:
        out.close()
        _kill_all([sweep.pid, *_sweep_processes(str(sweep_dir))])
    text = (tmp_path / "sweep.out").read_text()
    assert sweep.returncode == 0, text[-3000:]
    assert len(together) == 2, (together, text[-3000:])  # two trials ran at once
    if len(os.sched_getaffinity(0)) >= 2:
        assert len(set(together.values())) == 2, together  # on cores of their own
    assert sorted(re.findall(r"^worker (\d): CPUs", text, re.M)) == ["0", "1"], text
    rows = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    assert sorted(r["status"] for r in rows) == ["complete", "complete"], rows
    assert len(re.findall(r"^\d+\s+complete", text, re.M)) == 2 and (sweep_dir / "curves.png").exists()
