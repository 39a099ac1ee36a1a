"""Resume on another number of ranks or another ZeRO stage (dsgpt.train.reshard).

One run (global batch 8, micro batch 2, fp32, dropout 0) is saved at step 4 on 2 ranks under
ZeRO 0, 1 and 3, then continued through chains of resumes: 2 -> 4 -> 2 ranks, 2 -> 1 -> 2,
ZeRO 1 <-> 3, 3 -> 2, 1 -> 2, 0 <-> 1, 0 -> 0. Right after each resume Adam's exp_avg,
exp_avg_sq and step count, each parameter group's hyperparameters and the LR schedule must equal
the saved ones (1e-7), and every resumed step's loss must follow the uninterrupted run (relative
1e-5). A resume that resets Adam's state must fail both checks.

Four launches in all (2, 4, 1 and 2 ranks), several jobs each (tests/workers/reshard_jobs.py).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import DEEPSPEED, PY, REPO, child_env, free_port
from dsgpt.errors import UserError
from dsgpt.train import reshard

GLOBAL = 8
STATE_TOL = 1e-7
LOSS_RTOL = 1e-5
TIMINGS: dict[str, float] = {}


def _overrides(data: Path, zero: int) -> list[str]:
    return [f"data.path={data}", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
            "model.dropout=0.0", "precision=fp32", "train.micro_batch_size=2", "train.max_steps=8",
            "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=3", f"deepspeed.zero_stage={zero}"]


def _launch(jobs: list[dict], ranks: int, work: Path, label: str) -> None:
    """One launch of tests/workers/reshard_jobs.py."""
    work.mkdir(parents=True, exist_ok=True)
    jobs_file = work / f"{label}.json"
    jobs_file.write_text(json.dumps(jobs))
    script = str(REPO / "tests" / "workers" / "reshard_jobs.py")
    port = free_port()
    if ranks == 1:
        cmd = [PY, script, str(jobs_file), str(work / "results")]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), script, str(jobs_file),
               str(work / "results")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    TIMINGS[f"{label} ({ranks} rank(s), {len(jobs)} jobs)"] = time.perf_counter() - t0
    assert proc.returncode == 0, f"{label} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("reshard")
    ck = work / "ck"

    def tag(run, step):
        return str(ck / run / f"step{step:07d}")

    def job(name, zero, *, run, resume=None, start=0, save_at=None, reset=False):
        j = {"name": name, "overrides": _overrides(corpus, zero), "global_batch": GLOBAL, "last": 8,
             "run": run, "zero": zero}
        if resume:
            j.update(resume=resume, start=start)
        if save_at:
            j.update(save_at=save_at, save_dir=str(ck / name))
        if reset:
            j["reset"] = True
        return j

    launches = [
        (2, "L1", [job("A1", 1, run="A1", save_at=4), job("A3", 3, run="A3", save_at=4),
                   job("A0", 0, run="A0", save_at=4)]),
        (4, "L2", [job("B1", 1, run="A1", resume=tag("A1", 4), start=4, save_at=6),       # 2 -> 4, ZeRO 1
                   job("B3", 3, run="A3", resume=tag("A3", 4), start=4, save_at=6)]),      # 2 -> 4, ZeRO 3
        (1, "L3", [job("C1", 1, run="A1", resume=tag("A1", 4), start=4, save_at=6),       # 2 -> 1, ZeRO 1
                   job("C3", 3, run="A3", resume=tag("A3", 4), start=4, save_at=6),       # 2 -> 1, ZeRO 3
                   job("C13", 3, run="A1", resume=tag("A1", 4), start=4),                 # 2 -> 1, ZeRO 1 -> 3
                   job("C10", 0, run="A1", resume=tag("A1", 4), start=4),                 # 2 -> 1, ZeRO 1 -> 0
                   job("C01", 1, run="A0", resume=tag("A0", 4), start=4),                 # 2 -> 1, ZeRO 0 -> 1
                   job("C00", 0, run="A0", resume=tag("A0", 4), start=4),                 # 2 -> 1, ZeRO 0
                   job("C12", 2, run="A1", resume=tag("A1", 4), start=4),                 # 2 -> 1, ZeRO 1 -> 2
                   job("Creset", 1, run="A1", resume=tag("A1", 4), start=4, reset=True)]),  # the mutation
        (2, "L4", [job("D1", 1, run="A1", resume=tag("C1", 6), start=6),                  # 1 -> 2, ZeRO 1
                   job("D3", 3, run="A3", resume=tag("C3", 6), start=6),                  # 1 -> 2, ZeRO 3
                   job("D31", 1, run="A3", resume=tag("B3", 6), start=6),                 # 4 -> 2, ZeRO 3 -> 1
                   job("D13", 3, run="A1", resume=tag("A1", 4), start=4),                 # 2 -> 2, ZeRO 1 -> 3
                   job("D32", 2, run="A3", resume=tag("B3", 6), start=6)]),               # 4 -> 2, ZeRO 3 -> 2
    ]
    jobs, results = {}, {}
    for ranks, label, batch in launches:
        _launch(batch, ranks, work, label)
        for j in batch:
            res = json.loads((work / "results" / f"{j['name']}.json").read_text())
            assert "error" not in res, f"{j['name']}: {res['error']}"
            jobs[j["name"]], results[j["name"]] = dict(j, ranks=ranks), res
    print("\nreshard launches (s):", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))
    return {"jobs": jobs, "results": results, "work": work, "tag": tag}


def _snap(runs, name: str, which: str) -> dict:
    return torch.load(runs["work"] / "results" / f"{name}.{which}.pt", weights_only=False)


def _source(runs, name: str) -> tuple[str, int]:
    """The job whose save the resume `name` loaded, and the step."""
    j = runs["jobs"][name]
    return Path(j["resume"]).parent.name, j["start"]


def state_mismatch(saved: dict, resumed: dict) -> list[str]:
    """What differs between two Adam states (empty when equal to STATE_TOL), with the max abs diffs."""
    problems, worst = [], {}
    if set(saved["params"]) != set(resumed["params"]):
        problems.append(f"parameters differ: {set(saved['params']) ^ set(resumed['params'])}")
    for name in saved["params"]:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            a, b = saved["params"][name][key], resumed["params"].get(name, {}).get(key)
            if b is None or a.shape != b.shape:
                problems.append(f"{name}.{key}: missing or misshapen after the resume")
                continue
            worst[key] = max(worst.get(key, 0.0), float((a - b).abs().max()))
    problems += [f"max |{k} diff| = {v:.3g}" for k, v in worst.items() if v > STATE_TOL]
    want = {s for per_rank in saved["steps"] for s in per_rank}
    for rank, steps in enumerate(resumed["steps"]):
        if set(steps) != want:
            problems.append(f"Adam step on rank {rank} is {steps}, saved {sorted(want)}")
    if resumed["groups"] != saved["groups"]:  # e.g. weight decay per parameter group
        problems.append(f"optimizer groups {resumed['groups']} != saved {saved['groups']}")
    if resumed["sched"] != saved["sched"]:
        problems.append(f"LR scheduler {resumed['sched']} != saved {saved['sched']}")
    if resumed["global_steps"] != saved["global_steps"]:
        problems.append(f"engine.global_steps {resumed['global_steps']} != {saved['global_steps']}")
    return problems


def loss_mismatch(runs, name: str) -> tuple[list[str], float]:
    got = runs["results"][name]["losses"]
    ref = runs["results"][runs["jobs"][name]["run"]]["losses"]
    rel = {s: abs(got[s] - ref[s]) / abs(ref[s]) for s in got}
    worst = max(rel.values())
    return [f"step {s}: loss {got[s]!r} vs uninterrupted {ref[s]!r} (rel {r:.2g})"
            for s, r in rel.items() if r > LOSS_RTOL], worst


RESUMES = ["B1", "B3", "C1", "C3", "C13", "C10", "C01", "C00", "C12", "D1", "D3", "D31", "D13", "D32"]


@pytest.mark.parametrize("name", RESUMES)
def test_resume_carries_the_optimizer_and_follows_the_run(runs, name):
    job, res = runs["jobs"][name], runs["results"][name]
    src, start = _source(runs, name)
    saved = _snap(runs, src, "saved")
    resumed = _snap(runs, name, "resumed")
    assert state_mismatch(saved, resumed) == []
    # Adam really stepped from there: its count after two more steps is start + 2 (not reset, not
    # advanced twice per step).
    if job.get("save_at"):
        assert _snap(runs, name, "saved")["steps"] == [[float(job["save_at"])]] * job["ranks"]
    problems, worst = loss_mismatch(runs, name)
    assert problems == [], f"worst rel {worst:.2g}"
    # The layout took effect: stage, ranks, and the global batch kept by the accumulation.
    src_job = runs["jobs"][src]
    assert res["engine"]["zero_stage"] == job["zero"]
    assert res["engine"]["world_size"] == job["ranks"]
    assert res["engine"]["gradient_accumulation_steps"] == GLOBAL // (2 * job["ranks"])
    assert res["engine"]["train_batch_size"] == GLOBAL
    assert res["plan"]["saved"]["world_size"] == src_job["ranks"]
    assert res["plan"]["saved"]["zero_stage"] == src_job["zero"]
    assert ("universal checkpoint" in res["note"]) == (job["zero"] > 0 or src_job["zero"] > 0)
    print(f"{name}: {src_job['ranks']}r ZeRO {src_job['zero']} -> {job['ranks']}r ZeRO {job['zero']}: "
          f"worst loss rel diff {worst:.2g}, load {res['load_s']:.2f}s")


def test_a_resume_that_resets_adam_fails_both_checks(runs):
    """The mutation: same resume as C1, then Adam's moments and step wiped. The checks must see it."""
    saved = _snap(runs, "A1", "saved")
    problems = state_mismatch(saved, _snap(runs, "Creset", "resumed"))
    assert any("exp_avg diff" in p for p in problems) and any("exp_avg_sq diff" in p for p in problems)
    assert any("Adam step" in p for p in problems)
    loss_problems, worst = loss_mismatch(runs, "Creset")
    assert loss_problems, f"a reset optimizer still followed the run (worst rel {worst:.2g})"


