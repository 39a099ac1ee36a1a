"""Hugging Face interop: `dsgpt export` gives a dir that transformers' Auto classes load silently
with the same logits and token ids; train.init_from starts a run from an HF GPT-2 dir (ZeRO 0, 2
and 3) or a dsgpt run with exactly their weights, grows the token table for a tokenizer that extends
the source's, and refuses any other tokenizer naming both vocab hashes."""

from __future__ import annotations

import logging
import pickle
import sysconfig
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from conftest import losses, run_jobs, tiny_overrides
from dsgpt import cli, runs
from dsgpt.config import load_config
from dsgpt.data.dataset import TokenData
from dsgpt.data.prepare import prepare
from dsgpt.data.tokenizer import EOS_TOKEN, added_ids, load_tokenizer, vocab_hash
from dsgpt.errors import UserError
from dsgpt.hf import from_hf_state_dict, load_hf_dir
from dsgpt.train.init_from import grow_token_table

NEW_TOKENS = ["<|user|>", "<|assistant|>", "<|sep|>"]
TINY = dict(n_layer=2, n_head=2, n_embd=64, n_positions=32)  # tiny_overrides' model
LR = ("optim.lr=1e-9", "optim.min_lr=0")  # steps that leave the loaded weights as they were, to ~1e-9


