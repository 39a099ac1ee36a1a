"""The typed run config: YAML file + dotted `key=value` overrides, validated in one pass.

Precedence (stated once, tested): dotted overrides > run YAML > defaults here. The DeepSpeed
template under `ds_configs/` is resolved separately by `dsgpt.ds_config`.

pydantic does the type checking (it is what DeepSpeed itself uses); this module turns its errors
into one message that names every bad key, the value given, and the closest valid key.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dsgpt.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


class Section(BaseModel):
    # coerce_numbers_to_str: `run.name=42` (YAML reads an int) is a valid name, not a type error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, allow_inf_nan=False)


class RunConfig(Section):
    name: str = "tiny"
    out_dir: str = "runs"
    seed: int = 1234

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name


class ModelSection(Section):
    preset: str = "tiny"
    # None means: take the preset's value.
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: Optional[int] = None
    dropout: float = 0.0
    bias: bool = True
    activation_checkpointing: bool = False
    # Training loss over this many tokens' logits at a time (each chunk's gradients made in its
    # forward), so the fp32 logits of a whole micro-batch never exist at once; 0 = all at once.
    loss_chunk_tokens: int = Field(0, ge=0)
    # torch.compile the model inside the DeepSpeed engine (engine.compile: inductor on GPU and CPU).
    compile: bool = False
    # None means: the tokenizer's vocab size, padded up to a multiple of 64 for fast matmuls.
    vocab_size: Optional[int] = None


class MixSource(Section):
    path: str
    weight: float = Field(gt=0)  # relative: the weights are normalised to sum to 1
    name: Optional[str] = None  # in val/<name>/loss; None = the dir's name


class DataSection(Section):
    # "builtin" is the demo corpus shipped with every Python install, prepared on first use.
    path: str = "builtin"
    builtin_vocab_size: int = 2048
    # Pretraining on several prepared dirs (one tokenizer) with weights, instead of data.path.
    mix: Optional[list[MixSource]] = None
    # Chat (SFT) dirs: pack short examples into each row (true) or one padded example per row
    # (false); None = as `dsgpt prepare --chat` recorded. Part of the resume fingerprint.
    pack: Optional[bool] = None


class TrainSection(Section):
    # ge=1 as field constraints (not one validator) so every bad key is reported, not the first.
    max_steps: int = Field(200, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    eval_interval: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)  # validation set: eval_batches x eval batch size windows, any rank count
    log_interval: int = Field(1, ge=1)
    save_interval: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    resume: str = "auto"  # auto | never | a checkpoint dir
    init_from: Optional[str] = None  # a run dir or checkpoint dir to start a fine-tune from
    early_stop_patience: int = 0  # evals without improvement before stopping; 0 = off
    early_stop_min_delta: float = 0.0
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_steps: int = 10  # consecutive skipped steps before giving up
    max_minutes: Optional[float] = None  # wall-clock budget: save and exit cleanly when spent
    # A rank silent this long (stopped, dead, stuck) ends the job with a message naming it; 0 = off.
    hang_timeout_s: float = Field(300.0, ge=0)
    save_best: bool = True  # also save at an evaluation that beats every earlier one (`best`)
    sample_interval: int = 0  # steps between text samples logged to TensorBoard; 0 = off
    sample_tokens: int = 64
    profile: bool = False  # a torch.profiler trace of steps 3-5 in RUN/profile/ (Chrome/Perfetto format)


class OptimSection(Section):
    # Ranges as field constraints, so one message lists every bad key with its allowed range
    # (torch would otherwise fail on each rank with a traceback).
    lr: float = Field(6e-4, gt=0)
    min_lr: float = Field(6e-5, ge=0)  # the floor decaying schedules end at (capped at lr)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    schedule: Literal["cosine", "linear", "step", "exponential", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_steps: Optional[int] = Field(None, ge=1)  # None = train.max_steps - warmup
    step_size: int = Field(100, ge=1)  # `step`: multiply by step_gamma every step_size steps
    step_gamma: float = Field(0.1, gt=0, le=1)
    exp_gamma: Optional[float] = Field(None, gt=0, le=1)  # `exponential`: None = reach min_lr at the end

    @model_validator(mode="after")
    def _check(self):
        # Exponential decay never reaches 0: the closed form would drop the lr to 0 after one step.
        if self.schedule == "exponential" and self.exp_gamma is None and self.min_lr <= 0:
            raise ValueError(
                f"optim.schedule=exponential decays to optim.min_lr, which must then be > 0 (got "
                f"{self.min_lr}); set optim.min_lr > 0 or give optim.exp_gamma")
        return self


class EvalSection(Section):
    batch_size: Optional[int] = None  # None = train.micro_batch_size
    # Harness tasks on the live model during training, as `dsgpt eval --tasks` takes them
    # (lm-eval task names, gen:FILE.jsonl, lm); logged as eval/<task>/<metric>. None = off.
    tasks: Optional[str] = None
    interval: int = Field(0, ge=0)  # steps between task evals; 0 = with every validation (train.eval_interval)
    include_path: Optional[str] = None  # lm-eval: a folder of your own task YAMLs
    limit: Optional[int] = Field(None, ge=1)  # lm-eval: at most N examples per task
    max_new_tokens: int = Field(64, ge=1)  # gen tasks and lm-eval generate_until


class DeepSpeedSection(Section):
    config: str = "ds_configs/zero1.json"
    zero_stage: Optional[Literal[0, 1, 2, 3]] = None  # None = the template's
    steps_per_print: int = 0


# Precisions whose weights, gradients and optimizer state DeepSpeed holds in fp32 (bf16-mixed only
# runs the forward under autocast).
FP32_WEIGHTS = ("fp32", "bf16-mixed")


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    eval: EvalSection = EvalSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    # bf16 / fp16: DeepSpeed's 16-bit weights and gradients with an fp32 master copy. bf16-mixed: fp32
    # weights, gradients and optimizer (DeepSpeed sees an fp32 model) with the forward under
    # torch.autocast(bfloat16), as PyTorch AMP and nanoGPT train: under ZeRO 0 its step dispatches
    # 1,555 operations for gpt2-124m against 6,420 under bf16 + ZeRO-1 (bench/host_ops.py, on an H200).
    precision: Literal["fp32", "bf16", "bf16-mixed", "fp16"] = "fp32"
    # fp32 matmuls on TF32 tensor cores (CUDA GPUs from Ampere on; no effect on CPU): about 7x
    # an H100's plain fp32 rate, with a 10-bit mantissa in the products.
    tf32: bool = False

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _all_keys(model_cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


# Names other trainers use for a key (HF Trainer, nanoGPT), by last component.
_ALIASES = {"learning_rate": "lr", "max_iters": "max_steps", "max_grad_norm": "grad_clip"}


def closest_key(key: str) -> Optional[str]:
    """The valid key the user most likely meant: similar last component, same section preferred.

    Whole dotted keys compared as strings favour the section over the name ("train.lr" would
    suggest "train.resume"), so the last components are compared, with a bonus for the same section
    that still lets an exact name in another section win ("train.lr" -> "optim.lr").
    """
    candidates = dict.fromkeys(_all_keys() + list(Config.model_fields))  # leaves, then sections
    section, _, leaf = key.rpartition(".")
    leaf = _ALIASES.get(leaf, leaf)
    best, best_score = None, 0.0
    for cand in candidates:
        cand_section, _, cand_leaf = cand.rpartition(".")
        ratio = difflib.SequenceMatcher(None, leaf, cand_leaf).ratio()
        if ratio < 0.6:
            continue
        score = ratio + (0.25 if cand_section == section else 0.0)
        if score > best_score:
            best, best_score = cand, score
    return best


def _parse_value(text: str) -> Any:
    """Parse an override's value the way YAML would (`3e-4`, `true`, `null`, `[1, 2]`)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "3e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(
                f"Could not read the override '{item}': overrides take the form key=value with a "
                f"dotted key, e.g. train.max_steps=50 or optim.lr=3e-4."
            )
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"The override '{item}' sets inside '{part}', which is not a section.")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _field(loc: tuple):
    """The pydantic FieldInfo at a validation error's location, or None (unknown key, list item)."""
    model_cls, field = Config, None
    for part in loc:
        if not (isinstance(model_cls, type) and issubclass(model_cls, BaseModel)):
            return None
        field = model_cls.model_fields.get(str(part))
        if field is None:
            return None
        model_cls = field.annotation
    return field


