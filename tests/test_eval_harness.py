"""`dsgpt eval`: perplexity and bits per byte against independent computations, generation
metrics on a run that memorised four answers (and on an untrained one), TensorBoard scalars,
and the errors a user can cause.

One launch trains two tiny runs on the same small corpus: `memo` long enough to memorise every
prompt -> reference pair, `fresh` for a single step.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_jobs, tiny_overrides
from dsgpt import cli
from dsgpt.data.prepare import in_val, prepare
from dsgpt.runs import load_model, run_tokenizer

PAIRS = [
    ("Q: what is red? A:", " the apple on the table is red"),
    ("Q: what is blue? A:", " the sky above the hills is blue"),
    ("Q: who sings? A:", " a small bird sings every morning"),
    ("Q: who reads? A:", " my old friend reads long books"),
]
REPEATS, SEED, VAL_FRACTION, MEMO_STEPS = 60, 7, 0.1, 250


def documents() -> list[str]:
    return [p + r for _ in range(REPEATS) for p, r in PAIRS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval-harness")
    src = work / "pairs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents()))
    data = work / "data"
    prepare([str(src)], data, vocab_size=300, val_fraction=VAL_FRACTION, seed=SEED, progress=False)
    common = ("train.eval_interval=1000", "train.save_best=false", "optim.warmup_steps=10")
    memo = ("optim.lr=3e-3", "optim.min_lr=3e-4", "train.micro_batch_size=8", f"train.max_steps={MEMO_STEPS}")
    jobs = [{"name": "memo", "overrides": tiny_overrides(data, work / "runs", "memo", *common, *memo)},
            {"name": "fresh", "overrides": tiny_overrides(data, work / "runs", "fresh", *common, "train.max_steps=1")}]
    results = run_jobs(jobs, ranks=1, work=work)
    for name, summary in results.items():
        assert "error" not in summary[0], summary[0]
    qa = work / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in PAIRS))
    return {"memo": work / "runs" / "memo", "fresh": work / "runs" / "fresh", "qa": qa, "data": data, "work": work}


def dsgpt_eval(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def results(run_dir, tag: str) -> dict:
    return json.loads((run_dir / "eval" / f"{tag}.json").read_text())


@pytest.fixture(scope="module")
def memo_eval(runs):
    """`dsgpt eval` of the memorised run on both tasks; (exit code, stdout, results)."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["eval", "--run", str(runs["memo"]), "--tasks", f"lm,gen:{runs['qa']}",
                         "--max-docs", "1000", "--max-new-tokens", "24"])
    return code, out.getvalue(), results(runs["memo"], f"step{MEMO_STEPS:07d}")


# ---- language modelling ---------------------------------------------------------------------------

def test_perplexity_is_exp_of_the_mean_token_loss(runs, memo_eval):
    code, stdout, res = memo_eval
    assert code == 0 and "perplexity" in stdout and "bpb" in stdout, stdout
    model, cfg, _ = load_model(runs["memo"])
    from dsgpt.data.dataset import TokenData
    data = TokenData(runs["data"], cfg.model.block_size, cfg.run.seed)
    n_windows = cfg.train.eval_batches * (cfg.eval.batch_size or cfg.train.micro_batch_size)
    tokens = torch.from_numpy(data.val.windows(data.val_starts(n_windows), cfg.model.block_size + 1))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    assert res["tokens"] == losses.numel() == res["lm"]["tokens"]
    assert res["val/loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert res["val/ppl"] == pytest.approx(math.exp(float(losses.mean())), rel=1e-5)
    assert res["val/accuracy"] == pytest.approx(float((logits.argmax(-1) == tokens[:, 1:]).float().mean()), rel=1e-6)


def test_bits_per_byte_equals_nats_over_the_texts_bytes(runs, memo_eval):
    _, _, res = memo_eval
    # The val documents, chosen from the source texts the way prepare splits them.
    meta = json.loads((runs["data"] / "meta.json").read_text())
    val_docs = [d for i, d in enumerate(documents()) if in_val(SEED, i, VAL_FRACTION)]
    assert len(val_docs) == meta["n_val_documents"] == res["lm"]["bpb_documents"]
    n_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    model, cfg, _ = load_model(runs["memo"])
    tok, eos = run_tokenizer(runs["memo"], cfg)
    nats = 0.0
    for doc in val_docs:  # each shorter than the context: one plain forward of EOS + doc + EOS
        ids = torch.tensor([[eos, *tok.encode(doc).ids, eos]])
        assert ids.size(1) <= cfg.model.block_size
        with torch.no_grad():
            nats += float(F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum"))
    assert res["lm"]["bpb_bytes"] == n_bytes
    assert res["lm"]["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert 0 < res["lm"]["bpb"] < 1.0, res["lm"]  # memorised text costs far less than a bit per byte


def test_sliding_window_scores_every_target_once_with_the_stated_context():
    from dsgpt.eval.bpb import document_nats, windows
    from dsgpt.model import GPT, GPTConfig
    torch.manual_seed(0)
    block, eos = 8, 0
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=block, vocab_size=40)).eval()
    ids = np.random.default_rng(0).integers(1, 40, size=29)
    seq = torch.tensor([eos, *ids.tolist(), eos])
    for stride in (1, 3, block // 2, block):
        scored = [t for a, b, new in windows(len(seq) - 1, block, stride) for t in range(b - new + 1, b + 1)]
        assert scored == list(range(1, len(seq)))  # each target exactly once, in order
    # stride 1: every target sees min(t, block) tokens of context; score each on its own.
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(model(seq[None, max(0, t - block):t])[0, -1:], seq[t:t + 1]))
                       for t in range(1, len(seq)))
    nats, n = document_nats(model, ids, eos, block, stride=1, device="cpu")
    assert n == len(seq) - 1 and nats == pytest.approx(expected, rel=1e-5)