def test_exact_state_numbers(runs):
    """The largest differences seen, printed for the record (all asserted above)."""
    for name in RESUMES:
        src, _ = _source(runs, name)
        a, b = _snap(runs, src, "saved"), _snap(runs, name, "resumed")
        diffs = {k: max(float((a["params"][n][k] - b["params"][n][k]).abs().max()) for n in a["params"])
                 for k in ("fp32", "exp_avg", "exp_avg_sq")}
        print(name, {k: f"{v:.2g}" for k, v in diffs.items()}, "step", b["steps"][0])


# ---- the plan, the conversion and the seeds, without launching ranks -------------------------


def _ds_config(zero: int, micro: int = 2, precision: str = "fp32") -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "train_batch_size": micro, "zero_optimization": {"stage": zero},
            "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": False}}


def test_plan_reads_the_saved_layout_and_keeps_the_global_batch(runs):
    tag_dir = Path(runs["tag"]("A1", 4))
    assert reshard.saved_layout(tag_dir) == reshard.Layout(world_size=2, zero_stage=1, micro_batch_size=2,
                                                           grad_accum_steps=2, train_batch_size=8,
                                                           precision="fp32")
    assert reshard.plan(tag_dir, 2, _ds_config(1)) is None  # same layout: DeepSpeed's own load
    p = reshard.plan(tag_dir, 1, _ds_config(3))
    assert (p.target.world_size, p.target.zero_stage, p.grad_accum_steps) == (1, 3, 4)
    assert reshard.configure(_ds_config(3), p)["checkpoint"] == {"load_universal": True}
    assert reshard.plan(tag_dir, 4, _ds_config(1, micro=1)).grad_accum_steps == 2
    assert "checkpoint" not in reshard.configure(_ds_config(0), reshard.plan(tag_dir, 1, _ds_config(0)))
    assert reshard.saved_layout(Path(runs["tag"]("B3", 6))).world_size == 4


