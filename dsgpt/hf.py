"""Hugging Face interop: dsgpt GPT <-> GPT2LMHeadModel, `export` of a run to an HF model dir, and
reading a local HF GPT-2 dir (config, tokenizer, weights) for train.init_from.

dsgpt uses HF's parameter names, so the only real work is layout: HF's GPT-2 keeps its projections
as Conv1D with (in, out) weights where nn.Linear has (out, in). transformers is imported inside the
functions so that ``import dsgpt.hf`` stays cheap for code that never exports.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsgpt.errors import UserError
from dsgpt.model import GPT, GPTConfig

if TYPE_CHECKING:
    import transformers
    from tokenizers import Tokenizer

# Wrappers that prefix parameter names: DeepSpeed's engine and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Linear layers that HF stores as Conv1D.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# --overwrite replaces only an HF model dir, recognised by its config.json.
_EXPORT_DIR = dict(marker="config.json", kind="a Hugging Face model dir", flag="--hf DIR")


def hf_config(cfg: GPTConfig, bos_token_id: int, eos_token_id: int,
              pad_token_id: int | None = None) -> transformers.GPT2Config:
    """The GPT2Config describing ``cfg``. bos/eos/pad must be the tokenizer's: GPT2Config's defaults
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
        pad_token_id=pad_token_id,
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


def to_hf_model(model: GPT, bos_token_id: int, eos_token_id: int,
                pad_token_id: int | None = None) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel (fp32, eval mode, on CPU) computing the same logits as ``model``.

    Loads strictly: any key one side has and the other lacks is an error, so a renamed or missing
    parameter cannot pass silently. ``model`` itself is not modified.
    """
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_config(model.config, bos_token_id, eos_token_id, pad_token_id))
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


# ---- export: a run's checkpoint -> a directory that transformers' Auto classes load ------------


@dataclass
class Exported:
    dir: Path
    tag: str  # the checkpoint that was exported


def export(run_dir, out_dir, which: str = "latest", overwrite: bool = False) -> Exported:
    """Write checkpoint `which` (latest, best or a tag) of `run_dir` as a Hugging Face model dir:
    model.safetensors, config.json, generation_config.json and the run's tokenizer.

    Everything is written into a temp dir beside `out_dir` and renamed into place, so `out_dir`
    holds a complete export or what it held before. A non-empty `out_dir` is replaced only with
    `overwrite`, and only when it is an HF model dir itself (has config.json)."""
    from dsgpt import runs
    from dsgpt.io import check_output_dir, move_into_place, temp_dir_beside
    out_dir = Path(out_dir).expanduser()
    check_output_dir(out_dir, overwrite, **_EXPORT_DIR)
    model, cfg, tag = runs.load_model(run_dir, which)
    tok, eos = runs.run_tokenizer(run_dir, cfg, tag, model.config.vocab_size)
    chat = _chat_spec(runs.tokenizer_dir(cfg))
    # A chat model's replies end with its end-of-turn token: that is the EOS `generate` stops at.
    end = chat.end_of_turn_id if chat and chat.end_of_turn_id is not None else eos
    hf = to_hf_model(model, bos_token_id=eos, eos_token_id=end, pad_token_id=eos)
    if end != eos:
        hf.generation_config.eos_token_id = [end, eos]
    tmp = temp_dir_beside(out_dir)
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer(tok, tok.id_to_token(eos), model.config.block_size, eos_token=tok.id_to_token(end),
                     chat_template=chat.template.source if chat else None).save_pretrained(tmp)
        for file in tmp.iterdir():
            file.chmod(0o644)  # safetensors writes owner-only files; a model dir is for everyone to read
        check_output_dir(out_dir, overwrite, **_EXPORT_DIR)  # again: something may have appeared meanwhile
        move_into_place(tmp, out_dir)
    except OSError as err:
        raise UserError(f"Could not write the export to '{out_dir}': {err}. Check that its parent folder "
                        f"is writable and has room.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out_dir, tag)


def hf_tokenizer(tok: Tokenizer, end_of_text: str, model_max_length: int, eos_token: str | None = None,
                 chat_template: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """`tok` as a transformers fast tokenizer whose bos, eos and pad are the end-of-text token
    (GPT-2's convention: one special token that separates documents). A chat model's tokenizer
    carries its `chat_template` and has the end-of-turn token as eos."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    out = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()),  # a copy: transformers edits the one it gets
        bos_token=end_of_text, eos_token=eos_token or end_of_text, pad_token=end_of_text,
        model_max_length=model_max_length,
    )
    if chat_template is not None:
        out.chat_template = chat_template
    return out


def _chat_spec(data_path: Path):
    """The chat template and end-of-turn token when the run trained on chat data, else None."""
    from dsgpt.data.chat import read_spec
    from dsgpt.data.prepared import data_kind
    return read_spec(data_path) if data_kind(data_path) == "chat" else None


# ---- reading a local HF GPT-2 dir (train.init_from) ------------------------------------------

