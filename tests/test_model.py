"""Tests for dsgpt/model.py and dsgpt/hf.py: HF parity, presets, FLOPs, loss, checkpointing, groups."""

import copy
import functools
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsgpt.model as model_mod
from dsgpt.errors import UserError
from dsgpt.hf import hf_config, to_hf_model, to_hf_state_dict
from dsgpt.model import GPT, PRESETS, GPTConfig, flops_per_token, param_groups, summed_cross_entropy, token_loss_sum

VOCAB, BLOCK = 97, 32
BOS, EOS = 1, 2
# A non-default epsilon, so a conversion that forgot to carry it over would break parity.
PARITY_CFG = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64, layer_norm_epsilon=1e-3)


def small_cfg(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=32), **kw})


def tokens(seed: int, batch: int = 3, T: int = BLOCK) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def scaled_model(cfg: GPTConfig) -> GPT:
    """MLP weights blown up 5-20x: pre-GELU values leave the near-linear region around 0, where
    the tanh and erf GELUs agree, and the MLP's output is amplified; the token table 5x.
    Attention and LayerNorm are left alone on purpose: scaled, they give attention logits in the
    thousands, where fp32 rounding alone moves the output by ~1e-5 and parity turns flaky."""
    torch.manual_seed(0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.mul_(5 + 15 * torch.rand((), generator=g))
        model.transformer.wte.weight.mul_(5)
    return model


def trained_model(cfg: GPTConfig) -> GPT:
    """A few AdamW steps on random tokens: LayerNorm gains/biases and all biases move off 1/0."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for step in range(20):
        x = tokens(100 + step, batch=4)
        loss_sum, n = token_loss_sum(model(x)[:, :-1], x[:, 1:])
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    return model


@functools.cache
def converted(recipe: str):
    """(dsgpt model, its HF conversion), built once per recipe for the whole module."""
    model = {"scaled": scaled_model, "trained": trained_model}[recipe](PARITY_CFG).eval()
    return model, to_hf_model(model, BOS, EOS)


def max_logit_diff(model: GPT, hf, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x) - hf(x).logits).abs().max().item()


# ---------------------------------------------------------------- Hugging Face parity


@pytest.mark.parametrize("recipe", ["scaled", "trained"])
def test_hf_parity_logits_and_loss(recipe):
    model, hf = converted(recipe)
    assert not hf.training and hf.dtype == torch.float32
    x = tokens(3)
    labels = x.clone()
    labels[0, :10] = -100  # a masked prompt, as in SFT
    with torch.no_grad():
        logits = model(x)
        out = hf(x, labels=labels)
    assert (logits - out.logits).abs().max().item() <= 1e-5
    # HF shifts labels inside; ours are aligned with the logits by the caller.
    loss_sum, n = token_loss_sum(logits[:, :-1], labels[:, 1:])
    assert n.item() == (labels[:, 1:] != -100).sum().item()
    assert (loss_sum / n).item() == pytest.approx(out.loss.item(), abs=1e-5)


def test_hf_parity_detects_wrong_gelu():
    """The parity test is not vacuous: exact (erf) GELU instead of GPT-2's tanh version fails it.
    Shown on the scaled model: trained weights stay small, where the two GELUs nearly agree."""
    model, hf = converted("scaled")
    wrong = copy.deepcopy(model)
    for block in wrong.transformer.h:
        block.mlp.gelu = nn.GELU()  # approximate="none"
    assert max_logit_diff(wrong, hf, tokens(3)) > 10 * 1e-5  # 10x the parity tolerance


@pytest.mark.parametrize("recipe", ["scaled", "trained"])
def test_hf_parity_detects_wrong_layer_norm_epsilon(recipe):
    model, hf = converted(recipe)
    assert hf.config.layer_norm_epsilon == PARITY_CFG.layer_norm_epsilon
    wrong = copy.deepcopy(hf)
    for m in wrong.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-5
    assert max_logit_diff(model, wrong, tokens(3)) > 10 * 1e-5


def test_hf_config_fields():
    c = hf_config(PARITY_CFG, bos_token_id=BOS, eos_token_id=EOS)
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (VOCAB, BLOCK, 64, 2, 4)
    assert (c.bos_token_id, c.eos_token_id) == (BOS, EOS)  # not GPT2Config's 50256
    assert c.activation_function == "gelu_new" and c.tie_word_embeddings


def test_hf_state_dict_strips_wrapper_prefixes_and_transposes():
    model = GPT(small_cfg())
    plain = to_hf_state_dict(model.state_dict())
    wrapped = to_hf_state_dict({"module._orig_mod." + k: v for k, v in model.state_dict().items()})
    assert plain.keys() == wrapped.keys()
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain)
    w = model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(plain["transformer.h.0.attn.c_attn.weight"], w.t())  # HF Conv1D: (in, out)
    assert torch.equal(plain["lm_head.weight"], plain["transformer.wte.weight"])


def test_hf_export_without_bias_and_save_load_roundtrip(tmp_path):
    """bias=False converts with zero biases; the saved dir reloads with tied weights and our ids."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(small_cfg(bias=False)).eval()
    hf = to_hf_model(model, BOS, EOS)
    x = tokens(4)
    assert max_logit_diff(model, hf, x) <= 1e-5
    hf.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (BOS, EOS)
    assert max_logit_diff(model, loaded, x) <= 1e-5


# ---------------------------------------------------------------- config and presets


def test_gpt2_124m_param_count():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2-124m", vocab_size=50257))
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, tied embeddings
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_flops_n_matches_model(name):
    cfg = GPTConfig.from_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size
    assert flops_per_token(cfg) == 6 * model.num_params(non_embedding=True) + attention


def test_preset_overrides():
    cfg = GPTConfig.from_preset("tiny", vocab_size=500, dropout=0.1)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 256)
    assert (cfg.vocab_size, cfg.dropout) == (500, 0.1)


