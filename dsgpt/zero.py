"""ZeRO-aware model construction and weight writes, shared by training and evaluation.

Under ZeRO-3 a parameter is a shard per rank: building the model must partition it as it is
created, and writing weights must gather, modify on one rank and re-partition.
"""

from __future__ import annotations

from typing import Optional

import torch


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0) or 0)


def build_model(mcfg, ds_config: dict):
    """The GPT for this DeepSpeed config. Under ZeRO-3 it is built sharded (deepspeed.zero.Init):
    each module's parameters are partitioned as soon as the module exists, so no rank ever holds
    the whole model and one larger than a rank's memory can be built. Rank 0's initialization is
    the one kept; on CPU a seed gives the same model as the other stages (on a GPU the draws come
    from the GPU's generator, since zero.Init allocates there)."""
    from dsgpt.model import GPT
    if zero_stage(ds_config) != 3:
        return GPT(mcfg)
    import deepspeed
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        return GPT(mcfg)


def full_shape(param) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # a ZeRO-3 shard knows the whole shape


def write_weights(engine, state: Optional[dict]) -> None:
    """Copy `state` (name -> full tensor) into the engine's parameters on every ZeRO stage.

    Under ZeRO-3 only rank 0's copy is kept (it is broadcast and re-sharded), so other ranks may
    pass None and never hold the whole model; without ZeRO-3 every rank needs `state`."""
    import deepspeed
    zero3 = engine.zero_optimization_partition_weights()
    if state is None and not zero3:
        raise ValueError("write_weights: every rank needs the weights unless the engine is ZeRO-3")
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=zero3):
                if state is not None:
                    param.data.copy_(state[name])
    # ZeRO 1-3 and bf16 step fp32 master copies of the weights: without this the first step would
    # put the old (random) weights back.
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