def allowed_range(loc: tuple) -> Optional[str]:
    """A field's numeric bounds as an inequality, e.g. '0 <= optim.beta2 < 1'; None if it has none."""
    field = _field(loc)
    if field is None:
        return None
    key = ".".join(str(p) for p in loc)
    lower = upper = None
    for m in field.metadata:
        kind = type(m).__name__
        if kind in ("Gt", "Ge"):
            lower = ("<" if kind == "Gt" else "<=", getattr(m, kind.lower()))
        elif kind in ("Lt", "Le"):
            upper = ("<" if kind == "Lt" else "<=", getattr(m, kind.lower()))
    if lower and upper:
        text = f"{lower[1]:g} {lower[0]} {key} {upper[0]} {upper[1]:g}"
    elif lower:  # `key > 0` reads better than `0 < key`
        text = f"{key} {lower[0].replace('<', '>')} {lower[1]:g}"
    elif upper:
        text = f"{key} {upper[0]} {upper[1]:g}"
    else:
        return None
    if type(None) in getattr(field.annotation, "__args__", ()):
        text += ", or null for the default"
    return text


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = closest_key(key)
            lines.append(f"  - unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        elif e["type"] == "literal_error":
            lines.append(f"  - '{key}' = {e['input']!r}: {e['msg'].lower()}")
        elif e["type"] == "value_error":
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
        else:
            allowed = allowed_range(e["loc"])
            lines.append(f"  - '{key}' = {e['input']!r}: {e['msg'].lower()}" +
                         (f" (allowed: {allowed})" if allowed else ""))
    return (
        f"The run config from {source} has {len(lines)} problem(s):\n" + "\n".join(lines) +
        "\nFix these keys in the YAML file or the key=value overrides; every valid key and its "
        "default is listed in dsgpt/config.py."
    )


def build_config(data: dict, source: str = "the run config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_errors(err, source)) from None


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> Config:
    """Load a run YAML (or start from defaults), apply dotted overrides, validate."""
    data: dict = {}
    source = "defaults"
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(
                f"The config file '{path}' does not exist. Pass an existing YAML file with "
                f"--config, e.g. configs/tiny.yaml."
            )
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"The config file '{path}' is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"The config file '{path}' must hold a mapping of sections, got {type(data).__name__}.")
        source = f"'{path}'"
        # A config named after its file is the natural default run name. (`run:` with nothing
        # under it reads as None; a non-mapping `run` is left for validation to report.)
        if data.get("run") is None:
            data["run"] = {}
        if isinstance(data["run"], dict):
            data["run"].setdefault("name", p.stem)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += f" with {len(overrides)} command-line override(s)"
    return build_config(data, source)


def resolve_path(path: str) -> Path:
    """Config paths are relative to the working directory, or else to the repo (ds_configs/...)."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    in_repo = REPO_ROOT / p
    return in_repo if in_repo.exists() else p


def save_config(cfg: Config, path: Path) -> None:
    from dsgpt.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
