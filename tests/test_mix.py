"""data.mix: several prepared dirs with weights. Each source's share of the training rows follows
its weight; a step's batch is a pure function of (seed, step), so exact resume and 1 rank vs 2
ranks hold with a mixture (real runs); validation is logged per source; bad mixtures are refused."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import grad_norms, launch, losses, run_jobs, tiny_overrides
from dsgpt.config import load_config
from dsgpt.data.mixture import MixedData
from dsgpt.data.prepare import prepare
from dsgpt.errors import UserError
from dsgpt.train.run_setup import open_data


@pytest.fixture(scope="module")
def second(corpus, tmp_path_factory) -> Path:
    """Other text (more stdlib modules) prepared with the corpus's tokenizer."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path_factory.mktemp("mix-src")
    for name in ("functools.py", "enum.py", "dataclasses.py", "pathlib/__init__.py", "pprint.py"):
        f = stdlib / name
        if f.exists():
            (src / (f.parent.name + "_" + f.stem + ".txt")).write_text(f.read_text())
    out = tmp_path_factory.mktemp("mix") / "second"
    prepare([str(src)], out, tokenizer=str(corpus / "tokenizer.json"), val_fraction=0.2, seed=1, progress=False)
    return out


def mix_overrides(corpus, second, w1=0.7, w2=0.3) -> list[str]:
    return ["data.path=builtin", f"data.mix=[{{path: {corpus}, weight: {w1}, name: first}}, {{path: {second}, weight: {w2}, name: second}}]"]


def test_shares_follow_the_weights(corpus, second):
    data = MixedData([("first", corpus, 7.0), ("second", second, 3.0)], block_size=32, seed=5)
    assert [s.weight for s in data.sources] == pytest.approx([0.7, 0.3])
    shares = data.source_shares(0, 1999, 8)  # 16,000 rows: 2 sigma of a share is 0.0072
    assert shares == pytest.approx([0.7, 0.3], abs=0.015)


def test_a_step_is_a_pure_function_of_seed_and_step_whatever_the_split(corpus, second):
    data = MixedData([("first", corpus, 1.0), ("second", second, 1.0)], block_size=32, seed=5)
    again = MixedData([("first", corpus, 1.0), ("second", second, 1.0)], block_size=32, seed=5)
    whole = data.train_micro_batches(17, 0, 1, 8, 1)[0][0]
    assert np.array_equal(whole, again.train_micro_batches(17, 0, 1, 8, 1)[0][0])
    halves = [again.train_micro_batches(17, r, 2, 4, 1)[0][0] for r in (0, 1)]
    assert np.array_equal(whole, np.concatenate(halves))
    rows = data.global_rows(17, 8)
    assert set(rows[:, 0]) <= {0, 1}
    expected = np.stack([data.sources[k].data.train.windows(np.array([start]), 33)[0, :32] for k, start in rows])
    assert np.array_equal(whole, expected)  # each row is its source's window
    assert not np.array_equal(whole, data.train_micro_batches(18, 0, 1, 8, 1)[0][0])


def test_mixture_runs_resume_exactly_and_match_across_ranks(corpus, second, tmp_path):
    out = tmp_path / "runs"

    def job(name, *extra):
        return {"name": name, "overrides": [*tiny_overrides(corpus, out, name, "optim.decay_steps=10",
                                                            "train.save_interval=4", "train.eval_interval=4", *extra),
                                            *mix_overrides(corpus, second)]}
    first = run_jobs([job("straight", "train.max_steps=8", "train.micro_batch_size=8")], ranks=1, work=tmp_path / "a")
    split = run_jobs([job("split", "train.max_steps=4", "train.micro_batch_size=8")], ranks=1, work=tmp_path / "b")
    resumed = run_jobs([job("split", "train.max_steps=8", "train.micro_batch_size=8")], ranks=1, work=tmp_path / "c")
    dp2 = run_jobs([job("dp2", "train.max_steps=8", "train.micro_batch_size=4")], ranks=2, work=tmp_path / "d")
    straight = first["straight"][0]
    assert losses(split["split"][0]) + losses(resumed["split"][0]) == losses(straight)
    for rank_summary in dp2["dp2"]:
        a, b = losses(rank_summary), losses(straight)
        assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)) and len(a) == 8
        g, h = grad_norms(rank_summary), grad_norms(straight)
        assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(g, h)) and len(g) == 8
    rows = [json.loads(x) for x in (out / "straight" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [4, 8]
    for r in val:  # the run's val loss is the sources' averaged with the weights
        assert r["val/loss"] == pytest.approx(0.7 * r["val/first/loss"] + 0.3 * r["val/second/loss"], rel=1e-9)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "straight" / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert {"data/first/report/text_summary", "data/second/report/text_summary"} <= set(events.Tags()["tensors"])


def test_changed_weights_refuse_to_resume(corpus, second, tmp_path):
    base = tiny_overrides(corpus, tmp_path, "w", "train.max_steps=2", "train.save_interval=2")
    launch("launch/train.py", [*base, *mix_overrides(corpus, second)], timeout=300)
    proc = launch("launch/train.py", [*base, "train.max_steps=4", *mix_overrides(corpus, second, 0.5, 0.5)],
                  check=False, timeout=300)
    assert proc.returncode == 2 and "belongs to a different run" in proc.stderr, proc.stderr[-2000:]


def test_bad_mixtures_are_clear_errors(corpus, second, tmp_path):
    other = tmp_path / "other"
    (tmp_path / "t.txt").write_text("a different text with a different tokenizer " * 300)
    (tmp_path / "u.txt").write_text("and a second document of it, to have a val split " * 300)
    prepare([str(tmp_path / "t.txt"), str(tmp_path / "u.txt")], other, vocab_size=300, val_fraction=0.5,
            progress=False)
    cfg = load_config(None, ["model.block_size=32", f"data.mix=[{{path: {corpus}, weight: 1}}, {{path: {other}, weight: 1}}]"])
    with pytest.raises(UserError, match="another tokenizer"):
        open_data(cfg)
    with pytest.raises(UserError, match="data.mix.0.weight"):
        load_config(None, [f"data.mix=[{{path: {corpus}, weight: 0}}]"])
    cfg = load_config(None, ["model.block_size=32", *mix_overrides(corpus, second), f"data.path={corpus}"])
    with pytest.raises(UserError, match="data.path and data.pack must be left unset"):
        open_data(cfg)
    cfg = load_config(None, ["model.block_size=32", f"data.mix=[{{path: {corpus}, weight: 1}}, {{path: {corpus}, weight: 2}}]"])
    with pytest.raises(UserError, match="distinct name"):
        open_data(cfg)