# ---- generation ---------------------------------------------------------------------------------

def test_memorised_answers_score_full_marks_and_an_untrained_run_does_not(runs, memo_eval, capsys):
    _, stdout, memo = memo_eval
    gen = memo["gen/qa"]
    assert [s["output"].strip() for s in gen["samples"]] == [r.strip() for _, r in PAIRS], gen["samples"]
    assert gen["bleu"] == pytest.approx(100.0) and gen["rougeL"] == pytest.approx(1.0)
    assert gen["rouge1"] == pytest.approx(1.0) and gen["exact_match"] == 1.0 and gen["examples"] == 4
    assert "gen/qa" in stdout and "bleu" in stdout

    code, _, err = dsgpt_eval(capsys, "--run", runs["fresh"], "--tasks", f"gen:{runs['qa']}", "--max-new-tokens", "12")
    assert code == 0, err
    fresh = results(runs["fresh"], "step0000001")["gen/qa"]
    print(f"BLEU memo {gen['bleu']:.1f} fresh {fresh['bleu']:.1f}; ROUGE-L memo {gen['rougeL']:.3f} "
          f"fresh {fresh['rougeL']:.3f}; bpb memo {memo['lm']['bpb']:.4f}")
    assert fresh["bleu"] < 20 and fresh["rougeL"] < 0.5 and fresh["exact_match"] == 0.0, fresh


def test_tensorboard_scalars_at_the_checkpoint_step(runs, memo_eval):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, _, res = memo_eval
    acc = EventAccumulator(str(runs["memo"] / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags  # the training curves are still there
    for tag, value in (("eval/lm/ppl", res["lm"]["ppl"]), ("eval/lm/bpb", res["lm"]["bpb"]),
                       ("eval/gen/qa/bleu", res["gen/qa"]["bleu"]), ("eval/gen/qa/rougeL", res["gen/qa"]["rougeL"])):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [MEMO_STEPS] == [res["step"]], (tag, events)
        assert events[-1].value == pytest.approx(value, rel=1e-6)


# ---- user errors --------------------------------------------------------------------------------

def one_error(code: int, err: str, *needles: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_run_without_a_checkpoint(runs, tmp_path, capsys):
    run = tmp_path / "bare"
    run.mkdir()
    shutil.copy(runs["fresh"] / "config.yaml", run / "config.yaml")
    one_error(*dsgpt_eval(capsys, "--run", run)[::2], "no 'latest' checkpoint")


def test_unknown_task_names_the_closest(runs, capsys):
    one_error(*dsgpt_eval(capsys, "--run", runs["fresh"], "--tasks", "lm,gne:x.jsonl")[::2], "'gne'", "closest: gen")


@pytest.mark.parametrize("content,needles", [
    (None, ["does not exist"]),
    ('{"prompt": "a", "reference": "b"}\n\n{"prompt": "a"\n', ["line 3 of", "not valid JSON"]),
    ('{"prompt": "a", "reference": "b"}\n{"prompt": "a"}\n', ["line 2 of", '"reference"']),
    ('["a", "b"]\n', ["line 1 of", "list"]),
    ('{"prompt": "caf\u00e9", "reference": "b"}\n'.encode("latin-1"), ["not valid UTF-8 (near line 1)"]),
], ids=["missing", "bad-json", "missing-field", "not-an-object", "not-utf8"])
def test_bad_generation_file(runs, tmp_path, capsys, content, needles):
    path = tmp_path / "tasks.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    one_error(*dsgpt_eval(capsys, "--run", runs["fresh"], "--tasks", f"gen:{path}")[::2], str(path), *needles)