def test_unknown_preset_names_valid_ones():
    with pytest.raises(UserError) as e:
        GPTConfig.from_preset("gpt3")
    assert "gpt3" in str(e.value)
    assert all(name in str(e.value) for name in PRESETS)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
    ],
)
def test_bad_config_raises_user_error(kw, field):
    with pytest.raises(UserError, match=field):
        small_cfg(**kw)


# ---------------------------------------------------------------- FLOPs


def test_flops_per_token_hand_count():
    cfg = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=4)
    E = 4
    block = (
        2 * (E + E)  # ln_1, ln_2: weight + bias
        + (E * 3 * E + 3 * E)  # c_attn
        + (E * E + E)  # attn.c_proj
        + (E * 4 * E + 4 * E)  # c_fc
        + (4 * E * E + E)  # mlp.c_proj
    )
    N = 10 * E + block + (E + E)  # wte (also the output layer) + 1 block + ln_f; wpe excluded
    assert N == 292
    assert flops_per_token(cfg) == 6 * N + 12 * 1 * 2 * 2 * 4


def test_flops_6n_matches_real_model():
    for cfg in (small_cfg(), small_cfg(bias=False)):
        model = GPT(cfg)
        n = model.num_params(non_embedding=True)
        assert n == sum(p.numel() for p in model.parameters()) - cfg.block_size * cfg.n_embd
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size
        assert flops_per_token(cfg) - attention == 6 * n


# ---------------------------------------------------------------- model behaviour


def test_init_follows_gpt2():
    cfg = small_cfg(n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    h = model.transformer.h[0]
    assert h.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert h.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.05)
    assert h.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.1)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)


