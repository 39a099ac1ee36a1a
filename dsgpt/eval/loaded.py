"""The model an evaluation runs: a run's checkpoint in one process, on every rank of a launch, or
the live engine of a training run.

One process (`dsgpt eval`, `python launch/eval.py`): the plain GPT on the chosen device.

N ranks (`deepspeed --num_gpus N launch/eval.py`, srun, mpirun): the run's ZeRO stage (or
`--zero-stage`) decides how the work is shared.
  - ZeRO 0-2 hold the whole model on every rank, so the work is split: each rank takes every N-th
    item (val windows, documents, prompts, lm-eval requests) and the results are gathered.
  - ZeRO-3 holds a shard per rank and every forward gathers the shards from all ranks together, so
    the ranks must run the same forwards: all take all items, in lockstep, and agree on every
    result. The weights are read on rank 0 only and scattered into the shards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from dsgpt import dist
from dsgpt.errors import UserError


@dataclass
class LoadedModel:
    forward: Any                # a GPT or a DeepSpeed engine around one: call it on token ids for logits
    config: Any                 # the GPTConfig
    device: torch.device
    rank: int = 0
    world_size: int = 1
    zero3: bool = False         # the ranks run in lockstep
    tag: Optional[str] = None   # the checkpoint, when one was loaded
    dtype: str = "fp32"         # fp32, or bf16 through autocast (weights stay fp32)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def splits(self) -> bool:
        """True when each rank does its own share of the work (every rank holds the whole model)."""
        return self.world_size > 1 and not self.zero3

    @property
    def mode(self) -> str:
        return "one process" if self.world_size == 1 else ("lockstep" if self.zero3 else "split")

    def share(self, items: Sequence) -> list:
        """This rank's items: every N-th when the work is split, else all of them."""
        return list(items)[self.rank::self.world_size] if self.splits else list(items)

    def owns(self, index: int) -> bool:
        """Whether item `index` of a stream is this rank's (see share)."""
        return not self.splits or index % self.world_size == self.rank

    def gather(self, mine: list, total: int) -> list:
        """Every rank's results of `share(items)` put back in the items' order (on every rank)."""
        if not self.splits:
            return mine
        out: list = [None] * total
        for rank, part in enumerate(dist.all_gather_object(mine)):
            out[rank::self.world_size] = part
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Sums of per-share numbers over the ranks (the numbers themselves in lockstep)."""
        return dist.all_reduce_sum(values, self.device) if self.splits else list(values)

    def precision(self):
        """bf16 through autocast: weights stay fp32, matmuls run in bf16, losses are summed in fp32."""
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def facts(self) -> dict:
        """How this evaluation ran, for the results file: a claim about ZeRO-3 is checked, not assumed."""
        out = {"ranks": self.world_size, "mode": self.mode}
        engine = self.forward
        if hasattr(engine, "zero_optimization_stage"):
            out["zero_stage"] = int(engine.zero_optimization_stage())
        if self.zero3:
            params = list(engine.module.parameters())
            held = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
            whole = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            out["param_share_per_rank"] = held / max(whole, 1)
        return out


def from_engine(engine, ctx: dist.DistContext, dtype: str = "fp32", tag: Optional[str] = None) -> LoadedModel:
    """A training run's live engine, for evaluation between steps."""
    return LoadedModel(forward=engine, config=engine.module.config, device=ctx.device, rank=ctx.rank,
                       world_size=ctx.world_size, zero3=bool(engine.zero_optimization_partition_weights()),
                       dtype=dtype, tag=tag)


def load(run_dir, which: str = "latest", device: str = "auto", dtype: str = "fp32",
         zero_stage: Optional[int] = None) -> tuple[LoadedModel, Any]:
    """(LoadedModel, run config) of a run's checkpoint, in this process or on every launched rank."""
    from dsgpt import runs
    if dist.launched_world_size() == 1:
        if zero_stage is not None:
            raise UserError(f"--zero-stage {zero_stage} shares the model between ranks, and this is one process. "
                            f"Launch several ranks (deepspeed --num_gpus 2 launch/eval.py ...), or leave it out.")
        from dsgpt.generate import resolve_device
        dev = resolve_device(device)
        model, cfg, tag = runs.load_model(run_dir, which)
        return LoadedModel(forward=model.to(dev), config=model.config, device=dev, tag=tag, dtype=dtype), cfg
    ctx = dist.setup()
    cfg, tag, mcfg = runs.resolve_checkpoint(run_dir, which)
    stage = run_zero_stage(run_dir, cfg) if zero_stage is None else zero_stage
    if stage != 3:
        model, cfg, tag = runs.load_model(run_dir, which)
        return LoadedModel(forward=model.to(ctx.device), config=model.config, device=ctx.device, rank=ctx.rank,
                           world_size=ctx.world_size, tag=tag, dtype=dtype), cfg
    engine = _zero3_engine(run_dir, cfg, tag, mcfg, ctx)
    return from_engine(engine, ctx, dtype, tag), cfg


def run_zero_stage(run_dir, cfg) -> int:
    """The ZeRO stage the run trained with: its resolved ds_config.json, else its config."""
    import json
    from pathlib import Path

    from dsgpt.zero import zero_stage
    try:
        return zero_stage(json.loads((Path(run_dir) / "ds_config.json").read_text()))
    except (OSError, ValueError):
        return int(cfg.deepspeed.zero_stage or 0)


def _zero3_engine(run_dir, cfg, tag: str, mcfg, ctx: dist.DistContext):
    """A ZeRO-3 inference engine (no optimizer) holding the checkpoint's weights, sharded."""
    from pathlib import Path

    import deepspeed

    from dsgpt.ds_config import resolve_ds_config
    from dsgpt.runs import consolidated_state_dict
    from dsgpt.zero import build_model, write_weights
    # fp32 weights (a bf16 eval autocasts); no optimizer, so nothing of the optimizer is offloaded.
    eval_cfg = cfg.model_copy(deep=True)
    eval_cfg.deepspeed.zero_stage = 3
    eval_cfg.precision = "fp32"
    ds_config = resolve_ds_config(eval_cfg, ctx.world_size, ctx.on_gpu)
    ds_config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=build_model(mcfg, ds_config), config=ds_config)
    state = consolidated_state_dict(Path(run_dir) / "checkpoints", tag) if ctx.is_main else None
    if state is not None:
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied; ZeRO may store it once
    write_weights(engine, state)
    engine.eval()  # DeepSpeed's eval() returns None, not the engine
    return engine
