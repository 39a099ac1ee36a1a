"""Generation (dsgpt/generate.py, the KV cache in dsgpt/model.py, `dsgpt generate` and
launch/generate.py): the cache changes no token, a batch gives what each prompt gives alone,
sampling is seeded, padding rows of the vocabulary are never drawn, streaming never splits a
character and adds up to the returned text, stop strings and the repetition penalty work, and
every bad argument is one clear error.

Greedy comparisons run on a trained checkpoint: a random model's logits are near-ties, where
rounding differences between two correct paths pick different tokens.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PY, REPO, child_env, launch, run_jobs, tiny_overrides
from dsgpt import cli
from dsgpt.generate import (GREEDY, Sampling, TextRow, check_sampling_args, complete, generate,
                            next_token, penalize_repetition, sample)
from dsgpt.model import GPT, GPTConfig, KVCache

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run faster on one thread than on two contending for two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TOKENIZER_VOCAB, MODEL_VOCAB = 512, 576  # the model's table has 64 padding rows beyond the tokenizer's
BLOCK = 32


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """(run dir, model, tokenizer, eos id) of a tiny run trained for 80 steps, vocab padded to 576."""
    from dsgpt.runs import load_model, run_tokenizer
    work = tmp_path_factory.mktemp("generate")
    overrides = tiny_overrides(corpus, work / "runs", "gen", "train.max_steps=80", "train.save_interval=80",
                               "train.eval_interval=80", f"model.vocab_size={MODEL_VOCAB}", "optim.lr=3e-3")
    run_jobs([{"name": "gen", "overrides": overrides}], ranks=1, work=work)
    run_dir = work / "runs" / "gen"
    model, cfg, _ = load_model(run_dir)
    tok, eos = run_tokenizer(run_dir, cfg)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB and model.config.vocab_size == MODEL_VOCAB
    assert model.config.block_size == BLOCK
    return run_dir, model, tok, eos


def ids(tok, text: str) -> list[int]:
    return tok.encode(text).ids


# ---- the model's cached forward ----------------------------------------------------------------

def random_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32)).eval()


@torch.no_grad()
def test_cached_forward_equals_the_full_forward_in_chunks_and_steps():
    model = random_model()
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(x)
    cache = KVCache(BLOCK)
    first, _ = model(x[:, :9], cache)
    chunk, _ = model(x[:, 9:15], cache)  # several new tokens after a cache: the causal mask is offset
    steps = [model(x[:, t:t + 1], cache)[0] for t in range(15, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat([first, chunk, *steps], 1), full, rtol=0, atol=1e-5)
    last, _ = model(x[:, :5], KVCache(BLOCK), last_only=True)
    torch.testing.assert_close(last[:, 0], full[:, 4], rtol=0, atol=1e-5)


@torch.no_grad()
def test_left_padded_rows_compute_what_each_prompt_computes_alone():
    model = random_model()
    prompts = [torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9, 2, 6, 5, 3, 5])]
    tokens = torch.zeros(2, 8, dtype=torch.long)
    valid = torch.zeros(2, 8, dtype=torch.bool)
    for row, p in enumerate(prompts):
        tokens[row, 8 - len(p):], valid[row, 8 - len(p):] = p, True
    pos = (valid.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(BLOCK)
    logits, _ = model(tokens, cache, pos, valid)
    nxt, _ = model(torch.tensor([[7], [8]]), cache, pos[:, -1:] + 1)
    assert not logits.isnan().any() and not nxt.isnan().any()
    for row, (p, token) in enumerate(zip(prompts, (7, 8))):
        alone = model(torch.cat([p, torch.tensor([token])])[None])[0]
        torch.testing.assert_close(logits[row, 8 - len(p):], alone[:-1], rtol=0, atol=1e-5)
        torch.testing.assert_close(nxt[row, 0], alone[-1], rtol=0, atol=1e-5)


# ---- same tokens with and without the cache; batches --------------------------------------------

def greedy_with_logits(monkeypatch, model, prompt: list[int], n: int, use_cache: bool):
    """(new tokens, the logits each step chose from)."""
    import dsgpt.generate as generate_mod
    seen = []

    def spy(logits, *args, **kwargs):
        seen.append(logits)
        return next_token(logits, *args, **kwargs)
    monkeypatch.setattr(generate_mod, "next_token", spy)
    return generate(model, [prompt], n, GREEDY, use_cache=use_cache)[0], torch.stack(seen)


def test_greedy_with_the_cache_equals_without_it_past_block_size(trained, monkeypatch):
    _, model, tok, eos = trained
    prompt = ids(tok, "def __init__(self")
    with_cache, cached_logits = greedy_with_logits(monkeypatch, model, prompt, 80, use_cache=True)
    without, plain_logits = greedy_with_logits(monkeypatch, model, prompt, 80, use_cache=False)
    assert len(prompt) + 80 > 2 * BLOCK  # the window slides for most of the run
    assert with_cache == without
    # The same context at every step, not only the same winners: on a model this small, a window
    # one token short picks the same tokens, but not the same logits.
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=1e-4)
    monkeypatch.undo()
    # The old entry point (the trainer's), through both paths.
    x = torch.tensor([prompt])
    assert torch.equal(sample(model, x, 80, BLOCK, temperature=0), sample(model, x, 80, BLOCK, 0, use_cache=False))


def test_a_batch_of_unequal_prompts_gives_what_each_gives_alone(trained):
    _, model, tok, _ = trained
    texts = ["import", "    def __init__(self, name", "x", "        if not isinstance(value, int):\n"]
    prompts = [ids(tok, t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    batch = generate(model, prompts, 40, GREEDY)
    for prompt, row in zip(prompts, batch):
        assert row == generate(model, [prompt], 40, GREEDY, use_cache=False)[0]


def test_seeded_sampling_is_reproducible(trained):
    _, model, tok, _ = trained
    prompts = [ids(tok, "def "), ids(tok, "class Foo")]
    hot = Sampling(temperature=1.0, top_k=0)

    def draw(seed):
        return generate(model, prompts, 30, hot, generator=torch.Generator().manual_seed(seed))
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@torch.no_grad()
def test_padding_rows_of_the_vocabulary_are_never_sampled(trained):
    _, trained_model, tok, _ = trained
    model = GPT(trained_model.config).eval()
    model.load_state_dict(trained_model.state_dict())
    # Padding rows along the final LayerNorm's bias, scaled up: their logits then beat every real token.
    bias = model.transformer.ln_f.bias
    model.transformer.wte.weight[TOKENIZER_VOCAB:] = 50 * bias / bias.norm()
    prompt = ids(tok, "def ")
    assert model(torch.tensor([prompt]))[0, -1].argmax() >= TOKENIZER_VOCAB  # they would win
    unmasked = generate(model, [prompt] * 8, 5, Sampling(1.0, 0), generator=torch.Generator().manual_seed(0))
    assert any(t >= TOKENIZER_VOCAB for row in unmasked for t in row)
    rows = generate(model, [prompt] * 8, 125, Sampling(temperature=1.0, top_k=0), vocab_size=TOKENIZER_VOCAB,
                    generator=torch.Generator().manual_seed(0))
    drawn = [t for row in rows for t in row]
    assert len(drawn) == 1000 and max(drawn) < TOKENIZER_VOCAB
    assert max(generate(model, [prompt], 20, GREEDY, vocab_size=TOKENIZER_VOCAB)[0]) < TOKENIZER_VOCAB


def test_greedy_equals_transformers_generate(trained):
    """The same weights in transformers' GPT2LMHeadModel, with its own KV cache, pick the same tokens."""
    from dsgpt.hf import to_hf_model
    _, model, tok, eos = trained
    prompt = ids(tok, "def __init__(self")
    hf = to_hf_model(model, eos, eos)
    n = BLOCK - len(prompt)  # transformers' GPT-2 has no sliding window
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=eos)
    assert generate(model, [prompt], n, GREEDY)[0] == out[0, len(prompt):].tolist()


