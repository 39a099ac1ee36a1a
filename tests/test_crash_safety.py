"""A run killed anywhere in a save resumes from an intact checkpoint and logs each step once;
damaged checkpoints are skipped with a message; a changed seed or a wrong init_from is refused;
nothing dsgpt reads from a run dir is unpickled."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, launch, losses, run_jobs, tiny_overrides
from dsgpt.train.checkpoint import FAULT_POINTS

COMMON = ("train.save_interval=2", "train.eval_interval=2", "optim.decay_steps=4", "model.dropout=0.1")


def job(corpus, out, name, max_steps, *extra):
    return {"name": name, "overrides": tiny_overrides(corpus, out, name, f"train.max_steps={max_steps}",
                                                      *COMMON, *extra)}


def run_to_fault(corpus, out, work: Path, name: str, point: str):
    """Continue `name` to step 4 in a process that is SIGKILLed at `point` of step 4's save."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps([job(corpus, out, name, 4)]))
    proc = launch("tests/workers/train_jobs.py", [str(work / "jobs.json"), str(work / "results")], check=False,
                  DSGPT_FAULT_AT=point)
    assert proc.returncode != 0, f"the fault at {point} did not fire\n{proc.stdout[-2000:]}"


@pytest.fixture(scope="module")
def crashed(corpus, tmp_path_factory):
    """For each fault point: a run saved at step 2, killed in step 4's save, then relaunched."""
    work = tmp_path_factory.mktemp("crash")
    out = work / "runs"
    first = [job(corpus, out, p, 2) for p in FAULT_POINTS] + [job(corpus, out, "straight", 4),
                                                             job(corpus, out, "truncated", 4)]
    results = run_jobs(first, ranks=1, work=work / "first")
    states = {}
    for point in FAULT_POINTS:
        run_to_fault(corpus, out, work / f"fault-{point}", point, point)
        ckpt = out / point / "checkpoints"
        states[point] = {"latest": (ckpt / "latest").read_text(), "tags": sorted(p.name for p in ckpt.iterdir())}
    # Damage the newest checkpoint of a finished run: cut its model file short.
    model_file = next((out / "truncated" / "checkpoints" / "step0000004").glob("*model_states.pt"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    again = [job(corpus, out, p, 4) for p in FAULT_POINTS] + [job(corpus, out, "truncated", 6)]
    resumed = run_jobs(again, ranks=1, work=work / "again")
    return results, resumed, states, out


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_kill_inside_a_save_resumes_from_an_intact_checkpoint(crashed, point):
    first, resumed, states, out = crashed
    assert states[point]["latest"] == "step0000002"  # `latest` never named the half-saved step 4
    summary = resumed[point][0]
    assert "error" not in summary, summary
    assert summary["first_step"] == 3 and summary["last_step"] == 4
    assert losses(first[point][0]) + losses(summary) == losses(first["straight"][0])
    assert (out / point / "checkpoints" / "latest").read_text() == "step0000004"


@pytest.mark.parametrize("point", ["after_rng", "before_latest"])
def test_each_step_is_logged_once_after_a_crash(crashed, point):
    first, resumed, _, out = crashed
    run_dir = out / point
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4]
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    from_tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in from_tb] == [1, 2, 3, 4]
    expected = losses(first[point][0]) + losses(resumed[point][0])
    assert [v for _, v in from_tb] == pytest.approx(expected, rel=1e-6)  # the relaunch's values, stored as float32
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]


def test_a_truncated_newest_checkpoint_is_skipped(crashed):
    _, resumed, _, out = crashed
    summary = resumed["truncated"][0]
    assert summary["first_step"] == 3 and summary["last_step"] == 6  # from step 2, not the damaged step 4
    assert (out / "truncated" / "checkpoints" / "latest").read_text() == "step0000006"


# ---- refusals ------------------------------------------------------------------------------------

