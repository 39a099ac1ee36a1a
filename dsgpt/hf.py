"""Conversion of a dsgpt GPT to Hugging Face's GPT2LMHeadModel.

dsgpt uses HF's parameter names, so the only real work is layout: HF's GPT-2 keeps its projections
as Conv1D with (in, out) weights where nn.Linear has (out, in). transformers is imported inside the
functions so that ``import dsgpt.hf`` stays cheap for code that never exports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsgpt.model import GPT, GPTConfig

if TYPE_CHECKING:
    import transformers

# Wrappers that prefix parameter names: DeepSpeed's engine and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Linear layers that HF stores as Conv1D.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(cfg: GPTConfig, bos_token_id: int, eos_token_id: int) -> transformers.GPT2Config:
    """The GPT2Config describing ``cfg``. bos/eos must be the tokenizer's: GPT2Config's defaults
    (50256) belong to OpenAI's tokenizer, not ours."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_ctx=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu_new",  # tanh approximation, what dsgpt's MLP computes
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:  # DeepSpeed around torch.compile gives "module._orig_mod."
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def to_hf_state_dict(state_dict: dict) -> dict:
    """dsgpt state dict -> GPT2LMHeadModel state dict (same names, Conv1D weights transposed).

    Strips DeepSpeed's ``module.`` and torch.compile's ``_orig_mod.`` prefixes, fills in
    ``lm_head.weight`` from the tied token table if absent, and gives zero biases to a model
    trained with ``bias=False`` (HF's GPT-2 always has biases; zeros compute the same thing).
    """
    out = {}
    for key, value in state_dict.items():
        key = _strip_wrappers(key)
        if key.endswith(_CONV1D) and value.dim() == 2:
            value = value.t()
        out[key] = value.contiguous()
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]

    for key in list(out):
        if not key.endswith(".weight") or key.startswith(("transformer.wte", "transformer.wpe", "lm_head")):
            continue
        bias_key = key[: -len("weight")] + "bias"
        if bias_key not in out:
            w = out[key]
            # Conv1D weight is (in, out) after the transpose; LayerNorm weight is (n,).
            out[bias_key] = torch.zeros(w.shape[-1], dtype=w.dtype, device=w.device)
    return out


def to_hf_model(model: GPT, bos_token_id: int, eos_token_id: int) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel (fp32, eval mode, on CPU) computing the same logits as ``model``.

    Loads strictly: any key one side has and the other lacks is an error, so a renamed or missing
    parameter cannot pass silently. ``model`` itself is not modified.
    """
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_config(model.config, bos_token_id, eos_token_id))
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in to_hf_state_dict(model.state_dict()).items()}

    # transformers 5.x GPT-2 has no buffers; older versions kept a causal-mask "attn.bias" buffer,
    # persistent in some of them. Buffers are HF's own constants, not weights: keep HF's values.
    expected = hf.state_dict()
    buffers = {name for name, _ in hf.named_buffers()}
    for key in expected.keys() - sd.keys():
        if key in buffers:
            sd[key] = expected[key]

    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise RuntimeError(
            f"dsgpt -> HF GPT-2 conversion does not line up: missing in dsgpt's state dict {missing}, "
            f"unknown to HF {unexpected}. The model's parameter names must mirror GPT2LMHeadModel's."
        )
    hf.load_state_dict(sd, strict=True)
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("HF model's lm_head is not tied to transformer.wte after loading.")
    return hf.float().eval()
