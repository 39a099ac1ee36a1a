"""train.init_from: start a run from another model's weights, whatever ZeRO stage this run uses.

A source is a dsgpt checkpoint (a run dir, its checkpoints dir or one tag) or a local Hugging Face
GPT-2 dir (config.json, weights, tokenizer.json). `locate_source` runs before the engine is built
and checks that the source fits: the same model shape up to the vocabulary, and a data tokenizer
that equals or extends the source's (every source token keeps its id, new ones come after). Once the
engine exists, `load_source` reads the source's full weights (a ZeRO checkpoint is consolidated with
DeepSpeed's zero_to_fp32), grows the token table for the new tokens and writes every parameter into
the engine: gathered and re-sharded under ZeRO-3, and with the optimizer's fp32 master copies
refreshed, which ZeRO 1-3 and bf16 keep apart from the module's weights.

Going through a full state dict rather than DeepSpeed's load_checkpoint(load_module_only=True) is
what lets a run start from a checkpoint of another ZeRO stage, another world size or another
vocabulary size, and from an HF model, by one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from dsgpt import hf, runs
from dsgpt.data.tokenizer import added_ids
from dsgpt.errors import UserError
from dsgpt.model import GPTConfig
from dsgpt.zero import full_shape, write_weights

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
TOKEN_TABLE = "transformer.wte.weight"
TIED = "lm_head.weight"  # the token table again; dsgpt ties the two


@dataclass
class InitSource:
    where: str  # what the weights come from, for messages
    source_ids: list[int]  # rows of the source's token table that hold its tokenizer's tokens
    new_ids: list[int]  # ids this run's tokenizer adds: their rows start from the mean of source_ids' rows
    read_weights: Callable[[], dict]  # the full weights under dsgpt's names, fp32 on CPU


def locate_source(init_from: str, mcfg: GPTConfig, data_tokenizer) -> InitSource:
    """The source `init_from` names, after checking that it fits a model `mcfg` trained with
    `data_tokenizer`. Raises UserError naming what does not fit and what to do."""
    path = Path(init_from).expanduser()
    if hf.is_hf_dir(path):
        source = hf.load_hf_dir(path)
        where = f"the Hugging Face model '{path}'"
        _check_shape(init_from, where, _shape(source.config), mcfg)
        if source.config.layer_norm_epsilon != mcfg.layer_norm_epsilon:
            raise UserError(f"train.init_from={init_from}: {where} uses layer_norm_epsilon "
                            f"{source.config.layer_norm_epsilon}, dsgpt's GPT {mcfg.layer_norm_epsilon}; its "
                            f"outputs would change. Start from a model with layer_norm_epsilon "
                            f"{mcfg.layer_norm_epsilon}.")
        tokenizer, rows, read = source.tokenizer, source.config.vocab_size, source.state_dict
    else:
        point = runs.locate_path(path, "train.init_from")
        where = f"the checkpoint '{point.tag_dir}'"
        _require_model_files(point.tag_dir)
        shape = runs.read_state(point.tag_dir).get("model")
        _check_shape(init_from, where, shape, mcfg)
        tokenizer, rows = _checkpoint_tokenizer(point.ckpt_dir.parent, where), shape["vocab_size"]
        read = partial(runs.consolidated_state_dict, point.ckpt_dir, point.tag)
    source_ids = sorted(tokenizer.get_vocab(with_added_tokens=True).values())
    if source_ids and source_ids[-1] >= rows:
        raise UserError(f"train.init_from={init_from}: the tokenizer of {where} has token id {source_ids[-1]}, "
                        f"but its model has only {rows} token rows. The model and tokenizer do not belong "
                        f"together; check what was saved there.")
    new_ids = added_ids(tokenizer, data_tokenizer, f"train.init_from's source ({where})", "this run's data")
    return InitSource(where, source_ids, new_ids, read)


def load_source(engine, source: InitSource) -> str:
    """Write the source's weights into `engine` (all ranks call this); returns a line for the log."""
    params = dict(engine.module.named_parameters())  # a tied tensor appears once, as the token table
    state = _matched(source.read_weights(), params, source.where)
    rows = full_shape(params[TOKEN_TABLE])[0]
    state[TOKEN_TABLE] = grow_token_table(state[TOKEN_TABLE], rows, source.source_ids, source.new_ids)
    write_weights(engine, state)
    note = f"init_from: weights of {source.where}"
    if source.new_ids:
        note += (f"; {len(source.new_ids)} new token(s), ids {source.new_ids[0]}-{source.new_ids[-1]}, start "
                 f"from the mean embedding of its {len(source.source_ids)} tokens")
    return note


def grow_token_table(table: torch.Tensor, rows: int, source_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """The source's token table fitted to `rows` rows: its rows kept, except that new tokens, and
    rows it did not have, start from the mean of its real tokens' rows (an embedding the model has
    no reason to treat as special, where a random or zero row would be). Padding rows beyond
    `rows` hold no token and are dropped."""
    mean = table[source_ids].mean(dim=0)
    out = mean.expand(rows, -1).clone()
    keep = min(rows, table.shape[0])
    out[:keep] = table[:keep]
    out[new_ids] = mean  # including ids that land in the source's padding rows
    return out


def _shape(cfg: GPTConfig) -> dict:
    return {k: getattr(cfg, k) for k in SHAPE_KEYS}


def _check_shape(init_from: str, where: str, source_shape, mcfg: GPTConfig) -> None:
    """Everything but the vocabulary must match; the tokenizer rule governs that."""
    mine = _shape(mcfg)
    differ = [k for k in SHAPE_KEYS if k != "vocab_size"
              and (not isinstance(source_shape, dict) or source_shape.get(k) != mine[k])]
    if differ:
        raise UserError(
            f"train.init_from={init_from}: {where} holds a model of shape {source_shape}, but this config "
            f"builds {mine}. Set model.{', model.'.join(differ)} to match it (vocab_size may differ: it "
            f"follows the tokenizer), or start from another model.")


def _require_model_files(tag_dir: Path) -> None:
    if not any(tag_dir.glob("*model_states.pt")):
        raise UserError(f"train.init_from: the checkpoint '{tag_dir}' holds no model files (*model_states.pt), "
                        f"so the run would have loaded nothing and started from random weights. Point "
                        f"train.init_from at an intact checkpoint or run dir.")


def _checkpoint_tokenizer(run_dir: Path, where: str):
    from dsgpt.config import load_config
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"train.init_from: {where} is not inside a run dir ('{config}' does not exist), so the "
                        f"tokenizer its model was trained with is unknown. Point train.init_from at the run "
                        f"dir it came from.")
    tokenizer, _ = runs.run_tokenizer(run_dir, load_config(str(config)))
    return tokenizer


def _matched(state: dict, params: dict, where: str) -> dict:
    """`state` restricted to the engine's parameters, after checking it has each with its shape.

    Extra entries are dropped when harmless: the tied output layer, and zero biases (a model without
    biases exported to HF gains zero ones)."""
    missing = sorted(params.keys() - state.keys())
    extra = [k for k in state.keys() - params.keys()
             if k != TIED and not (k.endswith(".bias") and not state[k].any())]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(full_shape(p))}" for k, p in params.items()
             if k in state and k != TOKEN_TABLE and state[k].shape != full_shape(p)]
    if missing or extra or wrong:
        raise UserError(
            f"train.init_from: the weights of {where} do not fit this model: "
            + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                          f"not in this model {sorted(extra)}" if extra else "",
                                          f"other shapes {wrong}" if wrong else "") if part)
            + ". Check model.bias and the other model.* keys against the source.")
    return {k: state[k] for k in params}