def test_a_global_batch_that_does_not_split_is_refused_with_the_numbers(runs):
    with pytest.raises(UserError) as err:
        reshard.plan(Path(runs["tag"]("A1", 4)), 3, _ds_config(1))
    msg = str(err.value)
    assert "global batch of 8" in msg and "micro batches of 2 on 3 rank(s)" in msg and "1.33333" in msg
    assert reshard.grad_accum_for(8, 2, 4) == 1
    with pytest.raises(UserError, match="train.micro_batch_size"):
        reshard.grad_accum_for(8, 3, 1)


def test_precision_changes_and_zero0_bf16_are_refused(runs):
    tag_dir = Path(runs["tag"]("A1", 4))
    with pytest.raises(UserError, match="precision=fp32"):
        reshard.plan(tag_dir, 1, _ds_config(1, precision="bf16"))


def test_the_conversion_is_reused_and_atomic(runs, tmp_path):
    import shutil
    src = Path(runs["tag"]("A3", 4))
    tag_dir = tmp_path / src.name
    shutil.copytree(src, tag_dir, ignore=shutil.ignore_patterns(reshard.UNIVERSAL_DIR))
    (tag_dir / ".universal-999.tmp").mkdir()  # left by a conversion that crashed
    out = reshard.ensure_universal(tag_dir, [])
    assert out == tag_dir / "universal" and (out / reshard.DONE_FILE).is_file()
    assert not list(tag_dir.glob(".universal-*")) and not (tag_dir / "latest_universal").exists()
    # Both model-states names, the step files and dict-form states every loader can read.
    assert (out / reshard.Z12_MODEL_FILE).is_file() and (out / reshard.Z3_MODEL_FILE).is_file()
    wte = out / "zero" / "transformer.wte.weight"
    assert isinstance(torch.load(wte / "exp_avg.pt", weights_only=False), dict)
    assert float(torch.load(wte / "step.pt", weights_only=False)) == 4.0
    stamp = (out / reshard.DONE_FILE).stat().st_mtime_ns
    assert reshard.ensure_universal(tag_dir, []) == out and (out / reshard.DONE_FILE).stat().st_mtime_ns == stamp
    (out / reshard.DONE_FILE).unlink()  # an incomplete folder is rebuilt, not trusted
    reshard.ensure_universal(tag_dir, [])
    assert (out / reshard.DONE_FILE).is_file()


