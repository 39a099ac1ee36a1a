"""Chat (SFT) data: templates and label masks, truncation, bad inputs, the chat shard format,
packed SFT batches and the model's block-diagonal attention over packed examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsgpt.cli import main
from dsgpt.data import chat
from dsgpt.data.dataset import TokenData
from dsgpt.data.loader import StepLoader
from dsgpt.data.prepare import prepare, prepare_chat
from dsgpt.data.sft import SFTData, first_fit
from dsgpt.data.tokenizer import added_ids, load_tokenizer, train_bpe
from dsgpt.errors import UserError
from dsgpt.model import GPT, GPTConfig, IGNORE_INDEX

KNOWN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say one."},
    {"role": "assistant", "content": "reply1"},
    {"role": "user", "content": "Say two."},
    {"role": "assistant", "content": "reply2"},
]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Short synthetic conversations of varied length (both input shapes)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, size=rng.integers(1, 6)))
        a = " ".join(rng.choice(WORDS, size=rng.integers(1, 8)))
        if i % 3 == 0:
            out.append({"prompt": q, "response": a})
        else:
            out.append({"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]})
    return out


@pytest.fixture(scope="module")
def tok():
    text = [" ".join(WORDS) * 3, "reply1 reply2 Say one. two. You are terse."]
    return train_bpe(text, 300, special_tokens=chat.ROLE_MARKERS)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    src = write_jsonl(folder / "conv.jsonl", conversations(120))
    prepare_chat([src], folder / "data", block_size=64, vocab_size=300, val_fraction=0.1, progress=False)
    return folder / "data"


def labelled_text(tok, ex: chat.Example) -> str:
    return tok.decode([i for i, lab in zip(ex.ids, ex.labelled) if lab], skip_special_tokens=False)


# ---- templates and labels -------------------------------------------------------------------

def test_labels_are_exactly_the_replies_and_their_end_of_turn(tok):
    ex = chat.encode(tok, chat.ChatTemplate(), KNOWN)
    assert labelled_text(tok, ex) == "reply1<|end|>reply2<|end|>"
    odd = [{"role": "user", "content": "ça va? 世界"}, {"role": "assistant", "content": "très bien 🙂"}]
    assert labelled_text(tok, chat.encode(tok, chat.ChatTemplate(), odd)) == "très bien 🙂<|end|>"  # char offsets
    tokens = [tok.id_to_token(i) for i in ex.ids]
    assert tokens[0] == "<|system|>" and not ex.labelled[0]
    # every labelled token sits between an <|assistant|> marker and the <|end|> that closes it
    in_reply = False
    for t, lab in zip(tokens, ex.labelled):
        if t == "<|assistant|>":
            in_reply = True
            assert not lab
            continue
        assert lab == in_reply, (t, lab)
        if t == "<|end|>":
            in_reply = False


def test_shifted_batch_labels_decode_to_the_replies(tmp_path, tok):
    tok_file = tmp_path / "tok.json"
    tok_file.write_text(tok.to_str())
    src = write_jsonl(tmp_path / "known.jsonl", [{"messages": KNOWN}] * 2)
    prepare_chat([src], tmp_path / "d", block_size=64, tokenizer=tok_file, pack=False, progress=False)
    data = SFTData(tmp_path / "d", 64, seed=0)
    (x, y), = data.train_micro_batches(0, 0, 1, 1, 1)  # unpacked: (x, y) pairs
    labels = y[0][y[0] != IGNORE_INDEX].tolist()
    assert tok.decode(labels, skip_special_tokens=False) == "reply1<|end|>reply2<|end|>"
    # y is x shifted by one: each label is the token after the input at its place
    at = (y[0] != IGNORE_INDEX).nonzero().flatten()
    assert x[0, at[0] + 1].item() == y[0, at[0]].item()
    xv, yv = next(data.val_batches(1, 1, 0, 1))
    assert tok.decode(yv[0][yv[0] != IGNORE_INDEX].tolist(), skip_special_tokens=False) == "reply1<|end|>reply2<|end|>"


def test_user_template_needs_generation_blocks(tmp_path, tok):
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}"
                    "{% generation %}{{ m.content }}<|end|>{% endgeneration %}{% else %}{{ m.content }}\n"
                    "{% endif %}{% endfor %}")
    ex = chat.encode(tok, chat.ChatTemplate.from_file(good), KNOWN)
    assert labelled_text(tok, ex).strip() == "reply1<|end|>reply2<|end|>"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    with pytest.raises(UserError, match=r"generation"):
        chat.ChatTemplate.from_file(bad)
    src = write_jsonl(tmp_path / "c.jsonl", conversations(4))
    with pytest.raises(UserError, match=r"generation"):
        prepare_chat([src], tmp_path / "o", block_size=64, vocab_size=300, chat_template=bad, progress=False)
    assert not (tmp_path / "o").exists()


# ---- truncation -----------------------------------------------------------------------------

def test_long_conversations_drop_oldest_turns_keep_system_then_keep_reply_head(tok):
    t = chat.ChatTemplate()
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"Say {WORDS[i]}."}, {"role": "assistant", "content": WORDS[i + 4]}]
    full = chat.encode(tok, t, msgs)
    last = chat.encode(tok, t, [msgs[0], *msgs[-2:]])
    ex, why = chat.fit(tok, t, msgs, len(full.ids) - 1)
    assert why is None and ex.ids[0] == tok.token_to_id("<|system|>")
    assert labelled_text(tok, ex) == "".join(f"{w}<|end|>" for w in WORDS[5:8])  # oldest exchange gone
    ex, _ = chat.fit(tok, t, msgs, len(last.ids))
    assert ex.ids == last.ids  # down to the system prompt and the last exchange
    # the last reply alone is too long: its head is kept (no end-of-turn)
    long = [msgs[0], {"role": "user", "content": "go"}, {"role": "assistant", "content": " ".join(WORDS * 3)}]
    prompt = chat.encode(tok, t, long[:2]).ids + [tok.token_to_id("<|assistant|>")]
    ex, _ = chat.fit(tok, t, long, len(prompt) + 5)
    assert len(ex.ids) == len(prompt) + 5 and ex.ids[: len(prompt)] == prompt and sum(ex.labelled) == 5
    assert "<|end|>" not in labelled_text(tok, ex)
    # no room for any reply token: skipped as no_label_fits
    assert chat.fit(tok, t, long, len(prompt)) == (None, "no_label_fits")
    # messages after the last reply are dropped, not counted as prompt
    ex, _ = chat.fit(tok, t, [*KNOWN, {"role": "user", "content": "and?"}], 1000)
    assert ex.ids == chat.encode(tok, t, KNOWN).ids


# ---- bad inputs -----------------------------------------------------------------------------

def test_bad_inputs_are_user_errors_or_counted_skips(tmp_path, capsys):
    good = conversations(6)
    cases = {
        "malformed": ('{"prompt": "a", "response": ', r"bad\.jsonl, line 3 is not valid JSON"),
        "role": ({"messages": [{"role": "human", "content": "hi"}]}, r"line 3: message 0 has role 'human'"),
        "shape": ({"text": "hi"}, r"line 3 is neither"),
        "content": ({"messages": [{"role": "user", "content": 3}]}, r"line 3: message 0 must be"),
    }
    for name, (record, pattern) in cases.items():
        src = write_jsonl(tmp_path / "bad.jsonl", [*good[:2], record, *good[2:]])
        with pytest.raises(UserError, match=pattern):
            prepare_chat([src], tmp_path / name, block_size=64, vocab_size=300, progress=False)
        assert not (tmp_path / name).exists()
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9", "response": "oui"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.jsonl is not valid UTF-8 \(near line 1\)"):
        prepare_chat([latin1], tmp_path / "latin1", block_size=64, vocab_size=300, progress=False)
    assert not (tmp_path / "latin1").exists()
    # empty conversations and ones without a reply are skipped, counted, and reported
    src = write_jsonl(tmp_path / "skips.jsonl", [*good, {"messages": []}, {"messages": [], "x": 1},
                                                 {"messages": [{"role": "user", "content": "hi"}]}])
    rc = main(["prepare", "--chat", "--input", str(src), "--out", str(tmp_path / "ok"), "--vocab-size", "300",
               "--block-size", "64", "--quiet"])
    assert rc == 0
    meta = json.loads((tmp_path / "ok" / "meta.json").read_text())
    assert meta["skipped"] == {"empty": 2, "no_assistant": 1, "no_label_fits": 0} and meta["n_examples"] == 6
    assert "skipped: 2 empty, 1 no assistant, 0 no label fits" in capsys.readouterr().out
    # nothing usable at all: an error that says what was skipped
    src = write_jsonl(tmp_path / "none.jsonl", [{"messages": []}, {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(UserError, match=r"0 usable example.*1 empty, 1 no assistant"):
        prepare_chat([src], tmp_path / "none", block_size=64, vocab_size=300, progress=False)
    assert main(["prepare", "--chat", "--input", str(src), "--out", str(tmp_path / "n"), "--vocab-size", "300"]) == 2
    assert "--block-size" in capsys.readouterr().err


# ---- format -----------------------------------------------------------------------------------

def test_chat_dir_layout_and_format_version_checks(tmp_path, chat_dir):
    meta = json.loads((chat_dir / "meta.json").read_text())
    assert meta["kind"] == "chat" and meta["format_version"] == 2 and meta["pack"] is True
    assert (chat_dir / "chat_template.jinja").read_text() == chat.DEFAULT_TEMPLATE
    offsets = np.fromfile(chat_dir / "train_examples.bin", dtype="<i8")
    assert offsets[0] == 0 and offsets[-1] == meta["n_train_tokens"] and len(offsets) == meta["n_train_examples"] + 1
    with pytest.raises(UserError, match=r"holds chat \(SFT\) examples.*opened as pretraining"):
        TokenData(chat_dir, 8, 0)
    # an old (version 1) or future dir is refused with what, where and how to fix
    for version in (1, 3):
        old = tmp_path / f"v{version}"
        old.mkdir()
        (old / "meta.json").write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(UserError, match=rf"v{version}/meta.json has data format_version {version}.*reads chat data "
                                            r"of version 2.*dsgpt prepare --chat"):
            SFTData(old, 64, 0)
    with pytest.raises(UserError, match=r"prepared for block_size 64.*--block-size 32"):
        SFTData(chat_dir, 32, 0)


def test_pretraining_dirs_are_version_2_and_refused_as_chat(tmp_path):
    (tmp_path / "a.txt").write_text("one document here. " * 50)
    (tmp_path / "b.txt").write_text("another document there. " * 50)
    meta = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "d", vocab_size=300, val_fraction=0.5,
                   progress=False)
    assert meta["format_version"] == 2 and meta["kind"] == "tokens"
    TokenData(tmp_path / "d", 8, 0)
    with pytest.raises(UserError, match=r"holds pretraining token windows.*prepare --chat"):
        SFTData(tmp_path / "d", 8, 0)
    data = json.loads((tmp_path / "d" / "meta.json").read_text())
    v1 = {k: v for k, v in data.items() if k != "kind"}  # format 1 had the same token layout, no kind
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**v1, "format_version": 1}))
    TokenData(tmp_path / "d", 8, 0)
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**data, "format_version": 3}))
    with pytest.raises(UserError, match=r"format_version 3.*Prepare it again"):
        TokenData(tmp_path / "d", 8, 0)


def test_reused_tokenizer_gets_the_markers_appended(tmp_path):
    base = train_bpe([" ".join(WORDS) * 5], 280)
    (tmp_path / "base.json").write_text(base.to_str())
    src = write_jsonl(tmp_path / "c.jsonl", conversations(10))
    meta = prepare_chat([src], tmp_path / "d", block_size=64, tokenizer=tmp_path / "base.json", progress=False)
    grown = load_tokenizer(tmp_path / "d")
    n = base.get_vocab_size(with_added_tokens=True)
    assert added_ids(base, grown, "base", "chat") == list(range(n, n + 4))
    assert [grown.id_to_token(i) for i in range(n, n + 4)] == list(chat.ROLE_MARKERS)
    assert meta["end_of_turn_id"] == n + 3 and meta["vocab_size"] == n + 4


# ---- SFT batches ------------------------------------------------------------------------------

def test_packing_is_first_fit_with_no_example_across_rows(chat_dir):
    data = SFTData(chat_dir, 64, seed=3)
    lengths = data.train.lengths
    flat = sorted(i for row in data.rows for i in row)
    assert flat == list(range(len(lengths)))  # every example once
    assert all(lengths[row].sum() <= 64 for row in data.rows)
    assert max(len(r) for r in data.rows) >= 3 and data.n_rows < len(lengths) / 2
    assert first_fit(lengths, 64, 3) == data.rows and first_fit(lengths, 64, 4) != data.rows
    x, y, pos = data._batch(data.train, data.rows[:4])
    for b, row in enumerate(data.rows[:4]):
        starts = (pos[b] == 0).nonzero().flatten().tolist()
        used = int(lengths[row].sum())
        assert starts[: len(row)] == np.concatenate([[0], np.cumsum(lengths[row])[:-1]]).tolist()
        assert (y[b, used:] == IGNORE_INDEX).all()


def test_sft_batches_depend_only_on_seed_and_step(chat_dir):
    a, b = SFTData(chat_dir, 64, seed=5), SFTData(chat_dir, 64, seed=5)
    same = lambda u, v: all(torch.equal(s, t) for p, q in zip(u, v) for s, t in zip(p, q))  # noqa: E731
    assert same(a.train_micro_batches(7, 0, 1, 4, 1), b.train_micro_batches(7, 0, 1, 4, 1))
    assert not same(a.train_micro_batches(7, 0, 1, 4, 1), a.train_micro_batches(8, 0, 1, 4, 1))
    one = a.train_micro_batches(3, 0, 1, 4, 1)[0]
    two = [torch.cat(t) for t in zip(*a.train_micro_batches(3, 0, 1, 2, 2))]  # micro 2 x GAS 2
    ranks = [torch.cat(t) for t in zip(*(a.train_micro_batches(3, r, 2, 2, 1)[0] for r in range(2)))]
    assert same([one], [two]) and same([one], [ranks])
    # an epoch is a permutation of all rows; the next epoch another one
    G = 4
    seen = np.concatenate([a.global_rows(s, G) for s in range(a.n_rows // G)])
    assert len(set(seen.tolist())) == len(seen)
    assert not np.array_equal(a._perm(0), a._perm(1))
    unpacked = SFTData(chat_dir, 64, seed=5, pack=False)
    assert unpacked.n_rows == len(unpacked.train) and len(unpacked.train_micro_batches(0, 0, 1, 2, 1)[0]) == 2


def test_loader_carries_packed_triples(chat_dir):
    data = SFTData(chat_dir, 64, seed=0)
    with StepLoader(data, 0, 1, 2, 2, first=1, last=2, device="cpu") as loader:
        batch = loader.get(1)
    assert batch.tokens is None and len(batch.micro) == 2 and all(len(m) == 3 for m in batch.micro)
    assert torch.equal(batch.micro[1][2], data.train_micro_batches(0, 0, 1, 2, 2)[1][2])


# ---- the model over packed rows ---------------------------------------------------------------

def test_packed_row_loss_and_grads_equal_per_example_ones(chat_dir):
    """fp32: a row holding 3+ examples gives the summed loss (so the token-weighted mean) and the
    gradients of the examples computed one at a time, each from position 0 with causal attention."""
    data = SFTData(chat_dir, 64, seed=0)
    r = next(i for i, row in enumerate(data.rows) if len(row) >= 3)
    x, y, pos = data._batch(data.train, [data.rows[r]])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return out

    packed, n_packed = model(x, pos=pos, targets=y)
    packed.backward()
    g_packed = grads()
    total, n_total = 0.0, 0
    for i in data.rows[r]:
        xi, yi = (torch.from_numpy(t)[None] for t in data.train.pair(i))
        s, n = model(xi, targets=yi)
        s.backward()
        total, n_total = total + s.item(), n_total + n.item()
    g_single = grads()
    assert n_packed.item() == n_total > 0
    assert packed.item() / n_total == pytest.approx(total / n_total, abs=1e-5)
    assert packed.item() == pytest.approx(total, rel=1e-5)
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_single[name], rtol=1e-5, atol=1e-5)
    # activation checkpointing recomputes each block with the same block-diagonal mask
    ckpt = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                         activation_checkpointing=True))
    ckpt.load_state_dict(model.state_dict())
    assert ckpt.train()(x, pos=pos, targets=y)[0].item() == pytest.approx(packed.item(), rel=1e-6)
    # one example spanning the row: explicit positions give what the is_causal path gives
    with torch.no_grad():
        torch.testing.assert_close(model(x, pos=torch.arange(64)[None]), model(x), rtol=1e-5, atol=1e-5)


def test_train_step_passes_positions_of_packed_rows(chat_dir):
    """dsgpt.train.step.train_step hands a triple's pos to the engine; the step loss is then the
    token-weighted mean over the packed examples of both micro-steps."""
    from dsgpt.data.loader import step_batch
    from dsgpt.train.step import train_step

    data = SFTData(chat_dir, 64, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    seen = []

    class Engine:  # the three calls train_step makes on a DeepSpeed engine
        def __call__(self, x, targets, **kw):
            seen.append(sorted(kw))
            return model(x, targets=targets, **kw)

        def backward(self, loss, scale_wrt_gas):
            loss.backward()

        def step(self):
            pass

    micro = data.train_micro_batches(0, 0, 1, 2, 2)
    res = train_step(Engine(), step_batch(micro), "cpu")
    with torch.no_grad():
        sums = [model(x, pos=p, targets=y) for x, y, p in micro]
    assert seen == [["pos"], ["pos"]]
    assert res.tokens == sum(int(n) for _, n in sums)
    assert res.loss == pytest.approx(sum(s.item() for s, _ in sums) / res.tokens, rel=1e-5)
    seen.clear()  # unpacked rows are (x, y) pairs: no pos, plain causal attention
    train_step(Engine(), step_batch(SFTData(chat_dir, 64, seed=0, pack=False).train_micro_batches(0, 0, 1, 2, 1)), "cpu")
    assert seen == [[]]
