"""The lm-eval model class for dsgpt runs: its log-likelihoods equal lm-eval's own HF backend on the
run's export, a local multiple-choice task runs end to end, and task mistakes are clear UserErrors."""

from __future__ import annotations

import random
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_jobs, tiny_overrides
from dsgpt.errors import UserError
from dsgpt.eval.lm_eval_adapter import DsgptLM, run_tasks  # sets HF offline mode before lm_eval loads
from dsgpt.hf import export

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
SOURCE = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()  # part of the corpus


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny run (30 steps, one rank), its HF export, and a task folder with the fixture task."""
    work = tmp_path_factory.mktemp("lm_eval")
    out = work / "runs"
    result = run_jobs([{"name": "lm", "overrides": tiny_overrides(corpus, out, "lm", "train.max_steps=30")}],
                      ranks=1, work=work / "jobs")
    assert "error" not in result["lm"][0], result["lm"][0]
    hf_dir = export(out / "lm", work / "hf").dir
    tasks = work / "tasks"
    tasks.mkdir()
    yaml = (FIXTURES / "dsgpt_mc.yaml").read_text()
    (tasks / "dsgpt_mc.yaml").write_text(yaml.replace("tests/fixtures/lm_eval/dsgpt_mc.jsonl",
                                                      str(FIXTURES / "dsgpt_mc.jsonl")))
    return SimpleNamespace(run=out / "lm", hf_dir=hf_dir, tasks=tasks)


@pytest.fixture(scope="module")
def both(trained):
    """The adapter and lm-eval's HFLM on the export, both fp32 on CPU, with different batch sizes."""
    from lm_eval.models.huggingface import HFLM
    ours = DsgptLM.create_from_arg_string(f"run={trained.run},checkpoint=latest,batch_size=3")
    theirs = HFLM(pretrained=str(trained.hf_dir), device="cpu", batch_size=4, dtype="float32")
    return ours, theirs


def requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_matches_hflm(both):
    ours, theirs = both
    assert ours.batch_size == 3 and ours.max_length == 32
    lines = [line for line in SOURCE.splitlines() if len(line.strip()) > 20][:12]
    pairs = [(line[:len(line) // 2], line[len(line) // 2:]) for line in lines]
    pairs += [
        ("", "import re"),  # empty context: the EOS is the context
        ("def wrap(text, ", "width=70, **kwargs):"),  # trailing space moves to the continuation
        (SOURCE[:400], SOURCE[400:440]),  # longer than block_size: the context is cut from the left
    ]
    # Context and continuation longer than block_size together, the continuation within it.
    ids = ours.tok_encode(SOURCE[1000:1400])
    pairs.append((ours.tok_decode(ids[:12]), ours.tok_decode(ids[12:40])))
    ctx, cont = ours._encode_pair(*pairs[-1])
    assert len(ctx) + len(cont) > ours.max_length + 1 >= len(cont)
    # Continuations the model itself would pick, so that is_greedy is True somewhere.
    greedy = ours.generate_until(requests("generate_until", [(c, {"until": ["\n"], "max_gen_toks": 2})
                                                             for c, _ in pairs[:8]]))
    pairs += [(c, g) for (c, _), g in zip(pairs[:8], greedy) if ours._encode_pair(c, g)[1]]
    reqs = requests("loglikelihood", pairs)
    got, expected = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
    diffs = [abs(a[0] - b[0]) for a, b in zip(got, expected)]
    print(f"max |dsgpt - HFLM| loglikelihood: {max(diffs):.2e} over {len(pairs)} requests")
    assert max(diffs) <= 1e-4
    assert [g for _, g in got] == [g for _, g in expected]
    assert any(g for _, g in got)


def test_loglikelihood_rolling_matches_hflm(both):
    ours, theirs = both
    texts = [SOURCE[:1500], SOURCE[2000:2100], "short"]
    assert len(ours.tok_encode(texts[0])) > 4 * ours.max_length  # several windows
    reqs = requests("loglikelihood_rolling", [(t,) for t in texts])
    got, expected = ours.loglikelihood_rolling(reqs), theirs.loglikelihood_rolling(reqs)
    diffs = [abs(a - b) for a, b in zip(got, expected)]
    print(f"max |dsgpt - HFLM| loglikelihood_rolling: {max(diffs):.2e}")
    assert max(diffs) <= 1e-4


def test_generate_until_stops_at_the_stop_string(both):
    ours, _ = both
    args = [("import", {"until": ["\n"], "max_gen_toks": 20, "do_sample": False}),
            ("def f(x):", {"until": ["\n"], "max_gen_toks": 5})]
    out = ours.generate_until(requests("generate_until", args))
    assert len(out) == 2 and all("\n" not in text for text in out)
    again = ours.generate_until(requests("generate_until", args))
    assert out == again  # greedy


def test_local_task_runs_end_to_end_and_keeps_the_rng(trained):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    results = run_tasks(trained.run, ["dsgpt_mc"], include_path=trained.tasks, batch_size=4)
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    metrics = results["dsgpt_mc"]
    assert {"acc", "acc_norm", "acc_stderr"} <= set(metrics), metrics
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert before[0] == after[0]
    assert np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])


def test_unknown_task_names_the_closest(trained):
    with pytest.raises(UserError) as err:
        run_tasks(trained.run, ["hellaswg"], include_path=trained.tasks)
    assert "'hellaswg'" in str(err.value) and "hellaswag" in str(err.value)
    with pytest.raises(UserError, match="dsgpt_mc"):
        run_tasks(trained.run, ["dsgpt_mcq"], include_path=trained.tasks)


def test_a_task_that_needs_a_download_fails_fast(trained):
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        run_tasks(trained.run, ["hellaswag"], include_path=trained.tasks)
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert "--include-path" in message and "dataset_path: json" in message and "data_files" in message
    assert "hellaswag" in message


def test_registered_in_lm_eval_as_dsgpt():
    from lm_eval.api.registry import get_model
    assert get_model("dsgpt") is DsgptLM


def test_dsgpt_eval_runs_a_local_task_and_logs_it(trained, capsys):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dsgpt.cli import main
    run_dir, tasks = trained.run, trained.tasks
    assert main(["eval", "--run", str(run_dir), "--tasks", "dsgpt_mc", "--include-path", str(tasks)]) == 0
    result = json.loads(next((Path(run_dir) / "eval").glob("*.json")).read_text())
    assert 0.0 <= result["dsgpt_mc"]["acc"] <= 1.0 and "acc_norm" in result["dsgpt_mc"]
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/dsgpt_mc/acc")] == [result["step"]]
    assert main(["eval", "--run", str(run_dir), "--tasks", "hellaswg"]) == 2
    assert "closest: hellaswag" in capsys.readouterr().err
