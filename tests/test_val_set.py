"""The validation set is a fixed set of windows, whatever the number of ranks.

Unit tests of the window set and of each rank's share; then one trained checkpoint scored by
launch/eval.py (1 rank), by the trainer on 2 ranks and by a worker on 2 and 3 ranks, which must
all agree.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import launch, run_jobs, tiny_overrides
from dsgpt.data.dataset import TokenData

BLOCK = 32


@pytest.fixture(scope="module")
def data(corpus):
    return TokenData(corpus, block_size=BLOCK, seed=0)


def shares(data, n_windows, batch_size, world):
    return [list(data.val_batches(n_windows, batch_size, r, world)) for r in range(world)]


def real_rows(batches):
    """The (x, y) rows of real windows in rank order; padding rows must be fully masked."""
    rows = []
    for x, y in batches:
        for xi, yi in zip(x, y):
            masked = yi == -100
            assert masked.all() or not masked.any(), "a window is partly masked"
            if not masked.any():
                rows.append((xi, yi))
    return rows


# ---- the window set --------------------------------------------------------------------------

@pytest.mark.parametrize("n_windows", [1, 7, 15, 10**6])
def test_val_starts_depend_only_on_the_count(data, n_windows):
    starts = data.val_starts(n_windows)
    available = (data.n_val_tokens - 1) // BLOCK
    assert len(starts) == min(n_windows, available)
    assert starts[0] == 0 and np.all(np.diff(starts) >= BLOCK)       # predicted tokens never overlap
    assert len(set(np.diff(starts).tolist())) <= 1                  # evenly spaced
    assert starts[-1] + BLOCK + 1 <= data.n_val_tokens


@pytest.mark.parametrize("n_windows,batch_size", [(15, 5), (7, 2), (1, 4), (10**6, 400)])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_split_the_same_windows(data, n_windows, batch_size, world):
    one = real_rows(list(data.val_batches(n_windows, batch_size, 0, 1)))
    per_rank = shares(data, n_windows, batch_size, world)
    # Together the ranks score exactly the world-1 windows, in the same order, each once.
    union = [row for batches in per_rank for row in real_rows(batches)]
    assert len(union) == len(one) == len(data.val_starts(n_windows))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(union, one))
    # Equal shares: same batch count and window count on every rank (ZeRO-3 forwards are collective).
    share = math.ceil(len(one) / world)
    assert {len(b) for b in per_rank} == {math.ceil(share / batch_size)}
    assert {sum(len(x) for x, _ in b) for b in per_rank} == {share}
    assert all(len(x) <= batch_size for b in per_rank for x, _ in b)


def test_padding_is_masked_and_last(data):
    # 7 windows on 3 ranks: shares of 3, the last rank holds 1 real window and 2 padding ones.
    assert data.val_share(7, 2, 3).tolist()[1:] == [-1, -1]
    (x, y), = data.val_batches(7, 4, 2, 3)
    assert x.shape == (3, BLOCK) and (y[0] != -100).all() and (y[1:] == -100).all()
    assert int(x.min()) >= 0 and int(x.max()) < data.vocab_size  # padding still feeds real token ids


def test_bad_rank_is_refused(data):
    with pytest.raises(ValueError):
        data.val_share(4, 2, 2)


# ---- one checkpoint, any number of ranks -------------------------------------------------------

def capped_setup(corpus) -> tuple[int, int]:
    """(block size, eval batch size) such that the val split caps train.eval_batches=3 batches at
    a window count that neither 2 nor 3 ranks divide: every world size here gets padding."""
    n_val = TokenData(corpus, block_size=BLOCK, seed=0).n_val_tokens
    for block in range(BLOCK, 16, -1):
        available = (n_val - 1) // block
        if available % 2 and available % 3:
            return block, available // 3 + 1  # 3 batches would be more than there is
    pytest.skip("no block size gives an odd window count that 3 does not divide")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny run trained on 2 ranks, evaluated by the trainer at its last step: (run dir, val loss)."""
    block, batch_size = capped_setup(corpus)
    work = tmp_path_factory.mktemp("val-set")
    overrides = tiny_overrides(corpus, work / "runs", "val", f"model.block_size={block}",
                               "train.max_steps=3", "train.eval_interval=3", "train.save_interval=3",
                               "train.eval_batches=3", f"eval.batch_size={batch_size}", "train.save_best=false")
    summary = run_jobs([{"name": "val", "overrides": overrides}], ranks=2, work=work)["val"]
    assert "error" not in summary[0], summary[0]
    assert summary[0]["val_loss"] == summary[1]["val_loss"]
    return work / "runs" / "val", summary[0]["val_loss"], work


def worker_loss(run_dir, work, ranks: int) -> dict:
    out = work / f"worker{ranks}.json"
    launch("tests/workers/val_loss.py", [str(run_dir), str(out)], ranks=ranks, timeout=300)
    return json.loads(out.read_text())


def test_same_val_loss_on_any_number_of_ranks_and_in_eval(trained):
    # launch/eval.py is the 1-rank reference; the trainer ran on 2 ranks, the worker runs 2 and 3.
    run_dir, trainer_loss, work = trained
    ev = launch("launch/eval.py", ["--run", str(run_dir)], timeout=300)
    reference = json.loads((run_dir / "eval" / "step0000003.json").read_text())
    workers = {n: worker_loss(run_dir, work, n) for n in (2, 3)}

    for n, res in workers.items():
        per_rank = res["per_rank"]
        assert res["world"] == n and len({r["batches"] for r in per_rank}) == 1, per_rank
        assert len({r["windows"] for r in per_rank}) == 1, per_rank
        assert res["tokens"] == reference["tokens"]
        n_windows = sum(r["real_windows"] for r in per_rank)
        # The fixture's window count is not a multiple of 2 or 3: the last rank holds padding.
        assert n_windows % n and per_rank[-1]["real_windows"] < per_rank[-1]["windows"], per_rank

    losses = {"launch/eval.py (1 rank)": reference["val/loss"], "trainer (2 ranks)": trainer_loss,
              **{f"worker ({n} ranks)": w["loss"] for n, w in workers.items()}}
    print("val losses:", json.dumps(losses, indent=1), ev.stdout.strip())
    for name, loss in losses.items():
        assert loss == pytest.approx(reference["val/loss"], rel=1e-6, abs=0), (name, losses)
