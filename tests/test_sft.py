"""Supervised fine-tuning on conversations, end to end: the trainer reads chat data dirs (packed
rows, masked labels) with the guarantees pretraining has (micro x GAS, ranks, exact resume);
starting from a pretrained model (train.init_from, the embedding grows for the role markers) it
learns the built-in instruction set well enough to answer held-out prompts; `dsgpt chat` talks to
the result through stdin, and its HF export answers the same through transformers' chat template."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PRETRAINED_SHAPE, PY, REPO, child_env, grad_norms, launch, losses, run_jobs, tiny_overrides

CLI = str(REPO / "dsgpt" / "cli.py")
SFT = ("model.block_size=64", "model.n_embd=64")
# Measured: 0.905 of 200 held-out prompts after these 1500 steps (0.0 before fine-tuning).
FINE_TUNE = (*PRETRAINED_SHAPE, "train.max_steps=1500", "train.micro_batch_size=16", "optim.lr=2e-3",
             "optim.min_lr=2e-4", "optim.warmup_steps=30", "train.eval_interval=500", "train.save_interval=1500")
ACCURACY_FLOOR = 0.7


@pytest.fixture(scope="module")
def chat_data(pretrained_tiny, tmp_path_factory) -> Path:
    """The built-in instruction set, tokenized with the pretrained run's tokenizer + role markers."""
    out = tmp_path_factory.mktemp("sft") / "chat"
    launch(CLI, ["prepare", "--chat", "--input", "builtin", "--tokenizer", str(pretrained_tiny), "--block-size", "64",
                 "--out", str(out), "--quiet"], timeout=300)
    return out


def held_out(chat_data: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in (chat_data / "held_out.jsonl").read_text().splitlines()[:n]]


def chat(run_dir: Path, lines: list[str], *flags: str) -> list[str]:
    """`dsgpt chat` with `lines` on stdin: its replies, one per line."""
    proc = subprocess.run([PY, CLI, "chat", "--run", str(run_dir), *flags], input="".join(f"{x}\n" for x in lines),
                          capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def accuracy(run_dir: Path, pairs: list[dict]) -> float:
    lines = [x for p in pairs for x in (p["prompt"], "/reset")]  # each prompt in a fresh conversation
    replies = chat(run_dir, lines, "--max-new-tokens", "16")  # every answer fits: a few words
    assert len(replies) == len(pairs), replies
    return sum(r == p["response"] for r, p in zip(replies, pairs)) / len(pairs)


# ---- the trainer on chat data: the same guarantees as pretraining ---------------------------------

@pytest.fixture(scope="module")
def sft_runs(chat_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("sft-runs")
    out = work / "runs"

    def job(name, *extra):
        return {"name": name, "overrides": tiny_overrides(chat_data, out, name, *SFT, "model.dropout=0.1",
                                                           "deepspeed.zero_stage=1", "optim.decay_steps=20", *extra)}
    results = {}
    # Bitwise equality needs fresh processes: the straight run goes first in its launch.
    results.update(run_jobs([job("straight", "train.max_steps=12", "train.save_interval=6"),
                             job("dp2_micro2", "train.micro_batch_size=2", "model.dropout=0.0")],
                            ranks=2, work=work / "a"))
    results.update(run_jobs([job("split", "train.max_steps=6", "train.save_interval=6")], ranks=2, work=work / "b"))
    second = run_jobs([job("split", "train.max_steps=12", "train.save_interval=6")], ranks=2, work=work / "c")
    results.update(run_jobs([job("micro4_gas1", "model.dropout=0.0"),
                             job("micro2_gas2", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                                 "model.dropout=0.0")], ranks=1, work=work / "d"))
    return results, second


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) <= tol * max(abs(x), abs(y)) for x, y in zip(a, b))


def test_sft_gradient_accumulation_and_ranks_match(sft_runs):
    runs, _ = sft_runs
    reference = runs["micro4_gas1"][0]
    assert len(losses(reference)) == 10 and losses(reference)[-1] < losses(reference)[0]
    for other in (runs["micro2_gas2"][0], runs["dp2_micro2"][0], runs["dp2_micro2"][1]):
        assert close(losses(other), losses(reference)), (losses(other), losses(reference))
        assert close(grad_norms(other), grad_norms(reference)), (grad_norms(other), grad_norms(reference))


def test_sft_run_stopped_and_resumed_is_bit_identical(sft_runs):
    runs, second = sft_runs
    straight, first, resumed = runs["straight"][0], runs["split"][0], second["split"][0]
    assert (first["last_step"], resumed["first_step"], resumed["last_step"]) == (6, 7, 12)
    assert losses(first) + losses(resumed) == losses(straight)
    assert resumed["val_loss"] == straight["val_loss"]


def test_data_pack_is_part_of_the_resume_fingerprint(chat_data, tmp_path):
    base = [*tiny_overrides(chat_data, tmp_path, "packed", *SFT, "train.max_steps=2", "train.save_interval=2")]
    launch("launch/train.py", base, timeout=300)
    proc = launch("launch/train.py", [*base, "train.max_steps=4", "data.pack=false"], check=False, timeout=300)
    assert proc.returncode == 2 and "data.pack" in proc.stderr, proc.stderr[-2000:]