def test_token_loss_sum_ignores_masked_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = -100
    labels[1, 4] = -100
    loss_sum, n = token_loss_sum(logits, labels)
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert n.item() == 7 and torch.is_tensor(n)
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    # Summed in fp32 even when the logits are bf16.
    assert token_loss_sum(logits.bfloat16(), labels)[0].dtype == torch.float32


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summed_cross_entropy_equals_torch(dtype, overwrite):
    """The loss's own cross entropy: F.cross_entropy's value and gradient (fp32: 1e-5), masked
    rows counting nothing, from logits of any leading shape; it touches the caller's logits only
    when told it may."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    keep = labels != -100
    ref_in = logits.clone().requires_grad_()
    expected = F.cross_entropy(ref_in.float()[keep], labels[keep], reduction="sum")
    expected.backward()
    ours_in = logits.clone().requires_grad_()
    work = ours_in * 1  # a non-leaf, as the model's logits are (their storage may be reused)
    got = summed_cross_entropy(work, labels, overwrite=overwrite)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    if not overwrite:
        assert torch.equal(work, logits)
    got.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)
    assert torch.all(ours_in.grad[~keep] == 0)
    assert ours_in.grad.dtype == dtype


def test_summed_cross_entropy_second_backward_fails_loudly():
    """Backward scales the saved gradient in place: going through it twice must raise, not
    silently return a gradient scaled twice."""
    logits = torch.randn(4, 6, requires_grad=True)
    loss = summed_cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_summed_cross_entropy_without_grad_keeps_logits():
    """Evaluation (no backward): the loss only, and the logits left as they were."""
    logits = torch.randn(4, 6)
    with torch.no_grad():
        loss = summed_cross_entropy(logits.clone(), torch.tensor([0, -100, 2, 3]))
    expected = F.cross_entropy(logits[[0, 2, 3]], torch.tensor([0, 2, 3]), reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_activation_checkpointing_same_loss_and_grads(monkeypatch):
    cfg = small_cfg(dropout=0.1)  # dropout too: checkpoint must replay the same masks
    torch.manual_seed(0)
    plain = GPT(cfg).train()
    ckpt = copy.deepcopy(plain)
    ckpt.config = dataclasses.replace(cfg, activation_checkpointing=True)

    calls = []
    real_checkpoint = model_mod.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(model_mod, "checkpoint", counting_checkpoint)
    x = tokens(5)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        loss_sum, n = token_loss_sum(model(x)[:, :-1], x[:, 1:])
        (loss_sum / n).backward()
        results.append((loss_sum.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    assert calls == [False] * cfg.n_layer  # only the checkpointed model, once per block, non-reentrant
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-6, atol=1e-6, msg=k)

    # In eval mode checkpointing is off: nothing to save memory for without a backward.
    ckpt.eval()
    with torch.no_grad():
        ckpt(x)
    assert len(calls) == cfg.n_layer


def _chunked_pair(chunk: int):
    """A model, its copy that takes the loss in chunks, tokens and their labels (5 masked)."""
    cfg = small_cfg()
    torch.manual_seed(0)
    whole = GPT(cfg).train()
    chunked = copy.deepcopy(whole)
    chunked.config = dataclasses.replace(cfg, loss_chunk_tokens=chunk)
    x = tokens(3)
    y = torch.roll(x, -1, dims=1)
    y[0, :5] = -100  # masked labels count as nothing, in any chunk
    return whole, chunked, x, y


@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_loss_same_loss_and_grads(chunk):
    """The training loss through `targets`, whole or in chunks (uneven; one larger than the batch),
    equals token_loss_sum on the full logits, gradients too (fp32, 1e-5)."""
    whole, chunked, x, y = _chunked_pair(chunk)
    results = []
    for model, call in ((whole, lambda m: token_loss_sum(m(x), y)), (whole, lambda m: m(x, targets=y)),
                        (chunked, lambda m: m(x, targets=y))):
        model.zero_grad(set_to_none=True)
        loss_sum, n = call(model)
        (loss_sum / n).backward()
        results.append((loss_sum.item(), n.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (loss_a, n_a, grads_a) = results[0]
    for loss_b, n_b, grads_b in results[1:]:
        assert n_b == n_a == y.numel() - 5
        assert loss_b == pytest.approx(loss_a, rel=1e-6)
        for k in grads_a:
            torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_chunked_loss_makes_its_gradients_in_forward():
    """Each chunk's logits are multiplied once and its two gradients made right away: three
    vocabulary-wide matmuls per chunk in forward, none in backward (recomputing the logits there
    would be a fourth); without a backward to come, only the logits' one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class VocabMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_) and any(
                    isinstance(a, torch.Tensor) and VOCAB in a.shape for a in args):
                self.count += 1
            return func(*args, **(kwargs or {}))

    _, chunked, x, y = _chunked_pair(chunk=40)  # 96 tokens: chunks of 40, 40 and 16
    forward, backward = VocabMatmuls(), VocabMatmuls()
    with forward:
        loss_sum, n = chunked(x, targets=y)
    with backward:
        (loss_sum / n).backward()
    assert (forward.count, backward.count) == (3 * 3, 0)
    with torch.no_grad(), VocabMatmuls() as inference:
        assert chunked(x, targets=y)[0].item() == pytest.approx(loss_sum.item(), rel=1e-6)
    assert inference.count == 3