# ---- text: streaming, stop strings -------------------------------------------------------------

class Scripted:
    """A 'model' (tokens -> logits) whose greedy continuation is `script`, token by token."""

    def __init__(self, prompt_len: int, script: list[int], vocab: int):
        self.prompt_len, self.script, self.vocab = prompt_len, script, vocab

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(tokens.size(0), tokens.size(1), self.vocab)
        logits[:, -1, self.script[tokens.size(1) - self.prompt_len]] = 1.0
        return logits


def test_streaming_never_splits_a_character_and_adds_up_to_the_text(trained):
    _, _, tok, eos = trained
    target = " naïve café — 😀 ok ✓ 日本"
    script = ids(tok, target)
    # The BPE never saw these characters: their bytes are separate tokens, most ending mid-character.
    assert sum("\ufffd" in tok.decode([t]) for t in script) >= 5
    prompt = "résumé:"
    pieces: list[str] = []
    text, = complete(Scripted(len(ids(tok, prompt)), script, TOKENIZER_VOCAB), tok, [prompt], len(script),
                     eos_id=eos, on_text=pieces.append, block_size=1000)
    assert text == prompt + target
    assert "".join(pieces) == text
    assert pieces[0] == prompt and len(pieces) > 5  # streamed as it grew, not at the end
    assert not any("\ufffd" in p for p in pieces)


