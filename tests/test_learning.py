"""The trainer learns: on tokens drawn from a random Markov chain with a known entropy rate H,
the trained model's validation loss ends within 0.1 nats of H (the best any model can do)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import launch, tiny_overrides

VOCAB = 24


def markov_chain(seed: int = 0):
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(VOCAB, 0.15), size=VOCAB)  # sparse rows: low conditional entropy
    evals, evecs = np.linalg.eig(P.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    pi = pi / pi.sum()
    row_entropy = -(P * np.log(np.where(P > 0, P, 1))).sum(1)
    return P, pi, float(pi @ row_entropy), float(-(pi * np.log(pi)).sum())


def sample_chain(P, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cdf = P.cumsum(1)
    u = rng.random(n)
    out = np.empty(n, dtype=np.uint16)
    state = 0
    for i in range(n):
        state = min(int(np.searchsorted(cdf[state], u[i])), VOCAB - 1)
        out[i] = state
    return out


def write_token_dir(path: Path, train: np.ndarray, val: np.ndarray) -> None:
    """A prepared data dir in dsgpt's format, written directly (the tokens are already ids)."""
    path.mkdir(parents=True)
    shards = {}
    for split, tokens in (("train", train), ("val", val)):
        name = f"{split}_00000.bin"
        (path / name).write_bytes(tokens.tobytes())
        shards[split] = [{"file": name, "n_tokens": int(len(tokens)),
                          "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}]
    meta = {"format_version": 1, "vocab_size": VOCAB, "dtype": "uint16", "eos_id": VOCAB - 1,
            "n_train_tokens": len(train), "n_val_tokens": len(val),
            "train_shards": shards["train"], "val_shards": shards["val"],
            "data_sha256": hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()}
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def markov_data(tmp_path_factory):
    P, pi, entropy_rate, unigram_entropy = markov_chain()
    tokens = sample_chain(P, 220_000, seed=1)
    path = tmp_path_factory.mktemp("markov") / "data"
    write_token_dir(path, tokens[:200_000], tokens[200_000:])
    return path, entropy_rate, unigram_entropy


def test_val_loss_reaches_the_entropy_rate(markov_data, tmp_path):
    path, H, H_unigram = markov_data
    assert H_unigram - H >= 1.0, (H, H_unigram)  # a unigram model cannot pass this test
    overrides = tiny_overrides(path, tmp_path / "runs", "markov", "train.max_steps=300",
                               "train.micro_batch_size=16", "train.eval_interval=100",
                               "train.eval_batches=16", "optim.lr=3e-3", "optim.min_lr=3e-4",
                               "optim.warmup_steps=20", "optim.weight_decay=0.0")
    launch("launch/train.py", ["--config", "configs/tiny.yaml", *overrides], timeout=600)
    evals = [json.loads(line) for line in (tmp_path / "runs" / "markov" / "metrics.jsonl").read_text().splitlines()]
    val = [e["val/loss"] for e in evals if "val/loss" in e]
    assert len(val) == 3
    assert val[0] > H + 0.1 or val[-1] < val[0]  # it improved over training
    assert abs(val[-1] - H) <= 0.1, (val, H)
