"""`dsgpt sweep`: a 4-trial grid over the learning rate of the tiny model, including a near-zero and a
diverging rate, end to end; a crashing trial is recorded as failed; a rerun skips what finished;
the sweep file's mistakes are clear errors."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, launch, tiny_overrides
from dsgpt import cli
from dsgpt.errors import UserError
from dsgpt.sweep import load_spec, trial_config

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