# DeepSpeed's fp16 starts at a loss scale of 2**16 (initial_scale_power) and lowers it on overflow.
FP16_LOSS_SCALE = 2.0 ** 16


def _half_precision_grads(model, x, y, dtype, scale=1.0):
    """The loss and the unscaled gradients of one backward of (loss / tokens) * scale, with the
    weights in `dtype`; fp32 weights run under bf16 autocast."""
    model = model.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
        loss_sum, n = model(x, targets=y)
    ((loss_sum / n) * scale).backward()
    return loss_sum.item(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("weights", ["fp32 under bf16 autocast", "bf16", "fp16, loss scaled"])
def test_chunked_loss_in_half_precision_agrees_with_the_whole(weights):
    """In bf16 and fp16 the chunks' matmuls run in that dtype as the whole loss's do; the weight's
    gradient sums the chunks in fp32, so the two agree to the dtype's rounding, and gradients keep
    the weights' dtype. In fp16 the chunks make their gradients unscaled in forward (the whole loss
    scales before casting): at DeepSpeed's first loss scale they still agree, nothing under- or
    overflows."""
    dtype = {"bf16": torch.bfloat16, "fp16, loss scaled": torch.float16}.get(weights, torch.float32)
    scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
    whole, chunked, x, y = _chunked_pair(chunk=40)
    (loss_a, grads_a), (loss_b, grads_b) = (_half_precision_grads(m, x, y, dtype, scale) for m in (whole, chunked))
    assert loss_b == pytest.approx(loss_a, rel=1e-3)
    for k in grads_a:
        assert grads_b[k].dtype == dtype, k
        assert torch.isfinite(grads_b[k]).all(), k
        a, b = grads_a[k].float() / scale, grads_b[k].float() / scale
        torch.testing.assert_close(b, a, rtol=0, atol=2e-2 * a.abs().max().item(), msg=k)


def test_chunked_loss_in_fp16_overflows_at_the_same_loss_scale():
    """Dynamic loss scaling halves the scale until the gradients are finite: chunks must not settle
    on a lower scale (so fewer significant bits in the small gradients) than the whole loss."""
    def first_overflowing_power(model):
        for power in range(12, 32):
            grads = _half_precision_grads(copy.deepcopy(model), x, y, torch.float16, 2.0 ** power)[1]
            if not all(torch.isfinite(g).all() for g in grads.values()):
                return power
        raise AssertionError("no loss scale up to 2**31 overflowed")

    whole, chunked, x, y = _chunked_pair(chunk=40)
    assert first_overflowing_power(chunked) == first_overflowing_power(whole)


def test_dropout_eval_deterministic_train_random():
    torch.manual_seed(0)
    model = GPT(small_cfg(dropout=0.2))
    x = tokens(6)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_param_groups_partition_parameters():
    model = GPT(small_cfg())
    groups = param_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied wte/lm_head once
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name, p in model.named_parameters():
        is_bias_or_ln = name.endswith(".bias") or ".ln_" in name
        assert (id(p) in no_decay_ids) == is_bias_or_ln, name
    assert id(model.transformer.wte.weight) in {id(p) for p in decay["params"]}
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


def test_sequence_longer_than_block_size_raises():
    model = GPT(small_cfg())
    with pytest.raises(UserError, match="block_size"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))