def test_streamed_text_equals_returned_text_on_the_trained_model(trained):
    _, model, tok, eos = trained
    for prompt, stop in (("déf café(self", ()), ("", ()), ("class ", ("\n",))):
        pieces: list[str] = []
        text, = complete(model, tok, [prompt], 50, GREEDY, eos_id=eos, stop=stop, on_text=pieces.append)
        assert "".join(pieces) == text and text.startswith(prompt)
        assert text == complete(model, tok, [prompt], 50, GREEDY, eos_id=eos, stop=stop)[0]


def test_stop_strings_cut_the_text_before_them(trained):
    _, model, tok, eos = trained
    prompt = "def "
    full = complete(model, tok, [prompt], 60, GREEDY, eos_id=eos)[0][len(prompt):]
    assert len(full) > 20
    stop = full[12:15]
    cut = full.index(stop)
    pieces: list[str] = []
    text, = complete(model, tok, [prompt], 60, GREEDY, eos_id=eos, stop=[stop, "never in the text"],
                     on_text=pieces.append)
    assert text == prompt + full[:cut]
    assert "".join(pieces) == text
    # The earliest of several stop strings wins.
    other = full[5:7]
    both = complete(model, tok, [prompt], 60, GREEDY, eos_id=eos, stop=[stop, other])[0]
    assert both == prompt + full[:min(cut, full.index(other))]


def test_text_row_holds_back_what_a_stop_string_may_still_complete(trained):
    _, _, tok, _ = trained
    pieces: list[str] = []
    row = TextRow(tok, ids(tok, "x"), stops=["STOP"], emit=pieces.append)
    script = ids(tok, " ab ST") + ids(tok, "OP tail")
    done = [row.push(t) for t in script]
    assert done.index(True) < len(script) - 1 and not any("ST" in p for p in pieces)
    assert row.finish() == " ab " and "".join(pieces) == " ab "


# ---- repetition penalty ------------------------------------------------------------------------

def test_repetition_penalty_matches_the_reference():
    from transformers import RepetitionPenaltyLogitsProcessor
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0, 4.0], [1.0, 1.8, -2.0, 2.0, -0.5, 3.0]])
    context = torch.tensor([[0, 1, 1, 4], [3, 2, 5, 5]])
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, context, True)
    ours = penalize_repetition(logits, seen, 2.0)
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0, 0.0, 4.0], [1.0, 1.8, -4.0, 1.0, -0.5, 1.5]])
    assert torch.equal(ours, expected)
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(2.0)(context, logits.clone()))
    # Greedy picks the best token after the penalty: row 1's 3.0 (seen) halves below an unseen 1.8.
    assert next_token(logits, GREEDY, seen).tolist() == [5, 5]
    assert next_token(logits, Sampling(0.0, repetition_penalty=2.0), seen).tolist() == [5, 1]


def test_repetition_penalty_changes_greedy_output(trained):
    _, model, tok, _ = trained
    prompt = ids(tok, "def __init__(self")
    plain = generate(model, [prompt], 40, GREEDY)[0]
    penalized = generate(model, [prompt], 40, Sampling(0.0, repetition_penalty=1.5))[0]
    assert penalized != plain
    # A penalized greedy run repeats fewer tokens: each repeat of a seen token was discouraged.
    assert len(set(penalized)) > len(set(plain))


# ---- the command line --------------------------------------------------------------------------

