"""Build the DeepSpeed engine: optimizer with decoupled weight decay, schedule, initialize."""

from __future__ import annotations

import math
from typing import Optional

import torch

from dsgpt.config import FP32_WEIGHTS, Config
from dsgpt.model import param_groups
from dsgpt.train.schedules import build_scheduler


# Optimizer group entries that say how the update is computed, not what the run trained with: a
# checkpoint from another layout or device (an unfused CPU update, say) must not overwrite them.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips, records the gradient norm and skips non-finite steps by itself, on the device.

    DeepSpeed hands the raw optimizer the gradients only under ZeRO 0 with fp32 weights (fp32 and
    bf16-mixed); there it neither records the norm nor checks for inf/NaN (its ZeRO, bf16 and fp16
    optimizers do both, reading a flag back every step). Here nothing is read back: the norm stays a
    device tensor, and torch's fused AdamW (on CPU and GPU) takes a `found_inf` flag, as torch.amp's
    GradScaler uses it, with which it leaves the weights, moments and step count as they were. That
    flag is `skipped`, read later with the step's loss (dsgpt.train.step.read_back). So the engine
    sees no `overflow` and advances the schedule on a skipped step too.
    """

    def __init__(self, params, clip: float, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.clip = clip
        self.overflow = False  # what DeepSpeed reads; the skip is decided on the device instead
        self._global_grad_norm = None  # a device tensor: read only when logged
        self.skipped: Optional[torch.Tensor] = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else math.inf)
        self._global_grad_norm = norm
        self.skipped = self.found_inf = (~torch.isfinite(norm)).to(torch.float32)
        return super().step(closure)

    def load_state_dict(self, state_dict):
        live = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        # The saved groups replace ours, and one saved before the update was fused says fused=False:
        # keep this optimizer's way of computing, and the fused kernel wants each step count on its
        # parameter's device.
        for group, kept in zip(self.param_groups, live):
            group.update(kept)
            for p in group["params"]:
                st = self.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def offloads_optimizer(ds_config: dict) -> bool:
    off = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device") in ("cpu", "nvme")


def build_optimizer(model, cfg: Config, ds_config: dict):
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if offloads_optimizer(ds_config):
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed requires its own CPU Adam there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 0 and cfg.precision in FP32_WEIGHTS:
        return GuardedAdamW(groups, clip=o.grad_clip, **kwargs)
    # Fused on CPU too: torch's CPU kernel does the whole update in one pass (~4.7x the default's speed).
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def build_engine(model, cfg: Config, ds_config: dict):
    """Returns (engine, ds_config as passed to DeepSpeed)."""
    import deepspeed
    optimizer = build_optimizer(model, cfg, ds_config)
    if isinstance(optimizer, GuardedAdamW):
        ds_config = dict(ds_config, gradient_clipping=0.0)  # GuardedAdamW clips itself
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim, cfg.train.max_steps),
    )
    if engine.world_size == 1 and engine.zero_optimization_stage() == 0:
        # One rank has nothing to reduce, but DeepSpeed would still flatten every gradient into a
        # bucket, "all-reduce" it and copy it back, each step. ZeRO 1-3 keep the reduce: it fills
        # their fp32 gradient partitions.
        engine.enable_backward_allreduce = False
    if cfg.model.compile:
        # DeepSpeed's compile compiles the module in place (parameter names, so checkpoints, stay
        # as they are); under ZeRO-3 its gather/release hooks split the graph at every layer.
        engine.compile()
    return engine, ds_config


def describe_engine(engine) -> dict:
    """What DeepSpeed actually built: the facts a test or a log line should check, not assume."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrappers hold the torch optimizer here
    state_bytes = 0
    for per_param in getattr(inner, "state", {}).values():
        for value in per_param.values():
            if torch.is_tensor(value) and value.dim() > 0:
                state_bytes += value.numel() * value.element_size()
    first = next(engine.module.parameters())
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "param_dtype": str(getattr(first, "ds_tensor", first).dtype).replace("torch.", ""),
        "bf16": engine.bfloat16_enabled(),
        "fp16": engine.fp16_enabled(),
        "autocast": (str(engine.torch_autocast_dtype()).replace("torch.", "")  # the forward's matmul dtype
                     if engine.torch_autocast_enabled() else None),
        "offload_optimizer": bool(engine.zero_cpu_offload()),
        "optimizer": type(inner).__name__,
        "fused_optimizer": bool(getattr(inner, "defaults", {}).get("fused")),  # torch's fused update
        "wrapper": type(opt).__name__,
        "optimizer_state_bytes": state_bytes,
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "train_batch_size": engine.train_batch_size(),
        "world_size": engine.world_size,
        "backward_allreduce": bool(engine.enable_backward_allreduce),
        "compiled": bool(getattr(engine, "is_compiled", False)),
    }
