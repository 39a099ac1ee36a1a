"""`dsgpt lr-find`: the range test on the tiny model runs until the loss diverges, saves its table
and plot, and its suggestion is the stated rule recomputed from the saved table."""

from __future__ import annotations

import re

import pytest

from conftest import launch, tiny_overrides
from dsgpt import cli
from dsgpt.lr_find import read_table, smooth, suggest


def test_lr_find_suggests_by_its_stated_rule(corpus, tmp_path):
    out = tmp_path / "lrf"
    proc = launch("dsgpt/cli.py", ["lr-find", "--config", "configs/tiny.yaml", "--start", "1e-5", "--end", "100",
                                   "--steps", "80", "--out", str(out),
                                   *tiny_overrides(corpus, tmp_path / "runs", "lrf")])
    lrs, losses, smoothed = read_table(out / "lr_find.csv")
    assert lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert smoothed == pytest.approx(smooth(losses))
    assert len(lrs) < 80 and "stopped early" in proc.stdout  # an LR of 100 blows the loss up
    printed = float(re.search(r"suggested optim.lr=([0-9.e+-]+)", proc.stdout).group(1))
    rule = suggest(lrs, smoothed)
    assert printed == pytest.approx(rule, rel=1e-2)  # printed with 3 significant digits
    assert 1e-4 < rule < 1.0, rule  # where the loss falls, neither the start nor the blow-up
    assert min(smoothed) < losses[0] - 0.3  # the model did learn on the way
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [(["--start", "1", "--end", "0.1"], "0 < --start < --end"),
                                         (["--steps", "3"], "at least 10")])
def test_lr_find_bad_range_is_a_clear_error(args, words, capsys):
    assert cli.main(["lr-find", "--config", "configs/tiny.yaml", *args]) == 2
    assert words in capsys.readouterr().err