def dsgpt_generate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`dsgpt generate ...` as a user runs it (the console script when installed)."""
    script = Path(PY).parent / "dsgpt"
    cmd = [str(script)] if script.exists() else [PY, "-m", "dsgpt.cli"]
    return subprocess.run([*cmd, "generate", *args], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_dsgpt_generate_streams_the_library_text_and_launch_is_its_twin(trained, tmp_path):
    run_dir, model, tok, eos = trained
    expected = complete(model, tok, ["def "], 30, GREEDY, eos_id=eos)[0]
    proc = dsgpt_generate("--run", str(run_dir), "--prompt", "def ", "--greedy", "--max-new-tokens", "30",
                          "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected + "\n"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("def ", "class A")) + "\n")
    out = launch("launch/generate.py", ["--run", str(run_dir), "--prompts-file", str(prompts), "--greedy",
                                        "--max-new-tokens", "30", "--stop", "\n\n"], timeout=300)
    texts = complete(model, tok, ["def ", "class A"], 30, GREEDY, eos_id=eos, stop=["\n\n"])
    assert out.stdout == "".join(f"--- prompt {i + 1}, sample 1 ---\n{t}\n" for i, t in enumerate(texts))


def test_prompts_file_one_per_line_with_samples(trained, tmp_path, capsys):
    run_dir, *_ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \n\nimport\n")  # the blank line is skipped
    args = ["generate", "--run", str(run_dir), "--prompts-file", str(prompts), "--max-new-tokens", "8",
            "--num-samples", "2", "--seed", "3", "--batch-size", "3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("--- prompt")]
    assert headers == [f"--- prompt {p}, sample {s} ---" for p in (1, 2) for s in (1, 2)]
    assert cli.main(args) == 0 and capsys.readouterr().out == out  # seeded


# (flags, what the message must name); all are refused before the run dir is read
BAD = [
    (["--repetition-penalty", "0"], ["--repetition-penalty", "0.0", "> 0"]),
    (["--repetition-penalty", "-1.5"], ["--repetition-penalty", "-1.5", "> 0"]),
    (["--repetition-penalty", "inf"], ["--repetition-penalty", "inf", "> 0"]),
    (["--stop", ""], ["--stop", "''", "non-empty"]),
    (["--batch-size", "0"], ["--batch-size", "= 0", ">= 1"]),
    (["--device", "tpu"], ["--device", "invalid choice", "tpu"]),
    (["--prompt", "a", "--prompts-file", "p.txt"], ["--prompts-file", "not allowed with"]),
    (["--greedy", "--temperature", "1"], ["--temperature", "not allowed with"]),
    (["--top-k", "many"], ["--top-k", "invalid int", "many"]),
    (["--max-new-tokens", "0", "--top-p", "0"], ["--max-new-tokens", "--top-p", "(0, 1]"]),
]


@pytest.mark.parametrize("flags,words", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_each_bad_argument_is_one_clear_error(tmp_path, capsys, flags, words):
    assert cli.main(["generate", "--run", str(tmp_path / "no_such_run"), *flags]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err and "no_such_run" not in err, err
    for word in words:
        assert word in err, (word, err)


def bad_prompts_files(tmp_path: Path) -> dict:
    files = {"empty.txt": "\n \n", "bad.jsonl": '{"prompt": "ok"}\n{"text": "no prompt"}\n',
             "nonstring.jsonl": '{"prompt": 3}\n', "broken.jsonl": '{"prompt": \n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {"missing.txt": ["Cannot read the prompts file", "missing.txt"],
            "empty.txt": ["holds no prompt"],
            "bad.jsonl": ["Line 2", "no \"prompt\" field"],
            "nonstring.jsonl": ["Line 1", "not a string"],
            "broken.jsonl": ["Line 1", "JSON"]}


def test_bad_prompts_files_are_named(tmp_path, capsys):
    for name, words in bad_prompts_files(tmp_path).items():
        assert cli.main(["generate", "--run", str(tmp_path / "no_such_run"), "--prompts-file",
                         str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "no_such_run" not in err, err
        for word in words:
            assert word in err, (name, word, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    assert cli.main(["generate", "--run", str(tmp_path / "no_such_run"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err, err


def test_a_too_long_prompt_in_a_file_is_named_by_line(trained, tmp_path, capsys):
    run_dir, *_ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \n" + "x = 1; " * 40 + "\n")
    assert cli.main(["generate", "--run", str(run_dir), "--prompts-file", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert f"line 2 of {prompts}" in err and "context is 32 tokens" in err and "line 1" not in err, err


def test_bad_arguments_through_both_real_entry_points(tmp_path):
    bad = ["--run", str(tmp_path / "nope"), "--repetition-penalty", "0", "--stop", "", "--max-new-tokens", "0"]
    for proc in (dsgpt_generate(*bad), launch("launch/generate.py", bad, check=False, timeout=120)):
        assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        msg = proc.stderr[proc.stderr.index("error: "):]
        assert all(w in msg for w in ("--repetition-penalty", "--stop", "--max-new-tokens")), msg


def test_check_sampling_args_accepts_the_edges():
    check_sampling_args(1, 0.0, 0, 1.0, 1, repetition_penalty=1e-3, stop=["\n"], batch_size=1)
    check_sampling_args(5, 0.8, 50, 0.9, 1, prompt_tokens=31, block_size=32, repetition_penalty=10)


# ---- through a DeepSpeed engine (the trainer's text samples) -------------------------------------

@pytest.mark.slow  # a 2-rank DeepSpeed launch: most of a minute on 2 busy cores
def test_generation_through_a_zero3_engine_uses_the_cache_and_agrees_on_every_rank(trained, tmp_path):
    run_dir, model, tok, _ = trained
    prompt = ids(tok, "def __init__(self")
    launch("tests/workers/engine_generate.py", [str(run_dir), "3", json.dumps(prompt), str(tmp_path)],
           ranks=2, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = prompt + generate(model, [prompt], 40, GREEDY, use_cache=False)[0]
    for r in ranks:
        assert r["zero_stage"] == 3 and r["sharded"]  # the parameters really were partitioned
        assert r["cache_updates"] > 0 and r["plain_updates"] == 0  # the cached path ran, through the engine
        assert r["cached"] == r["plain"] == expected
    assert ranks[0]["sampled"] == ranks[1]["sampled"]  # same seed, same draws: the ranks stay in lockstep