# Weight files in the order they are preferred: safetensors cannot run code when read.
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")
# The tanh approximation of GELU, which is what dsgpt's MLP computes, under its HF names.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Causal-mask buffers that older transformers saved with the weights.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def is_hf_dir(path) -> bool:
    """Whether `path` is meant as a Hugging Face model dir: a folder with a config.json (dsgpt
    run dirs hold config.yaml, checkpoints dsgpt_state.json)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / "config.json").is_file()


@dataclass
class HFDir:
    """A local HF GPT-2 dir as dsgpt sees it: the model it describes, its tokenizer, its weights."""
    path: Path
    config: GPTConfig
    tokenizer: Tokenizer

    def state_dict(self) -> dict:
        """The weights under dsgpt's names and layout, fp32 on CPU (lm_head dropped: it is tied)."""
        return from_hf_state_dict(_read_weights(self.path))


def load_hf_dir(path) -> HFDir:
    """Read a local HF GPT-2-family dir's config and tokenizer, and find its weights (read later by
    `HFDir.state_dict`). Anything dsgpt's GPT cannot compute is a UserError saying what."""
    from dsgpt.data.tokenizer import load_tokenizer
    path = Path(path).expanduser()
    try:
        config = json.loads((path / "config.json").read_bytes())
        if not isinstance(config, dict):
            raise ValueError("it holds no JSON object")
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read '{path / 'config.json'}' ({err}). Save the model again with "
                        f"save_pretrained().") from None
    gpt = gpt_config_from_hf(config, path)
    _weight_files(path)  # fail now, before any engine is built, if there are none
    return HFDir(path, gpt, load_tokenizer(path))


def gpt_config_from_hf(config: dict, where) -> GPTConfig:
    """The dsgpt GPTConfig computing what an HF GPT-2 config.json describes."""
    if config.get("model_type") != "gpt2":
        raise UserError(f"'{where}' holds a {config.get('model_type')!r} model; dsgpt can start only from GPT-2-"
                        f"family models (config.json model_type 'gpt2'), whose layers it computes.")
    n_embd = config.get("n_embd", 768)
    allowed = {  # config key: (GPT2Config's default, the values dsgpt's GPT computes)
        "activation_function": ("gelu_new", _TANH_GELUS),
        "n_inner": (None, (None, 4 * n_embd)),
        "scale_attn_weights": (True, (True,)),
        "scale_attn_by_inverse_layer_idx": (False, (False,)),
        "add_cross_attention": (False, (False,)),
    }
    bad = [f"{key} = {config.get(key, default)!r} (dsgpt computes {' or '.join(map(repr, ok))})"
           for key, (default, ok) in allowed.items() if config.get(key, default) not in ok]
    if bad:
        raise UserError(f"The model in '{where}' uses GPT-2 variants dsgpt's GPT does not compute: "
                        + "; ".join(bad) + ". Start from a plain GPT-2 model instead.")
    try:
        return GPTConfig(vocab_size=config.get("vocab_size", 50257), block_size=config.get("n_positions", 1024),
                         n_layer=config.get("n_layer", 12), n_head=config.get("n_head", 12), n_embd=n_embd,
                         layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5))
    except UserError as err:
        raise UserError(f"The config.json in '{where}' describes no valid model: {err}") from None


def _weight_files(path: Path) -> list[Path]:
    for name in _WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:  # a sharded checkpoint: the index maps each tensor to its file
            weight_map = json.loads(file.read_bytes())["weight_map"]
            return [path / f for f in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"The weight index '{file}' is unreadable ({err}). Save the model again with "
                            f"save_pretrained().") from None
    raise UserError(f"'{path}' has a config.json but no weights (looked for {', '.join(_WEIGHT_FILES)}). Save "
                    f"the model with save_pretrained() into that dir.")


def _read_weights(path: Path) -> dict:
    from safetensors.torch import load_file
    state = {}
    for file in _weight_files(path):
        try:
            if file.suffix == ".safetensors":
                state.update(load_file(str(file), device="cpu"))
            else:  # weights_only: a pickle from elsewhere must not run code
                state.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as err:  # safetensors and unpickling raise assorted types
            raise UserError(f"Cannot read the weights '{file}' ({type(err).__name__}: {str(err)[:300]}). A "
                            f"pytorch_model.bin is read only if it holds plain tensors; save the model again "
                            f"with save_pretrained(), which writes safetensors.") from None
    return state


def from_hf_state_dict(state_dict: dict) -> dict:
    """GPT2LMHeadModel (or GPT2Model) state dict -> dsgpt names and layout, fp32.

    The inverse of `to_hf_state_dict`: Conv1D weights transposed to nn.Linear's (out, in), mask
    buffers dropped, and lm_head dropped because dsgpt ties it to the token table, which is only
    right when the source had it tied too."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # GPT2Model saves its weights without the prefix
        if key.endswith(_MASK_BUFFERS):
            continue
        if key.endswith(_CONV1D) and value.dim() == 2:
            value = value.t()
        out[key] = value.float().contiguous()
    head = out.pop("lm_head.weight", None)
    wte = out.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise UserError("The HF model's lm_head differs from its token embedding (untied embeddings); dsgpt's "
                        "GPT ties them, so it cannot start from this model.")
    return out