def test_a_changed_seed_and_a_bad_init_from_are_refused(crashed, corpus, tmp_path):
    _, _, _, out = crashed
    src = out / "straight"
    legacy = tmp_path / "legacy"  # a checkpoint without manifest whose model files are gone
    shutil.copytree(src / "checkpoints" / "step0000004", legacy / "checkpoints" / "step0000004")
    (legacy / "checkpoints" / "latest").write_text("step0000004")
    (legacy / "checkpoints" / "step0000004" / "manifest.json").unlink()
    for f in (legacy / "checkpoints" / "step0000004").glob("*model_states.pt"):
        f.unlink()
    new = tmp_path / "runs"
    jobs = [
        {"name": "seed", "overrides": job(corpus, out, "straight", 6, "run.seed=7")["overrides"]},
        job(corpus, new, "shape", 2, f"train.init_from={src}", "model.n_embd=32"),
        job(corpus, new, "nothing_loaded", 2, f"train.init_from={legacy}"),
        job(corpus, new, "no_checkpoint", 2, f"train.init_from={tmp_path}"),
    ]
    res = run_jobs(jobs, ranks=1, work=tmp_path / "w")
    assert "run.seed" in res["seed"][0]["error"] and "new run.name" in res["seed"][0]["error"]
    assert "holds a model of shape" in res["shape"][0]["error"] and "'n_embd': 32" in res["shape"][0]["error"]
    assert "loaded nothing" in res["nothing_loaded"][0]["error"]
    assert "holds no checkpoint" in res["no_checkpoint"][0]["error"]
    for name in ("shape", "nothing_loaded", "no_checkpoint"):
        assert not (new / name / "checkpoints").exists()


class _Marker:
    """Unpickling this creates a file: proof that somebody ran code from the run dir."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Marker(str(marker))))


VICTIMS = ("rng_rank00000.json", "dsgpt_state.json", "manifest.json", "legacy_rng")


@pytest.fixture(scope="module")
def planted(crashed, corpus, tmp_path_factory):
    """A copy of a trained run per victim file, with a marker-writing pickle planted in its place;
    eval, generate and export read each copy, then one launch resumes training in all of them."""
    _, _, _, out = crashed
    work = tmp_path_factory.mktemp("planted")
    procs, jobs = {}, []
    for victim in VICTIMS:
        run_dir = work / "runs" / victim.replace(".", "_")
        shutil.copytree(out / "straight", run_dir)
        tag_dir = run_dir / "checkpoints" / "step0000004"
        marker = work / f"MARKER-{victim}"
        if victim == "legacy_rng":  # a checkpoint of an earlier dsgpt: RNG state pickled, no manifest
            (tag_dir / "rng_rank00000.json").unlink()
            (tag_dir / "manifest.json").unlink()
            plant(tag_dir / "rng_rank00000.pt", marker)
        else:
            plant(tag_dir / victim, marker)
        # Eval and generate first: the training launch rewrites step 4 when it gets there again.
        procs[victim] = [
            launch("launch/eval.py", ["--run", str(run_dir), "--checkpoint", "step0000004"], check=False),
            launch("launch/generate.py", ["--run", str(run_dir), "--checkpoint", "step0000004",
                                          "--max-new-tokens", "4"], check=False),
            launch(str(REPO / "dsgpt" / "cli.py"), ["export", "--run", str(run_dir), "--checkpoint", "step0000004",
                                                    "--hf", str(work / f"hf-{run_dir.name}")], check=False)]
        jobs.append(job(corpus, work / "runs", run_dir.name, 5))
    (work / "jobs.json").write_text(json.dumps(jobs))
    # One process resumes every copy; its output is split by the run names it prints.
    train = launch("tests/workers/train_jobs.py", [str(work / "jobs.json"), str(work / "results")])
    return work, procs, train.stdout


@pytest.mark.parametrize("victim", VICTIMS)
def test_dsgpt_never_unpickles_its_own_files(planted, victim):
    work, procs, train_log = planted
    assert not (work / f"MARKER-{victim}").exists(), "a pickle from the run dir was unpickled"
    evaluate, generate, export = procs[victim]
    for proc in (evaluate, generate, export):
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((work / "results" / f"{victim.replace('.', '_')}.rank0.json").read_text())
    assert "error" not in summary, summary
    if victim == "legacy_rng":
        assert summary["first_step"] == 5 and "old pickle format" in train_log
        for proc in (evaluate, generate, export):
            assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        # The manifest no longer matches the files: training falls back to step 2; eval, generate
        # and export refuse the checkpoint.
        assert summary["first_step"] == 3
        assert (f"is damaged: {victim}" in train_log if victim != "manifest.json"
                else "manifest.json is unreadable" in train_log)
        for proc in (evaluate, generate, export):
            assert proc.returncode == 2 and "damaged" in proc.stderr, proc.stderr[-3000:]
    assert "resuming from the newest intact checkpoint, step0000002" in train_log