def test_each_new_rank_is_seeded_from_seed_rank_and_step():
    draws = {}
    for rank, step in ((0, 4), (1, 4), (0, 5), (0, 4)):
        reshard.seed_rngs(1234, rank, step)
        draws.setdefault((rank, step), []).append(torch.rand(4))
    assert torch.equal(*draws[(0, 4)])
    assert not torch.equal(draws[(0, 4)][0], draws[(1, 4)][0])
    assert not torch.equal(draws[(0, 4)][0], draws[(0, 5)][0])


# ---- through the trainer --------------------------------------------------------------------------

def test_the_trainer_resumes_a_two_rank_zero1_run_on_one_rank_under_zero3(corpus, tmp_path):
    from conftest import losses, run_jobs, tiny_overrides
    out = tmp_path / "runs"

    def job(name, steps, zero):
        return {"name": name, "overrides": tiny_overrides(corpus, out, name, f"train.max_steps={steps}",
                                                          "optim.decay_steps=8", "train.save_interval=4",
                                                          f"deepspeed.zero_stage={zero}")}
    first = run_jobs([job("straight", 8, 1), job("moved", 4, 1)], ranks=2, work=tmp_path / "a")
    moved = run_jobs([job("moved", 8, 3)], ranks=1, work=tmp_path / "b")["moved"][0]
    assert "error" not in moved, moved
    assert moved["first_step"] == 5 and moved["last_step"] == 8
    facts = moved["engine"]
    assert facts["zero_stage"] == 3 and facts["world_size"] == 1
    assert facts["gradient_accumulation_steps"] == 2 and facts["train_batch_size"] == 8
    straight = losses(first["straight"][0])
    resumed = losses(first["moved"][0]) + losses(moved)
    assert len(resumed) == 8
    assert all(abs(a - b) <= LOSS_RTOL * abs(b) for a, b in zip(resumed, straight)), (resumed, straight)
    import yaml
    assert yaml.safe_load((out / "moved" / "config.yaml").read_text())["train"]["grad_accum_steps"] == 2
