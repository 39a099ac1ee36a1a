"""User mistakes through the real entry points: each one ends with exit code 2 and one `error: ...`
message on stderr that names what was wrong and says what to do, with no Python traceback, and
leaves nothing on disk changed or half-written.

Every case runs the entry point as a subprocess, as a user would. The runs that must refuse a run
dir holding checkpoints work on a copy of one real trained run (the module fixture `trained`), so a
bug that does write into it cannot spoil the other tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import REPO, launch, tiny_overrides

TRAIN = "launch/train.py"
CONFIG = ["--config", "configs/tiny.yaml"]


# ---- helpers ---------------------------------------------------------------------------------

def train(*overrides: str, timeout: float = 300):
    return launch(TRAIN, [*CONFIG, *overrides], check=False, timeout=timeout)


def user_error(proc, *words: str) -> str:
    """Assert the contract for a user mistake; return the message (the text after `error:`)."""
    output = proc.stdout + proc.stderr
    context = f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, f"exit code {proc.returncode}, expected 2{context}"
    assert "Traceback" not in output, f"a traceback reached the user{context}"
    assert "error: " in proc.stderr, f"no 'error: ...' line on stderr{context}"
    message = proc.stderr[proc.stderr.index("error: ") + len("error: "):]
    for word in words:
        assert word in message, f"{word!r} is not in the message:\n{message}"
    return message


def snapshot(root: Path) -> dict:
    """Every file and folder under root: relative path -> (kind, size, mtime_ns, sha256)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_dir():
            out[str(p.relative_to(root))] = ("dir",)
        else:
            out[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_unchanged(before: dict, after: dict) -> None:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"run dir changed: added {added}, removed {removed}, changed {changed}"


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One real tiny run trained to completion (4 steps, checkpoints at 2 and 4): (proc, run dir)."""
    out = tmp_path_factory.mktemp("bad-inputs") / "runs"
    proc = launch(TRAIN, [*CONFIG, *tiny_overrides(corpus, out, "good", "train.max_steps=4",
                                                   "train.save_interval=2")],
                  check=False, timeout=600)
    return proc, out / "good"


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run dir: (out_dir, name, run dir)."""
    proc, run_dir = trained
    assert proc.returncode == 0, f"the fixture run failed:\n{proc.stderr[-4000:]}"
    out = tmp_path / "runs"
    shutil.copytree(run_dir, out / "good", copy_function=shutil.copy2)
    return out, "good", out / "good"


# ---- the trained fixture run itself ------------------------------------------------------------

def test_fixture_run_trains_and_serves_eval_and_generate(trained):
    proc, run_dir = trained
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step0000004"
    assert (ckpt / "step0000002").is_dir() and (ckpt / "step0000004").is_dir()
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name

    ev = launch("launch/eval.py", ["--run", str(run_dir)], check=False, timeout=300)
    assert ev.returncode == 0, ev.stderr[-4000:]
    m = re.search(r"perplexity ([0-9.]+)", ev.stdout)
    assert m and 1.0 < float(m.group(1)) < 1000, ev.stdout
    assert json.loads((run_dir / "eval" / "step0000004.json").read_text())["checkpoint"] == "step0000004"

    gen = launch("launch/generate.py", ["--run", str(run_dir), "--prompt", "def ", "--max-new-tokens", "20"],
                 check=False, timeout=300)
    assert gen.returncode == 0, gen.stderr[-4000:]
    assert gen.stdout.startswith("def ") and len(gen.stdout.strip()) > len("def"), gen.stdout


# ---- config mistakes ---------------------------------------------------------------------------

def test_unknown_key_is_named_with_a_suggestion(corpus, tmp_path):
    proc = train(*tiny_overrides(corpus, tmp_path, "typo"), "train.max_step=5")
    msg = user_error(proc, "train.max_step", "train.max_steps")
    assert re.search(r"did you mean '?train\.max_steps'?", msg), msg
    assert not (tmp_path / "typo").exists()


def test_wrong_type_is_named(corpus, tmp_path):
    proc = train(*tiny_overrides(corpus, tmp_path, "type"), "train.max_steps=abc")
    msg = user_error(proc, "train.max_steps", "abc")
    assert "integer" in msg.lower(), msg
    assert not (tmp_path / "type").exists()


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "missing.yaml"
    proc = launch(TRAIN, ["--config", str(missing)], check=False, timeout=120)
    msg = user_error(proc, str(missing), "--config")
    assert "does not exist" in msg, msg


def test_batch_sizes_that_do_not_multiply_out(corpus, tmp_path):
    template = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    template["train_batch_size"] = 7  # micro 4 x GAS 1 x 1 rank = 4
    tpl = tmp_path / "my_ds.json"
    tpl.write_text(json.dumps(template))
    proc = train(*tiny_overrides(corpus, tmp_path, "batch", f"deepspeed.config={tpl}"))
    msg = user_error(proc, "train_batch_size", str(tpl), "train.micro_batch_size", "auto")
    assert re.search(r"train_batch_size\D*\b7\b.*\b4\b", msg), msg  # the template's 7, the computed 4
    assert not (tmp_path / "batch").exists()


# ---- data mistakes -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_data_dir_that_is_not_prepared(corpus, tmp_path, kind):
    if kind == "missing":
        data = Path("/nonexistent/dir")
    else:
        data = tmp_path / "empty_data"
        data.mkdir()
    proc = train(*tiny_overrides(corpus, tmp_path, "nodata"), f"data.path={data}")
    msg = user_error(proc, str(data), "dsgpt prepare")
    assert ("does not exist" if kind == "missing" else "meta.json") in msg, msg
    assert not (tmp_path / "nodata").exists()
    if kind == "empty":
        assert list(data.iterdir()) == []


def test_corpus_vocab_larger_than_the_model(corpus, tmp_path):
    proc = train(*tiny_overrides(corpus, tmp_path, "vocab", "model.vocab_size=100"))
    msg = user_error(proc, "model.vocab_size", "100", "512")
    assert "at least 512" in msg, msg
    assert not (tmp_path / "vocab").exists()


# ---- device mistakes ---------------------------------------------------------------------------

def test_fp16_on_cpu_is_refused_before_any_work(corpus, tmp_path):
    t0 = time.monotonic()
    proc = train(*tiny_overrides(corpus, tmp_path / "runs", "fp16", "precision=fp16"))
    elapsed = time.monotonic() - t0
    msg = user_error(proc, "fp16", "bf16", "fp32")
    assert "precision=" in msg, msg
    assert elapsed < 20, f"took {elapsed:.1f} s: fp16 should be refused before any work starts"
    assert not (tmp_path / "runs").exists()


# ---- checkpoint and run-dir mistakes -------------------------------------------------------------

def test_resume_from_a_dir_without_checkpoint(corpus, tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    proc = train(*tiny_overrides(corpus, tmp_path / "runs", "resume", f"train.resume={empty}"))
    msg = user_error(proc, "train.resume", str(empty))
    assert "no checkpoint" in msg, msg
    assert not (tmp_path / "runs").exists()
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("garbage", [b"not-a-tag\n", b"\xff\xfe\x00\x81garbage", b""],
                         ids=["text", "binary", "empty"])
def test_corrupt_latest_pointer(corpus, run_copy, garbage):
    out, name, run_dir = run_copy
    latest = run_dir / "checkpoints" / "latest"
    latest.write_bytes(garbage)
    before = snapshot(run_dir)
    proc = train(*tiny_overrides(corpus, out, name, "train.resume=auto"))
    msg = user_error(proc, str(latest), "step0000002", "step0000004", "train.resume")
    assert "corrupt" in msg, msg
    assert_unchanged(before, snapshot(run_dir))


def test_corrupt_state_file_with_the_manifest_gone(corpus, run_copy):
    # Without a manifest the damage cannot be seen before the state file is read: refuse it.
    out, name, run_dir = run_copy
    tag_dir = run_dir / "checkpoints" / "step0000004"
    (tag_dir / "manifest.json").unlink()
    (tag_dir / "dsgpt_state.json").write_bytes(b"\xff{ half-written")
    before = snapshot(run_dir)
    proc = train(*tiny_overrides(corpus, out, name, "train.resume=auto"))
    msg = user_error(proc, str(tag_dir), "train.resume=", "step0000002")  # names the other checkpoint
    assert "corrupt" in msg, msg
    assert_unchanged(before, snapshot(run_dir))


def test_checkpoints_of_a_different_model_shape(corpus, run_copy):
    out, name, run_dir = run_copy
    before = snapshot(run_dir)
    proc = train(*tiny_overrides(corpus, out, name, "model.n_embd=32", "model.n_head=2", "train.resume=auto"))
    msg = user_error(proc, "different run", "'n_embd': 64", "'n_embd': 32", "run.name")
    assert str(run_dir / "checkpoints") in msg, msg
    assert_unchanged(before, snapshot(run_dir))


def test_resume_never_on_a_run_with_checkpoints(corpus, run_copy):
    out, name, run_dir = run_copy
    before = snapshot(run_dir)
    proc = train(*tiny_overrides(corpus, out, name, "train.resume=never"))
    msg = user_error(proc, str(run_dir), "train.resume=auto", "run.name")
    assert "already holds checkpoints" in msg, msg
    assert_unchanged(before, snapshot(run_dir))


@pytest.mark.parametrize("script", ["launch/eval.py", "launch/generate.py"])
@pytest.mark.parametrize("kind", ["empty", "missing"])
def test_eval_and_generate_on_a_dir_that_is_not_a_run(tmp_path, script, kind):
    not_a_run = tmp_path / "not_a_run"
    if kind == "empty":
        not_a_run.mkdir()
    proc = launch(script, ["--run", str(not_a_run), "--prompt", "x"] if "generate" in script
                  else ["--run", str(not_a_run)], check=False, timeout=120)
    msg = user_error(proc, str(not_a_run), "--run", "runs/NAME")
    assert ("not a run dir" if kind == "empty" else "does not exist") in msg, msg
    if kind == "empty":
        assert list(not_a_run.iterdir()) == []
    else:
        assert not not_a_run.exists()


# ---- optimizer mistakes ------------------------------------------------------------------------

# (override, the allowed range the message must state)
BAD_OPTIM = [
    ("optim.lr=-1", "optim.lr > 0"),
    ("optim.min_lr=-0.01", "optim.min_lr >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay >= 0"),
    ("optim.beta1=1.0", "0 <= optim.beta1 < 1"),
    ("optim.beta2=1.5", "0 <= optim.beta2 < 1"),
    ("optim.eps=0", "optim.eps > 0"),
    ("optim.grad_clip=-1", "optim.grad_clip >= 0"),
    ("optim.step_gamma=0", "0 < optim.step_gamma <= 1"),
    ("optim.exp_gamma=1.5", "0 < optim.exp_gamma <= 1"),
    ("optim.decay_steps=0", "optim.decay_steps >= 1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps >= 0"),
    ("optim.step_size=0", "optim.step_size >= 1"),
]


@pytest.mark.parametrize("override,allowed", BAD_OPTIM, ids=[o for o, _ in BAD_OPTIM])
def test_each_bad_optimizer_value_names_key_value_and_range(override, allowed):
    from dsgpt.config import load_config
    from dsgpt.errors import UserError
    with pytest.raises(UserError) as err:
        load_config("configs/tiny.yaml", [override])
    key, _, value = override.partition("=")
    msg = str(err.value)
    assert f"'{key}' = {value}" in msg and allowed in msg and "1 problem(s)" in msg, msg


def test_bad_optimizer_values_stop_train_py_all_at_once(corpus, tmp_path):
    proc = train(*tiny_overrides(corpus, tmp_path, "optim"), *(o for o, _ in BAD_OPTIM))
    msg = user_error(proc, *(allowed for _, allowed in BAD_OPTIM))
    assert f"{len(BAD_OPTIM)} problem(s)" in msg, msg
    assert not (tmp_path / "optim").exists()


# ---- sampling mistakes -------------------------------------------------------------------------

# (flags, what the message must name: the flag, the value, the allowed range)
BAD_SAMPLING = [
    (["--max-new-tokens", "-5"], ["--max-new-tokens", "-5", ">= 1"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "= 0", ">= 1"]),
    (["--temperature", "-0.5"], ["--temperature", "-0.5", ">= 0", "greedy"]),
    (["--temperature", "nan"], ["--temperature", "nan", ">= 0"]),
    (["--top-k", "-1"], ["--top-k", "-1", ">= 0"]),
    (["--top-p", "2"], ["--top-p", "2.0", "(0, 1]"]),
    (["--top-p", "0"], ["--top-p", "0.0", "(0, 1]"]),
    (["--num-samples", "0"], ["--num-samples", "= 0", ">= 1"]),
]


def generate_main(argv: list[str]) -> int:
    import importlib.util
    spec = importlib.util.spec_from_file_location("launch_generate", REPO / "launch" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("flags,words", BAD_SAMPLING, ids=[" ".join(f) for f, _ in BAD_SAMPLING])
def test_each_bad_sampling_argument_names_flag_value_and_range(tmp_path, capsys, flags, words):
    # Checked before the run dir is read: a run that does not exist is never reached.
    assert generate_main(["--run", str(tmp_path / "no_such_run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_run" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_bad_sampling_arguments_all_at_once_before_the_run_is_read(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = launch("launch/generate.py", ["--run", str(missing), "--max-new-tokens", "-5", "--top-p", "2",
                                         "--top-k", "-3", "--temperature", "-1", "--num-samples", "0"],
                  check=False, timeout=120)
    msg = user_error(proc, "--max-new-tokens", "--top-p", "--top-k", "--temperature", "--num-samples")
    assert str(missing) not in msg, msg


def test_valid_sampling_edges_are_accepted():
    from dsgpt.generate import check_sampling_args
    check_sampling_args(1, 0.0, 0, 1.0, 1)       # greedy, top-k off, top-p 1 (off)
    check_sampling_args(5, 2.0, None, None, 3)   # None = off
    check_sampling_args(5, 0.8, 50, 0.9, 1, prompt_tokens=31, block_size=32)


def test_prompt_longer_than_the_context(trained):
    proc, run_dir = trained
    assert proc.returncode == 0, f"the fixture run failed:\n{proc.stderr[-4000:]}"
    gen = launch("launch/generate.py", ["--run", str(run_dir), "--prompt", "x = 1\n" * 40], check=False, timeout=300)
    msg = user_error(gen, "the prompt is", "context is 32 tokens", "at most 31")
    assert "shorten" in msg, msg
