"""Evaluation on several ranks and during training.

A checkpoint written by a 2-rank ZeRO-3 run scores the same from one process, from 2 ranks in
ZeRO-3 lockstep (the eval engine really shards the weights) and from 2 ranks that split the work;
a run with `eval.tasks` logs task scores at its eval steps and trains exactly as the same run
without. One launch of 2 ranks trains all four runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import launch, losses, run_jobs, tiny_overrides
from dsgpt import cli

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
# The run the evals score learns these by heart, so greedy answers are its own words, not ties.
QA = [("Q: where is the cat? A:", " the grey cat sleeps under the warm stove"),
      ("Q: what does the baker do? A:", " the baker bakes fresh bread before dawn"),
      ("Q: when does the train leave? A:", " the last train leaves at nine tonight"),
      ("Q: who paints the fence? A:", " two brothers paint the long white fence"),
      ("Q: why is the road wet? A:", " it rained all night over the old town")]
MEMO_STEPS, STEPS, TASK_INTERVAL = 200, 24, 8


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    from dsgpt.data.prepare import prepare
    work = tmp_path_factory.mktemp("eval-ranks")
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "dsgpt_mc.yaml").write_text((FIXTURES / "dsgpt_mc.yaml").read_text().replace(
        "tests/fixtures/lm_eval/dsgpt_mc.jsonl", str(FIXTURES / "dsgpt_mc.jsonl")))
    qa = work / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in QA))
    (work / "qa_docs.jsonl").write_text("".join(json.dumps({"text": p + r}) + "\n" for _ in range(50) for p, r in QA))
    memo_data = work / "memo-data"
    prepare([str(work / "qa_docs.jsonl")], memo_data, vocab_size=300, val_fraction=0.1, seed=5, progress=False)
    out = work / "runs"
    jobs = [{"name": "memo", "overrides": tiny_overrides(
        memo_data, out, "memo", "deepspeed.zero_stage=3", f"train.max_steps={MEMO_STEPS}", "train.micro_batch_size=8",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=10", "train.eval_interval=1000")}]
    common = ("model.dropout=0.1", f"train.max_steps={STEPS}", "train.eval_interval=12")
    on = (f"eval.tasks=dsgpt_mc,gen:{qa}", f"eval.include_path={tasks}", f"eval.interval={TASK_INTERVAL}",
          "eval.max_new_tokens=8")
    for stage in (3, 1):
        for name, extra in ((f"off{stage}", ()), (f"on{stage}", on)):
            jobs.append({"name": name, "overrides": tiny_overrides(corpus, out, name, *common,
                                                                   f"deepspeed.zero_stage={stage}", *extra)})
    results = run_jobs(jobs, ranks=2, work=work / "jobs")
    for name, per_rank in results.items():
        assert "error" not in per_rank[0], per_rank[0]
    assert results["memo"][0]["engine"]["zero_stage"] == 3 and results["off1"][0]["engine"]["zero_stage"] == 1
    return {"results": results, "runs": out, "tasks": tasks, "qa": qa, "work": work}


def eval_on(trained, ranks: int, *extra: str) -> tuple[dict, str]:
    run = trained["runs"] / "memo"
    proc = launch("launch/eval.py", ["--run", str(run), "--tasks", f"lm,gen:{trained['qa']},dsgpt_mc",
                                     "--include-path", str(trained["tasks"]), "--max-new-tokens", "24", *extra],
                  ranks=ranks)
    return json.loads((run / "eval" / f"step{MEMO_STEPS:07d}.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def evals(trained):
    return {"one": eval_on(trained, 1), "lockstep": eval_on(trained, 2), "split": eval_on(trained, 2, "--zero-stage", "1")}


def test_how_each_eval_ran(evals):
    one, lockstep, split = (evals[k][0]["run"] for k in ("one", "lockstep", "split"))
    assert one == {"ranks": 1, "mode": "one process"}
    assert lockstep["ranks"] == 2 and lockstep["mode"] == "lockstep" and lockstep["zero_stage"] == 3
    # Each rank holds about half of the weights (small vectors stay whole: the persistence threshold).
    assert 0.4 < lockstep["param_share_per_rank"] < 0.75, lockstep
    assert split == {"ranks": 2, "mode": "split"}
    for _, stdout in evals.values():  # rank 0 prints the table, once
        assert stdout.count("checkpoint step") == 1, stdout


@pytest.mark.parametrize("mode", ["lockstep", "split"])
def test_two_ranks_score_what_one_process_scores(evals, mode):
    one, two = evals["one"][0], evals[mode][0]
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6)
    for key in ("loss", "bpb"):
        assert two["lm"][key] == pytest.approx(one["lm"][key], rel=1e-6), key
    for key in ("accuracy", "tokens", "bpb_documents", "bpb_bytes", "bpb_tokens"):
        assert two["lm"][key] == one["lm"][key], key
    assert one["lm"]["bpb_documents"] > 2  # the documents really were shared between the ranks
    gen = "gen/qa"
    assert [s["output"] for s in two[gen]["samples"]] == [s["output"] for s in one[gen]["samples"]]
    assert two[gen]["examples"] == len(QA) and two[gen]["bleu"] == pytest.approx(one[gen]["bleu"], abs=1e-9)
    assert one[gen]["bleu"] > 90, one[gen]  # answers learnt by heart: a real text to agree on
    for metric in ("acc", "acc_norm"):
        assert two["dsgpt_mc"][metric] == one["dsgpt_mc"][metric], metric


@pytest.mark.parametrize("stage", [3, 1])
def test_task_evals_during_training_leave_the_losses_alone(trained, stage):
    on, off = trained["results"][f"on{stage}"], trained["results"][f"off{stage}"]
    assert losses(on[0]) == losses(off[0])  # bit for bit, dropout on
    assert len(losses(on[0])) == STEPS
    rows = [json.loads(x) for x in (trained["runs"] / f"on{stage}" / "metrics.jsonl").read_text().splitlines()]
    for tag in ("eval/dsgpt_mc/acc", "eval/gen/qa/bleu", "eval/gen/qa/rougeL"):
        steps = [r["step"] for r in rows if tag in r]
        assert steps == list(range(TASK_INTERVAL, STEPS + 1, TASK_INTERVAL)), (tag, steps)
    off_rows = (trained["runs"] / f"off{stage}" / "metrics.jsonl").read_text()
    assert "eval/dsgpt_mc" not in off_rows


def test_task_scores_in_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(trained["runs"] / "on3" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("eval/dsgpt_mc/acc")
    assert [e.step for e in events] == list(range(TASK_INTERVAL, STEPS + 1, TASK_INTERVAL))
    assert all(0.0 <= e.value <= 1.0 for e in events)


def test_task_mistakes_stop_training_before_the_first_step(trained, corpus):
    work = trained["work"] / "mistakes"
    jobs = [{"name": "typo", "overrides": tiny_overrides(corpus, work / "runs", "typo", "eval.tasks=dsgpt_mcq",
                                                         f"eval.include_path={trained['tasks']}")},
            {"name": "nofile", "overrides": tiny_overrides(corpus, work / "runs", "nofile",
                                                           f"eval.tasks=gen:{work / 'missing.jsonl'}")}]
    results = run_jobs(jobs, ranks=1, work=work / "jobs")
    typo, nofile = results["typo"][0]["error"], results["nofile"][0]["error"]
    assert "eval.tasks='dsgpt_mcq'" in typo and "closest: dsgpt_mc" in typo, typo
    assert "missing.jsonl" in nofile and "does not exist" in nofile, nofile
    assert not (work / "runs" / "typo" / "checkpoints").exists()


def test_zero_stage_needs_ranks(trained, capsys):
    code = cli.main(["eval", "--run", str(trained["runs"] / "off1"), "--zero-stage", "3"])
    assert code == 2
    assert "--zero-stage 3" in capsys.readouterr().err


def test_eval_refuses_a_tokenizer_the_model_was_not_trained_with(trained, tmp_path, capsys):
    from dsgpt.data.prepare import prepare
    src = tmp_path / "other.jsonl"
    src.write_text("".join(json.dumps({"text": f"another corpus, line {i} of many"}) + "\n" for i in range(200)))
    other = tmp_path / "other-data"
    prepare([str(src)], other, vocab_size=300, val_fraction=0.1, seed=3, progress=False)
    run = tmp_path / "copied"
    shutil.copytree(trained["runs"] / "off1", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for command in (["eval", "--run", str(run)], ["generate", "--run", str(run), "--prompt", "x"],
                    ["export", "--run", str(run), "--hf", str(tmp_path / "hf")]):
        code = cli.main(command)
        err = capsys.readouterr().err
        assert code == 2, (command, err)
        assert "is not the one the run was trained with" in err and "vocab sha256" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "hf").exists()
