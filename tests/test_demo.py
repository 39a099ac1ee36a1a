"""The demo's steps, shortened: the built-in corpus, 2 CPU ranks under the deepspeed launcher,
evaluation, sampling; and the `dsgpt` console command."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PY, REPO, child_env, launch


def test_demo_steps(tmp_path):
    out = tmp_path / "runs"
    train = launch("launch/train.py", ["--config", "configs/tiny.yaml", f"run.out_dir={out}", "run.name=demo",
                                       "train.max_steps=40", "train.eval_interval=20"], ranks=2)
    assert "tensorboard --logdir" in train.stdout + train.stderr
    records = [json.loads(x) for x in (out / "demo" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(loss) == 40 and loss[-1] < loss[0] - 1.0  # the loss visibly falls
    ev = launch("launch/eval.py", ["--run", str(out / "demo")])
    assert "perplexity" in ev.stdout
    result = json.loads((out / "demo" / "eval" / "step0000040.json").read_text())
    # One process sees the same validation set the 2 training ranks shared.
    assert result["val/loss"] == pytest.approx([r for r in records if "val/loss" in r][-1]["val/loss"], rel=1e-5)
    gen = launch("launch/generate.py", ["--run", str(out / "demo"), "--prompt", "def ", "--max-new-tokens", "30"])
    assert gen.stdout.startswith("def ") and len(gen.stdout) > 10


def test_dsgpt_console_command(tmp_path):
    exe = shutil.which("dsgpt", path=str(Path(PY).parent))
    assert exe, "the dsgpt console command is not installed in this environment"
    src = tmp_path / "doc.txt"
    src.write_text("hello world, hello tokens. " * 400)
    (tmp_path / "doc2.txt").write_text("another document about tokens and worlds. " * 300)
    proc = subprocess.run([exe, "prepare", "--input", str(src), str(tmp_path / "doc2.txt"), "--out",
                           str(tmp_path / "data"), "--vocab-size", "300", "--quiet"],
                          capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["requested_vocab_size"] == 300 and 257 <= meta["vocab_size"] <= 300  # small text: fewer merges
    assert meta["n_train_tokens"] > 0
    again = subprocess.run([exe, "prepare", "--input", str(src), "--out", str(tmp_path / "data"),
                            "--vocab-size", "300"], capture_output=True, text=True, env=child_env(), timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr and "error:" in again.stderr
