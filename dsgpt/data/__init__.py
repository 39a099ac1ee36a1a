"""Data: sources -> tokenizer -> prepared token shards -> TokenData batches.

Names are imported lazily so that `dsgpt prepare` does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "iter_documents": "sources",
    "train_bpe": "tokenizer",
    "load_tokenizer": "tokenizer",
    "eos_id": "tokenizer",
    "tokenizer_hash": "tokenizer",
    "vocab_hash": "tokenizer",
    "prepare": "prepare",
    "prepare_documents": "prepare",
    "prepare_chat": "prepare",
    "SFTData": "sft",
    "token_dtype": "prepare",
    "BUILTIN": "builtin",
    "ensure_builtin": "builtin",
    "TokenData": "dataset",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"dsgpt.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dsgpt.data' has no attribute {name!r}")
