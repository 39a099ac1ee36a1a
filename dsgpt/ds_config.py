"""Turn a run config plus a `ds_configs/*.json` template into the DeepSpeed config actually used.

Rules, in order: the template supplies structure and any explicit values; fields set to "auto"
are filled from the run config; the run config's `deepspeed.zero_stage` and `precision` always
override the template. Explicit template values that contradict the run config are collected and
reported together in one error, so a user fixes them in one go.
"""

from __future__ import annotations

import json
from typing import Any

from dsgpt.config import Config, resolve_path
from dsgpt.errors import UserError

AUTO = "auto"
CPU_MIN_BUCKET = 2**21  # elements (8 MB in fp32) per bucket on CPU ranks: see the bucket sizes below
# dsgpt builds these from the run config's `optim` section (AdamW with decay on matrices only,
# the warmup schedules); a second definition in the template would silently disagree.
OWNED_BY_RUN_CONFIG = ("optimizer", "scheduler")


def load_template(path: str) -> dict:
    p = resolve_path(path)
    if not p.is_file():
        raise UserError(
            f"The DeepSpeed template '{path}' (deepspeed.config) does not exist. Use one of "
            f"ds_configs/zero0.json ... zero3.json, zero2_offload.json, zero3_offload.json, or a path "
            f"to your own JSON file."
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"The DeepSpeed template '{p}' is not valid JSON: {err}. Fix the file.") from None


def _fill(conf: dict, key: str, value: Any, problems: list[str], where: str, source: str) -> None:
    """Fill an "auto" (or absent) field; an explicit different value is a contradiction."""
    current = conf.get(key, AUTO)
    if current == AUTO:
        conf[key] = value
    elif current != value:
        problems.append(f"  - {where}{key} is {current!r} in the template but {source} gives {value!r}")


def resolve_ds_config(cfg: Config, world_size: int, on_gpu: bool) -> dict:
    template = load_template(cfg.deepspeed.config)
    conf = json.loads(json.dumps(template))  # deep copy
    problems: list[str] = []
    t = cfg.train

    for key in OWNED_BY_RUN_CONFIG:
        if key in conf:
            problems.append(
                f"  - the template has an '{key}' section; dsgpt builds the optimizer and learning-rate "
                f"schedule from the run config's `optim` keys, so remove '{key}' from the template")

    micro, gas = t.micro_batch_size, t.grad_accum_steps
    _fill(conf, "train_micro_batch_size_per_gpu", micro, problems, "", "train.micro_batch_size")
    _fill(conf, "gradient_accumulation_steps", gas, problems, "", "train.grad_accum_steps")
    _fill(conf, "train_batch_size", micro * gas * world_size, problems, "",
          f"train.micro_batch_size x train.grad_accum_steps x {world_size} ranks")
    _fill(conf, "gradient_clipping", cfg.optim.grad_clip, problems, "", "optim.grad_clip")
    _fill(conf, "steps_per_print", cfg.deepspeed.steps_per_print or 10**9, problems, "", "deepspeed.steps_per_print")

    zero = conf.setdefault("zero_optimization", {})
    template_stage = zero.get("stage", 0)
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 0)
    stage = zero["stage"]
    # Where the stage came from, for the offload messages: a run config that sets
    # deepspeed.zero_stage (configs/tiny.yaml does) overrides the template's stage.
    if cfg.deepspeed.zero_stage is not None and cfg.deepspeed.zero_stage != template_stage:
        stage_from = (f"deepspeed.zero_stage={stage} in the run config overrides the template's stage "
                      f"{template_stage!r}")
    else:
        stage_from = f"the stage is {stage}"
    if stage not in (0, 1, 2, 3):
        problems.append(f"  - zero_optimization.stage is {stage!r}; DeepSpeed has stages 0, 1, 2 and 3")
        stage = None  # e.g. "auto" or "3": the offload checks below cannot compare it
    hidden = cfg_model_width(cfg)
    # Bucket sizes scaled to the model, the rule the HF Trainer's DeepSpeed integration uses, on
    # GPUs (NCCL, overlapped with backward). Over gloo each collective has a fixed cost whatever
    # its size, so CPU ranks take at least CPU_MIN_BUCKET elements: on 2 CPU ranks of a 4 x 256
    # model (hidden^2 = 65,536) ZeRO-2 ran ~14% and ZeRO-3 ~10% faster (bench/RESULTS.md).
    least = 0 if on_gpu else CPU_MIN_BUCKET
    auto_sizes = {
        "reduce_bucket_size": max(hidden * hidden, least),
        "stage3_prefetch_bucket_size": max(int(0.9 * hidden * hidden), least),
        "stage3_param_persistence_threshold": 10 * hidden,
        "overlap_comm": on_gpu,
    }
    for key, value in auto_sizes.items():
        if zero.get(key) == AUTO:
            zero[key] = value
    for section in ("offload_optimizer", "offload_param"):
        off = zero.get(section)
        if isinstance(off, dict) and off.get("pin_memory") == AUTO:
            off["pin_memory"] = on_gpu
    if stage is not None and stage < 3 and isinstance(zero.get("offload_param"), dict):
        problems.append(f"  - offload_param needs ZeRO stage 3 but {stage_from}; set deepspeed.zero_stage=3, "
                        f"or drop offload_param from the template")
    if stage == 0 and isinstance(zero.get("offload_optimizer"), dict):
        problems.append(f"  - offload_optimizer needs ZeRO stage 1 or more but {stage_from}; set "
                        f"deepspeed.zero_stage=2, or drop offload_optimizer from the template")

    # Precision: the run config's `precision` decides, whatever the template says.
    conf.setdefault("bf16", {})["enabled"] = cfg.precision == "bf16"
    conf.setdefault("fp16", {})["enabled"] = cfg.precision == "fp16"
    if cfg.precision != "fp16":
        conf["fp16"] = {"enabled": False}
    if cfg.precision == "bf16-mixed":
        # An empty list of "lower precision safe modules": DeepSpeed would otherwise reduce the
        # gradients of every Linear in bf16; here they stay fp32 end to end, as under torch AMP + DDP.
        conf["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif "torch_autocast" in conf:
        conf["torch_autocast"] = {"enabled": False}

    leftovers = [k for k, v in _walk(conf) if v == AUTO]
    for key in leftovers:
        problems.append(f"  - {key} is \"auto\" but dsgpt has no rule to fill it; give it a value in the template")

    if problems:
        raise UserError(
            f"The DeepSpeed template '{cfg.deepspeed.config}' does not agree with the run config "
            f"({len(problems)} problem(s)):\n" + "\n".join(problems) +
            "\nSet these fields to \"auto\" in the template (dsgpt then fills them from the run "
            "config), or change the run config to match."
        )
    return conf


def _walk(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), obj


def cfg_model_width(cfg: Config) -> int:
    if cfg.model.n_embd is not None:
        return cfg.model.n_embd
    from dsgpt.model import PRESETS
    return PRESETS.get(cfg.model.preset, {}).get("n_embd", 768)