def test_data_pack_on_pretraining_data_is_an_error(corpus, tmp_path):
    proc = launch("launch/train.py", tiny_overrides(corpus, tmp_path, "p", "data.pack=true"), check=False, timeout=300)
    assert proc.returncode == 2 and "data.pack" in proc.stderr and "Remove data.pack" in proc.stderr, proc.stderr


# ---- learning, chatting, exporting ----------------------------------------------------------------

@pytest.fixture(scope="module")
def fine_tuned(pretrained_tiny, chat_data, tmp_path_factory):
    """(run dir before fine-tuning: 1 step at a negligible lr, fine-tuned run dir, its training log)."""
    out = tmp_path_factory.mktemp("fine-tuned") / "runs"
    common = [*tiny_overrides(chat_data, out, "sft", *FINE_TUNE), f"train.init_from={pretrained_tiny}"]
    proc = launch("launch/train.py", ["--config", "configs/tiny.yaml", *common], timeout=900)
    before = [*tiny_overrides(chat_data, out, "before", *PRETRAINED_SHAPE, "train.max_steps=1", "optim.lr=1e-12",
                              "optim.min_lr=0", "optim.warmup_steps=0"), f"train.init_from={pretrained_tiny}"]
    launch("launch/train.py", ["--config", "configs/tiny.yaml", *before], timeout=300)
    return out / "before", out / "sft", proc.stdout


def test_fine_tuning_starts_from_the_pretrained_model_and_grows_its_embedding(fine_tuned):
    _, _, log = fine_tuned
    assert "init_from: weights of the checkpoint" in log and "4 new token(s), ids 512-515" in log, log[-3000:]


def test_fine_tuned_model_answers_held_out_prompts(fine_tuned, chat_data):
    before, after, _ = fine_tuned
    pairs = held_out(chat_data, 100)
    assert accuracy(before, pairs[:40]) < 0.05
    assert accuracy(after, pairs) >= ACCURACY_FLOOR


def test_chat_over_stdin_answers_resets_and_exits(fine_tuned, chat_data):
    _, run_dir, _ = fine_tuned
    p = held_out(chat_data, 3)
    replies = chat(run_dir, [p[0]["prompt"], p[1]["prompt"], "/reset", p[2]["prompt"], "/exit", "never read"])
    assert replies == [x["response"] for x in p]
    fresh = chat(run_dir, [p[2]["prompt"]])
    assert fresh == replies[2:]  # after /reset the session is a fresh one
    transcript = chat(run_dir, [p[0]["prompt"]], "--echo")
    assert transcript == [f"you> {p[0]['prompt']}", f"assistant> {p[0]['response']}"]


def test_chat_prompt_keeps_the_system_prompt_and_room_for_the_reply(fine_tuned, chat_data):
    from dsgpt.chat import ChatSession, load
    from dsgpt.data.chat import END, SYSTEM
    from dsgpt.data.instructions import SYSTEM_PROMPT
    _, run_dir, _ = fine_tuned
    cm = load(run_dir, device="cpu")
    room = 8
    session = ChatSession(cm, system=SYSTEM_PROMPT, max_new_tokens=room)
    system_ids = cm.tok.encode(SYSTEM + SYSTEM_PROMPT + END, add_special_tokens=False).ids
    pairs = held_out(chat_data, 8)
    most_kept = 0
    for i, pair in enumerate(pairs):  # far more history than the 64-token context holds
        ids = session.prompt_ids(pair["prompt"])
        assert ids[: len(system_ids)] == system_ids
        assert len(ids) + room <= cm.block_size
        text = cm.tok.decode(ids, skip_special_tokens=False)
        kept = [p for p in pairs[:i] if p["prompt"] in text]
        assert kept == pairs[i - len(kept):i]  # the newest exchanges: the oldest were dropped first
        most_kept = max(most_kept, len(kept))
        session.reply(pair["prompt"])
    assert len(session.history) == 16 and 1 <= most_kept < 7


def test_export_answers_like_dsgpt_chat_through_transformers(fine_tuned, chat_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsgpt.data.instructions import SYSTEM_PROMPT
    _, run_dir, _ = fine_tuned
    launch(CLI, ["export", "--run", str(run_dir), "--hf", str(tmp_path / "hf")], timeout=300)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert tok.eos_token == "<|end|>" and tok.chat_template
    pairs = held_out(chat_data, 4)
    ours = chat(run_dir, [x for p in pairs for x in (p["prompt"], "/reset")], "--system", SYSTEM_PROMPT,
                "--max-new-tokens", "16")
    for pair, reply in zip(pairs, ours):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": pair["prompt"]}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        theirs = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert theirs == reply, (pair, theirs, reply)


def test_chat_refuses_a_run_not_trained_on_chat_data(pretrained_tiny):
    proc = subprocess.run([PY, CLI, "chat", "--run", str(pretrained_tiny)], input="hello\n", capture_output=True,
                          text=True, env=child_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "not fine-tuned on chat data" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