def hf_model(vocab: int, eos: int, seed: int):
    """A random GPT2LMHeadModel far from any fresh dsgpt init: biases and LayerNorms moved off 0/1
    and a 4x token table, so a weight that was not loaded shows in the loss."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.transformer.wte.weight.mul_(4)
    return model.eval()


def save_hf_dir(path: Path, model, tokenizer_file: Path) -> Path:
    from transformers import PreTrainedTokenizerFast
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                            pad_token=EOS_TOKEN).save_pretrained(path)
    return path


def prepare_docs(out: Path, work: Path, **kw) -> Path:
    """Another small corpus (with the chat tokens in it) for data with another tokenizer."""
    src = work / "docs"
    src.mkdir(exist_ok=True)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    for i in range(12):
        chunk = text[i * len(text) // 12:(i + 1) * len(text) // 12]
        (src / f"doc{i}.txt").write_text(f"<|user|> {chunk[:200]} <|assistant|> {chunk} <|sep|>")
    prepare([str(src)], out, val_fraction=0.2, seed=1, progress=False, **kw)
    return out


def step_losses(model, run_dir: Path, data_dir: Path, world: int, steps: int) -> list[float]:
    """What a run's logged loss at steps 1..`steps` is when its weights are `model`'s: the mean
    token loss over the global batch of each step (all ranks' slices)."""
    cfg = load_config(str(run_dir / "config.yaml"))
    data = TokenData(data_dir, block_size=cfg.model.block_size, seed=cfg.run.seed)
    out = []
    for step in range(steps):
        pairs = [p for r in range(world)
                 for p in data.train_micro_batches(step, r, world, cfg.train.micro_batch_size, cfg.train.grad_accum_steps)]
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        with torch.no_grad():
            logits = model(x).logits
        out.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    return out


def max_weight_diff(run_dir: Path, hf) -> float:
    """Largest |dsgpt - HF| over every weight of the run's latest checkpoint (consolidated from
    whatever ZeRO stage wrote it), read in HF's layout by hand rather than through dsgpt.hf."""
    model, _, _ = runs.load_model(run_dir)
    worst = 0.0
    for name, p in hf.named_parameters():
        mine = model.get_parameter(name)
        if p.dim() == 2 and ".h." in name:  # Conv1D: (in, out)
            p = p.t()
        worst = max(worst, (mine - p).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def interop(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("interop")
    out = work / "runs"
    tok = load_tokenizer(corpus)
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS_TOKEN)
    padded = -(-vocab // 64) * 64
    # The same rows as the dsgpt model a run builds, so the whole softmax (and the loss) matches.
    hf = hf_model(padded, eos, seed=3)
    hf_dir = save_hf_dir(work / "hf", hf, corpus / "tokenizer.json")
    # 64 spare rows past its tokenizer: the new tokens below land in them.
    hf_wide = hf_model(padded + 64, eos, seed=4)
    hf_wide_dir = save_hf_dir(work / "hf-wide", hf_wide, corpus / "tokenizer.json")
    ext_tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    ext_tok.add_tokens(NEW_TOKENS)
    ext_tok.save(str(work / "ext-tokenizer.json"))
    ext = prepare_docs(work / "ext", work, tokenizer=str(work / "ext-tokenizer.json"))
    other = prepare_docs(work / "other", work, vocab_size=300)

    def job(name, data, *extra):
        return {"name": name, "overrides": tiny_overrides(data, out, name, *extra)}

    two = run_jobs([
        # A ZeRO-3 source on 2 ranks: its checkpoint needs consolidating to be read.
        job("src", corpus, "deepspeed.zero_stage=3", "train.max_steps=4"),
        job("hf_z3", corpus, f"train.init_from={hf_dir}", "deepspeed.zero_stage=3", "train.max_steps=2", *LR),
    ], ranks=2, work=work / "two")
    one = run_jobs([
        job("hf_z0", corpus, f"train.init_from={hf_dir}", "train.max_steps=2", *LR),
        job("hf_z2", corpus, f"train.init_from={hf_dir}", "deepspeed.zero_stage=2", "train.max_steps=2", *LR),
        job("ext_hf", ext, f"train.init_from={hf_wide_dir}", "train.max_steps=1", *LR),
        job("ext_run", ext, f"train.init_from={out / 'src'}", "train.max_steps=1", *LR),
        job("other_tok", other, f"train.init_from={hf_dir}"),
        job("shape", corpus, f"train.init_from={hf_dir}", "model.n_embd=32"),
    ], ranks=1, work=work / "one")
    return SimpleNamespace(out=out, work=work, corpus=corpus, ext=ext, other=other, hf=hf, hf_dir=hf_dir,
                           hf_wide=hf_wide, padded=padded, vocab=vocab, eos=eos, results={**two, **one})


# ---- train.init_from from an HF dir ----------------------------------------------------------------


@pytest.mark.parametrize("name, world, stage", [("hf_z0", 1, 0), ("hf_z2", 1, 2), ("hf_z3", 2, 3)])
def test_init_from_hf_dir_starts_from_its_weights(interop, name, world, stage):
    summary = interop.results[name][0]
    assert "error" not in summary, summary
    assert (summary["engine"]["zero_stage"], summary["engine"]["world_size"]) == (stage, world)
    assert summary["engine"]["backward_allreduce"] == (world > 1 or stage > 0)  # one ZeRO-0 rank has nothing to reduce
    run_dir = interop.out / name
    expected = step_losses(interop.hf, run_dir, interop.corpus, world, steps=2)
    # Step 1's loss is the forward before any update: the HF model's loss on that batch. Step 2's
    # is too (the lr is ~0), which holds only if the optimizer's fp32 master copies were refreshed.
    assert losses(summary) == pytest.approx(expected, abs=1e-5)
    # Every weight, gathered from the (sharded) checkpoint, is the HF model's.
    assert max_weight_diff(run_dir, interop.hf) <= 1e-6


def expected_table(src: torch.Tensor, vocab: int) -> torch.Tensor:
    """The token table a run with the extended tokenizer starts from: the source's rows, except that
    the new ids and rows the source lacks hold the mean of its `vocab` token rows."""
    rows = -(-(vocab + len(NEW_TOKENS)) // 64) * 64
    mean = src[:vocab].mean(dim=0)
    new = range(vocab, vocab + len(NEW_TOKENS))
    return torch.stack([mean if i in new or i >= src.shape[0] else src[i] for i in range(rows)])


def test_init_from_grows_the_token_table_for_an_extending_tokenizer(interop):
    """The HF source has spare rows past its tokenizer, so the new ids land in them: they start
    from the mean embedding, not from those rows."""
    assert "error" not in interop.results["ext_hf"][0], interop.results["ext_hf"][0]
    model, _, _ = runs.load_model(interop.out / "ext_hf")
    src = interop.hf_wide.transformer.wte.weight
    expected = expected_table(src, interop.vocab)
    assert model.transformer.wte.weight.shape == expected.shape
    assert torch.allclose(model.transformer.wte.weight, expected, atol=1e-6)
    new = slice(interop.vocab, interop.vocab + len(NEW_TOKENS))
    assert not torch.allclose(src[new], expected[new], atol=1e-3)  # the spare rows were not kept


def test_init_from_a_zero3_run_with_an_extending_tokenizer(interop):
    summary = interop.results["ext_run"][0]
    assert "error" not in summary, summary
    source, _, _ = runs.load_model(interop.out / "src")
    model, _, _ = runs.load_model(interop.out / "ext_run")
    expected = expected_table(source.transformer.wte.weight, interop.vocab)
    assert model.transformer.wte.weight.shape == expected.shape
    assert torch.allclose(model.transformer.wte.weight, expected, atol=1e-6)
    for name, p in source.named_parameters():
        if name != "transformer.wte.weight":
            assert torch.allclose(model.get_parameter(name), p, atol=1e-6), name


def test_init_from_refuses_a_tokenizer_that_does_not_extend_the_source(interop):
    error = interop.results["other_tok"][0].get("error", "")
    assert vocab_hash(load_tokenizer(interop.hf_dir)) in error
    assert vocab_hash(load_tokenizer(interop.other)) in error
    assert "train.init_from" in error and "dsgpt prepare --tokenizer" in error
    assert not (interop.out / "other_tok" / "checkpoints").exists()


def test_init_from_refuses_another_model_shape(interop):
    error = interop.results["shape"][0].get("error", "")
    assert "holds a model of shape" in error and "model.n_embd" in error
    assert not (interop.out / "shape" / "checkpoints").exists()


# ---- export -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(interop):
    """Each run exported through the CLI: ZeRO-3 source, and ZeRO-0 with an extended tokenizer."""
    dirs = {}
    for name in ("src", "ext_run"):
        dirs[name] = interop.work / "export" / name
        assert cli.main(["export", "--run", str(interop.out / name), "--hf", str(dirs[name])]) == 0
    return dirs


def load_quietly(path: Path):
    """(model, tokenizer, loading info, every warning and transformers log record of WARNING+)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(keep)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(path)
    finally:
        hf_logger.removeHandler(keep)
    return model.eval(), tokenizer, info, keep.messages + [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ["src", "ext_run"])
def test_export_loads_silently_with_the_same_logits(interop, exported, name):
    hf, tokenizer, info, noise = load_quietly(exported[name])
    assert noise == []
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in exported[name].iterdir())  # readable by all
    assert all(not v for v in info.values()), info  # no missing, unexpected or mismatched keys
    model, _, _ = runs.load_model(interop.out / name)
    assert hf.config.vocab_size == model.config.vocab_size  # the padded size
    assert hf.config.n_positions == model.config.block_size
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (interop.eos,) * 3
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (interop.eos,) * 3
    x = torch.randint(0, len(tokenizer), (3, model.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["src", "ext_run"])
def test_exported_tokenizer_gives_dsgpt_ids(interop, exported, name):
    _, tokenizer, _, _ = load_quietly(exported[name])
    _, cfg, _ = runs.load_model(interop.out / name)
    ours = runs.load_tokenizer_for(cfg)
    texts = ["def f(x):\n    return x  # naïve ☃", f"one{EOS_TOKEN}two", "<|user|> hi <|assistant|> yes <|sep|>"]
    for text in texts:
        ids = ours.encode(text).ids
        assert tokenizer(text)["input_ids"] == ids
        assert tokenizer.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    assert len(tokenizer) == ours.get_vocab_size()


def test_export_refuses_bad_targets_and_runs(interop, exported, tmp_path, capsys):
    def export(*args) -> str:
        assert cli.main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        return err

    src = str(interop.out / "src")
    assert "does not exist" in export("--run", str(tmp_path / "nope"), "--hf", str(tmp_path / "a"))
    bare = tmp_path / "bare"  # a run dir whose training never saved
    bare.mkdir()
    (bare / "config.yaml").write_text((interop.out / "src" / "config.yaml").read_text())
    assert "no 'latest' checkpoint" in export("--run", str(bare), "--hf", str(tmp_path / "b"))
    assert "'step9999999' checkpoint" in export("--run", src, "--checkpoint", "step9999999", "--hf", str(tmp_path / "c"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert "--overwrite" in export("--run", src, "--hf", str(busy))
    assert "refusing" in export("--run", src, "--hf", str(busy), "--overwrite")
    assert (busy / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*tmp*"))  # no temp dir left beside the targets
    # An earlier export is replaced with --overwrite only.
    again = exported["src"]
    assert "--overwrite" in export("--run", src, "--hf", str(again))
    assert cli.main(["export", "--run", src, "--hf", str(again), "--overwrite"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in again.iterdir()}


# ---- the pieces, without DeepSpeed --------------------------------------------------------------------


def test_tokenizer_rule(corpus):
    base = load_tokenizer(corpus)
    assert added_ids(base, load_tokenizer(corpus), "a", "b") == []
    grown = Tokenizer.from_str(base.to_str())
    grown.add_tokens(NEW_TOKENS)
    assert added_ids(base, grown, "a", "b") == list(range(base.get_vocab_size(), base.get_vocab_size() + 3))
    with pytest.raises(UserError) as e:
        added_ids(grown, base, "the source", "the data")  # the other way round: tokens missing
    assert vocab_hash(grown) in str(e.value) and vocab_hash(base) in str(e.value) and "missing" in str(e.value)
    assert vocab_hash(grown) != vocab_hash(base)


def test_grow_token_table():
    table = torch.randn(8, 4)
    out = grow_token_table(table, rows=16, source_ids=list(range(6)), new_ids=[6, 7, 8])
    mean = table[:6].mean(dim=0)
    assert torch.equal(out[:6], table[:6])
    assert torch.allclose(out[6:], mean.expand(10, -1))  # new ids, then rows the source never had
    assert torch.equal(grow_token_table(table, 6, list(range(6)), []), table[:6])  # spare rows dropped


def test_hf_dir_from_pytorch_bin_is_read_without_running_code(interop, tmp_path):
    import shutil
    plain = tmp_path / "bin"
    shutil.copytree(interop.hf_dir, plain)
    (plain / "model.safetensors").unlink()
    torch.save(interop.hf.state_dict(), plain / "pytorch_model.bin")
    expected = load_hf_dir(interop.hf_dir).state_dict()
    got = load_hf_dir(plain).state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (plain / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(UserError, match="plain tensors"):
        load_hf_dir(plain).state_dict()
    assert not marker.exists()


def test_hf_dir_refusals(interop, tmp_path):
    import json
    import shutil

    def variant(name, **changes) -> Path:
        path = tmp_path / name
        shutil.copytree(interop.hf_dir, path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **changes}))
        return path

    with pytest.raises(UserError, match="'llama' model"):
        load_hf_dir(variant("llama", model_type="llama"))
    with pytest.raises(UserError, match="activation_function = 'gelu'"):
        load_hf_dir(variant("gelu", activation_function="gelu"))
    empty = variant("empty")
    (empty / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        load_hf_dir(empty)
    untied = {k: v.clone() for k, v in interop.hf.state_dict().items()}
    untied["lm_head.weight"] = untied["lm_head.weight"] + 1
    with pytest.raises(UserError, match="untied"):
        from_hf_state_dict(untied)
