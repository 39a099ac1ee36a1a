"""The checks and lookups a run makes before it builds anything: precision vs device, the data,
the model's shape, and the fingerprint that ties checkpoints to a model shape, a corpus and a seed."""

from __future__ import annotations

from dsgpt import dist
from dsgpt.config import Config
from dsgpt.errors import UserError


def apply_tf32(cfg: Config, ctx) -> None:
    """`tf32: true` lets fp32 matmuls and convolutions use TF32 tensor cores (off: torch's default)."""
    if ctx.on_gpu:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def check_precision(cfg: Config) -> None:
    if cfg.precision == "fp16" and not dist.gpu_available():
        raise UserError(
            "precision=fp16 needs a CUDA GPU, and none is visible here (DeepSpeed's CPU backend "
            "refuses fp16). Use precision=bf16 (mixed precision on CPU) or precision=fp32 (the CPU "
            "default), or run on a GPU machine."
        )


def open_data(cfg: Config):
    """The run's data (dsgpt.data.prepared.open_run_data) for this model's block size."""
    from dsgpt.data.prepared import open_run_data
    return open_run_data(cfg, model_config(cfg, vocab_size=None).block_size)


def model_config(cfg: Config, vocab_size):
    """The model's shape: preset, then explicit model.* keys; vocab from the data unless set."""
    from dsgpt.model import GPTConfig
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(m, k) is not None}
    overrides.update(dropout=m.dropout, bias=m.bias, activation_checkpointing=m.activation_checkpointing,
                     loss_chunk_tokens=m.loss_chunk_tokens)
    if vocab_size is not None:
        if m.vocab_size is not None:
            if m.vocab_size < vocab_size:
                raise UserError(
                    f"model.vocab_size={m.vocab_size} is smaller than the vocabulary of the data in "
                    f"'{cfg.data.path}' ({vocab_size} tokens): the model could not embed every token. "
                    f"Set model.vocab_size to at least {vocab_size} (or leave it unset to follow the "
                    f"data), or prepare the data with a smaller --vocab-size."
                )
            overrides["vocab_size"] = m.vocab_size
        else:
            overrides["vocab_size"] = -(-vocab_size // 64) * 64  # pad to a multiple of 64: faster matmuls
    return GPTConfig.from_preset(m.preset, **overrides)


def fingerprint(mcfg, data, seed: int) -> dict:
    return {
        "model": {k: getattr(mcfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
        "data_sha256": data.meta.get("data_sha256"),
        "vocab_sha256": data.meta.get("vocab_sha256"),  # eval, generate and export check their tokenizer
        "data_pack": getattr(data, "pack", None),  # chat rows are packed or not: other batches either way
        "seed": seed,
    }
