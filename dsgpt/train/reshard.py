"""Resume a run on another number of ranks or under another ZeRO stage, optimizer state and all.

DeepSpeed loads a ZeRO checkpoint only on the data-parallel size and stage that wrote it. Its
universal checkpoint is the supported way across both: `ds_to_universal` turns the sharded files
into one folder per parameter (fp32 weights, Adam's exp_avg / exp_avg_sq, step), and an engine
built with `"checkpoint": {"load_universal": true}` cuts them up for its own layout. This module
drives that, and fills in what DeepSpeed 0.19.8 leaves out (verified on CPU/gloo):

- `ds_to_universal` asserts on checkpoints saved without `universal_checkpoint_info` (dsgpt's
  are): converted with its own `inject_missing_state` switch.
- A universal folder converted from ZeRO 1/2 loads only into ZeRO 1/2, one from ZeRO 3 only into
  ZeRO 3: the model-states file names, the per-parameter file formats (dict vs bare tensor), the
  `step` files (absent from ZeRO 3) and `zero/optimizer_state.pt` differ. `_normalize` writes
  the union, so any source loads into any target stage.
- ZeRO 3's universal load gives every parameter group the first group's hyperparameters (its
  weight decay lands on the biases and LayerNorms), and one shared step tensor to all its
  sub-groups (torch's Adam then counts each step once per sub-group):
  `_restore_group_hyperparameters` and `_unshare_steps` undo both.
- ZeRO 0 has no partitioned optimizer files and DeepSpeed no universal path for it: a ZeRO-0
  checkpoint (torch AdamW state inside the model-states file) is written into the universal
  layout here, and a ZeRO-0 fp32 engine (GuardedAdamW, no DeepSpeed wrapper) is loaded from it
  here. ZeRO 0 under bf16/fp16 has a DeepSpeed wrapper with its own layout: refused.

The global batch stays what the checkpoint trained with; the micro batch is this launch's and
gradient accumulation becomes global / (micro x ranks), refused when not a whole number. Each
step's global batch is a pure function of (seed, step), so the same sequences follow. RNG states
belong to the old ranks, so each new rank is seeded from (seed, rank, step).

The conversion is done once, by rank 0 behind a barrier, into `<tag>/universal/` (a temp folder
renamed into place when complete; reused by later resumes; pruned with its tag).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dsgpt import dist
from dsgpt.errors import UserError
from dsgpt.train.engine import IMPLEMENTATION_KEYS

UNIVERSAL_DIR = "universal"
DONE_FILE = "dsgpt_universal.json"  # written last inside the temp folder, before the rename
FORMAT = 1
# In the universal layout: zero/<param name>/<key>.pt
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
Z12_MODEL_FILE = "mp_rank_00_model_states.pt"
Z3_MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


# ---- what a checkpoint was saved with ---------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    world_size: int  # data-parallel ranks
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int
    train_batch_size: int  # the global batch: micro x GAS x ranks
    precision: str  # fp32 | bf16 | fp16


def _model_state_files(tag_dir: Path) -> list[Path]:
    files = sorted(tag_dir.glob("*model_states.pt"))
    return [f for f in files if not (f.name.startswith("layer_") and "_expert_" in f.name)]


def _load_pt(path: Path, mmap: bool = False):
    """A DeepSpeed pickle (trusted like code, as every DeepSpeed checkpoint). `mmap` reads the
    metadata of a large file without pulling its tensors into memory."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except RuntimeError:
        if mmap:  # an old (non-zip) torch file cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=False)
        raise


def _precision(ds_config: dict) -> str:
    if (ds_config.get("bf16") or {}).get("enabled"):
        return "bf16"
    if (ds_config.get("fp16") or {}).get("enabled"):
        return "fp16"
    return "fp32"


def layout_of_ds_config(ds_config: dict, world_size: int) -> Layout:
    return Layout(world_size=int(world_size),
                  zero_stage=int((ds_config.get("zero_optimization") or {}).get("stage", 0)),
                  micro_batch_size=int(ds_config["train_micro_batch_size_per_gpu"]),
                  grad_accum_steps=int(ds_config["gradient_accumulation_steps"]),
                  train_batch_size=int(ds_config["train_batch_size"]),
                  precision=_precision(ds_config))


def saved_layout(tag_dir: Path) -> Layout:
    """What DeepSpeed recorded in the checkpoint's model-states file: its data-parallel size and
    the DeepSpeed config it ran with (ZeRO stage, batch sizes, precision)."""
    files = _model_state_files(tag_dir)
    if not files:
        raise UserError(f"The checkpoint '{tag_dir}' has no DeepSpeed model-states file (*model_states.pt); it "
                        f"is incomplete. Resume from another checkpoint with train.resume=PATH.")
    sd = _load_pt(files[0], mmap=True)
    ds_config = sd.get("ds_config") or {}
    try:
        layout = layout_of_ds_config(ds_config, sd["dp_world_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"The checkpoint '{tag_dir}' does not record the layout it was saved with ({files[0].name} "
                        f"lacks {err}); it was not written by DeepSpeed's save_checkpoint. Resume it on the same "
                        f"number of ranks and ZeRO stage it was saved with.") from None
    del sd
    return layout


# ---- the plan: does the layout change, and what follows from it --------------------------------


def grad_accum_for(train_batch_size: int, micro_batch_size: int, world_size: int, where: str = "") -> int:
    """Gradient accumulation that keeps the global batch on `world_size` ranks of `micro_batch_size`."""
    per_step = micro_batch_size * world_size
    if micro_batch_size < 1 or world_size < 1 or train_batch_size % per_step:
        fits = [m for m in range(1, train_batch_size + 1) if train_batch_size % (m * world_size) == 0]
        raise UserError(
            f"Cannot resume{(' ' + where) if where else ''} on {world_size} rank(s): the checkpoint trained with "
            f"a global batch of {train_batch_size} sequences per step, and {train_batch_size} is not a whole "
            f"number of micro batches of {micro_batch_size} on {world_size} rank(s) "
            f"({train_batch_size} / ({micro_batch_size} x {world_size}) = {train_batch_size / max(per_step, 1):g}). "
            f"Keeping the global batch keeps the run the same run. Set train.micro_batch_size to one of "
            f"{fits or 'none'} on {world_size} rank(s), or launch on a number of ranks that divides "
            f"{train_batch_size // max(micro_batch_size, 1) if micro_batch_size else train_batch_size}.")
    return train_batch_size // per_step


@dataclass(frozen=True)
class Reshard:
    """A resume whose layout (ranks or ZeRO stage) differs from the checkpoint's."""
    tag_dir: Path
    saved: Layout
    target: Layout  # grad_accum_steps / train_batch_size already the ones to run with

    @property
    def grad_accum_steps(self) -> int:
        return self.target.grad_accum_steps

    @property
    def via_universal(self) -> bool:
        """ZeRO 0 -> ZeRO 0 needs none: every rank's file holds the whole state, and DeepSpeed
        loads it on any number of ranks."""
        return not (self.saved.zero_stage == 0 and self.target.zero_stage == 0)

    def describe(self) -> str:
        s, t = self.saved, self.target
        how = "through a universal checkpoint" if self.via_universal else "(ZeRO 0 holds the whole state)"
        return (f"resuming '{self.tag_dir}' (saved on {s.world_size} rank(s) under ZeRO {s.zero_stage}) on "
                f"{t.world_size} rank(s) under ZeRO {t.zero_stage} {how}: optimizer "
                f"and schedule carried over; gradient accumulation {t.grad_accum_steps} (was "
                f"{s.grad_accum_steps}) x micro batch {t.micro_batch_size} keeps the global batch of "
                f"{t.train_batch_size}; RNGs re-seeded from (run.seed, rank, step)")


def plan(tag_dir: Path, world_size: int, ds_config: dict) -> Optional[Reshard]:
    """None when the checkpoint in `tag_dir` was saved on `world_size` ranks under the ZeRO stage
    of `ds_config` (a plain DeepSpeed load does); else how to resume it on this layout.

    `ds_config` is this launch's resolved config: its micro batch stays, its gradient
    accumulation is replaced by `Reshard.grad_accum_steps` (re-resolve with it)."""
    tag_dir = Path(tag_dir)
    saved = saved_layout(tag_dir)
    current = layout_of_ds_config(ds_config, world_size)
    if saved.world_size == current.world_size and saved.zero_stage == current.zero_stage:
        return None
    how = (f"(saved on {saved.world_size} rank(s) under ZeRO {saved.zero_stage}, now {current.world_size} "
           f"rank(s) under ZeRO {current.zero_stage})")
    if saved.precision != current.precision:
        raise UserError(
            f"Cannot resume '{tag_dir}' on another layout {how} and another precision at once: it was saved "
            f"with precision={saved.precision}, this launch uses precision={current.precision}. Set "
            f"precision={saved.precision} to resume it.")
    if current.zero_stage == 0 and current.precision != "fp32":
        raise UserError(
            f"Cannot resume '{tag_dir}' {how} under ZeRO 0 with precision={current.precision}: DeepSpeed wraps "
            f"the optimizer there in its own {current.precision} optimizer, which has no universal-checkpoint "
            f"load. Resume under ZeRO 1 or more (deepspeed.zero_stage=1), or on {saved.world_size} rank(s) "
            f"under ZeRO {saved.zero_stage}.")
    gas = grad_accum_for(saved.train_batch_size, current.micro_batch_size, current.world_size, f"'{tag_dir}'")
    target = Layout(world_size=current.world_size, zero_stage=current.zero_stage,
                    micro_batch_size=current.micro_batch_size, grad_accum_steps=gas,
                    train_batch_size=saved.train_batch_size, precision=current.precision)
    return Reshard(tag_dir=tag_dir, saved=saved, target=target)


def configure(ds_config: dict, reshard: Optional[Reshard]) -> dict:
    """The DeepSpeed config to initialize with: DeepSpeed reads `load_universal` at initialize.

    ZeRO 0 has no universal load in DeepSpeed (this module loads it), so nothing is set there."""
    if reshard is None or reshard.target.zero_stage == 0:
        return ds_config
    out = dict(ds_config)
    out["checkpoint"] = dict(out.get("checkpoint") or {}, load_universal=True)
    return out


# ---- the conversion ---------------------------------------------------------------------------


def universal_dir(tag_dir: Path) -> Path:
    return Path(tag_dir) / UNIVERSAL_DIR


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / DONE_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def ensure_universal(tag_dir: Path, optimizer_param_names: list[list[str]]) -> Path:
    """`<tag>/universal/`, converting the checkpoint first if no complete conversion is there.

    One process only (rank 0 in `load`). The conversion goes into a temp folder that is renamed
    into place when complete, so a crash leaves either nothing or a whole folder.

    `optimizer_param_names`: the parameter names of each optimizer group in order (see
    `optimizer_param_names`); used for ZeRO-0 checkpoints, whose optimizer state is by index."""
    tag_dir = Path(tag_dir)
    final = universal_dir(tag_dir)
    if _is_complete(final):
        return final
    if final.exists():  # a folder without its completion mark is nobody's: start again
        shutil.rmtree(final)
    for stale in tag_dir.glob(f".{UNIVERSAL_DIR}-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    work = tag_dir / f".{UNIVERSAL_DIR}-{os.getpid()}.tmp"
    out = work / UNIVERSAL_DIR  # ds_to_universal writes `latest_universal` beside it: inside `work`
    try:
        if any(tag_dir.glob("*optim_states.pt")):  # ZeRO 1-3 (and DeepSpeed's bf16 optimizer) shard files
            _run_ds_to_universal(tag_dir, out)
        else:
            _zero0_to_universal(tag_dir, out, optimizer_param_names)
        _normalize(out)
        (out / DONE_FILE).write_text(json.dumps({"format": FORMAT, "source": vars(saved_layout(tag_dir))}))
        try:
            os.replace(out, final)
        except OSError:
            if not _is_complete(final):  # else another launch finished the same conversion first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _run_ds_to_universal(tag_dir: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal
    # Its main() takes argparse's namespace; these are its command-line defaults except: one
    # worker each (no process pool forked from a rank that holds a process group) and
    # inject_missing_state (dsgpt's checkpoints carry no universal_checkpoint_info).
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # it narrates; tqdm bars
            ds_to_universal.main(args)
    except Exception as err:
        raise UserError(
            f"DeepSpeed could not convert the checkpoint '{tag_dir}' to a universal checkpoint "
            f"({type(err).__name__}: {err}), so it cannot be resumed on another layout. Resume it on the number "
            f"of ranks and ZeRO stage it was saved with. DeepSpeed's output:\n{log.getvalue()[-2000:]}") from None


def _zero0_to_universal(tag_dir: Path, out: Path, names_by_group: list[list[str]]) -> None:
    """ZeRO 0 keeps the whole torch optimizer state (by parameter index) in the model-states file:
    write it out per parameter name, in the layout ds_to_universal produces."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM
    model_file = _model_state_files(tag_dir)[0]
    sd = _load_pt(model_file)
    optim = sd.get("optimizer")
    if not (isinstance(optim, dict) and "state" in optim and "param_groups" in optim):
        raise UserError(f"The ZeRO-0 checkpoint '{tag_dir}' holds no plain optimizer state in {model_file.name} "
                        f"(it was saved through a DeepSpeed {_precision(sd.get('ds_config') or {})} optimizer "
                        f"wrapper), so it cannot be resumed on another layout. Resume it on "
                        f"{sd.get('dp_world_size')} rank(s) under ZeRO 0.")
    groups = optim["param_groups"]
    if [len(g["params"]) for g in groups] != [len(n) for n in names_by_group]:
        raise UserError(f"The checkpoint '{tag_dir}' has optimizer groups of {[len(g['params']) for g in groups]} "
                        f"parameters, this model {[len(n) for n in names_by_group]}: it belongs to another model. "
                        f"Resume it with the model config it was trained with.")
    module = sd["module"]
    steps = set()
    for group, names in zip(groups, names_by_group):
        for index, name in zip(group["params"], names):
            state = optim["state"].get(index)
            weight = module[name]
            if not state or tuple(state["exp_avg"].shape) != tuple(weight.shape):
                raise UserError(f"The checkpoint '{tag_dir}' has no Adam state of shape {tuple(weight.shape)} for "
                                f"{name}; it belongs to another model or was saved before the first step.")
            folder = out / "zero" / name
            folder.mkdir(parents=True, exist_ok=True)
            values = {"fp32": weight.float(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
            for key, value in values.items():
                torch.save({PARAM: value.detach().float().clone(), CAT_DIM: 0}, folder / f"{key}.pt")
            torch.save(state["step"], folder / "step.pt")
            steps.add(float(state["step"]))
    if len(steps) != 1:
        raise UserError(f"The checkpoint '{tag_dir}' holds Adam step counts {sorted(steps)}; dsgpt steps every "
                        f"parameter together. It cannot be resumed on another layout.")
    from deepspeed import __version__
    from deepspeed.checkpoint.constants import DS_VERSION
    torch.save({"param_groups": groups, DS_VERSION: __version__}, out / "zero" / "optimizer_state.pt")
    sd["optimizer"] = None  # the state now lives per parameter; the rest (scheduler, steps) is read from here
    torch.save(sd, out / Z12_MODEL_FILE)


def _normalize(out: Path) -> None:
    """Make a universal folder loadable by any target stage (see the module docstring)."""
    from deepspeed import __version__
    from deepspeed.checkpoint.constants import CAT_DIM, DS_VERSION, OPTIMIZER_STATE_DICT, PARAM
    zero = out / "zero"
    optim_path = zero / "optimizer_state.pt"
    optim = torch.load(optim_path, map_location="cpu", weights_only=False)
    steps = []
    if OPTIMIZER_STATE_DICT in optim:  # from ZeRO 3: one step per sub-group
        steps = [s["step"] for s in optim[OPTIMIZER_STATE_DICT]["state"].values() if "step" in s]
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        if (param_dir / "step.pt").is_file():
            steps.append(torch.load(param_dir / "step.pt", weights_only=False))
    if not steps or len({float(s) for s in steps}) != 1:
        raise UserError(f"The universal checkpoint '{out}' holds Adam step counts {sorted({float(s) for s in steps})} "
                        f"where dsgpt expects one; it cannot be resumed on another layout.")
    step = steps[0]
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        has_optimizer_state = (param_dir / "exp_avg.pt").is_file()
        for key in STATE_KEYS:
            path = param_dir / f"{key}.pt"
            if path.is_file():
                value = torch.load(path, map_location="cpu", weights_only=False)
                if not isinstance(value, dict):  # ZeRO 3 writes bare flat tensors; ZeRO 1/2 loaders want dicts
                    torch.save({PARAM: value, CAT_DIM: 0}, path)
        if has_optimizer_state and not (param_dir / "step.pt").is_file():  # ZeRO 3 writes none
            torch.save(step, param_dir / "step.pt")
    # ZeRO 1/2 loaders read `param_groups` and assert a DeepSpeed version; ZeRO 3's read the step
    # and the groups from a torch optimizer state_dict.
    # ZeRO 3's file also holds rank 0's flat weights and moments, which no loader reads: drop them.
    optim.setdefault(DS_VERSION, __version__)
    optim.pop("fp32_flat_groups", None)
    optim[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]}
    torch.save(optim, optim_path)
    # DeepSpeed reads the scheduler and counters from a model-states file whose name depends on
    # the loading stage: give both names (hard links: no copy of the weights).
    z12, z3 = out / Z12_MODEL_FILE, out / Z3_MODEL_FILE
    source = z12 if z12.is_file() else z3
    for name in (z12, z3):
        if not name.is_file():
            try:
                os.link(source, name)
            except OSError:
                shutil.copy2(source, name)


# ---- loading ----------------------------------------------------------------------------------


def optimizer_param_names(module, weight_decay: float = 0.0) -> list[list[str]]:
    """The parameter names of each optimizer group, in the order dsgpt builds the groups."""
    from dsgpt.model import param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in param_groups(module, weight_decay)]


def load(engine, reshard: Reshard, rank: int) -> str:
    """Restore model, optimizer (Adam moments and step), LR schedule and DeepSpeed's counters from
    a checkpoint saved on another layout. All ranks call it, after `deepspeed.initialize` with
    `configure(...)`'s config. Returns a line for the log."""
    tag_dir = reshard.tag_dir
    target_stage = engine.zero_optimization_stage()
    if target_stage != reshard.target.zero_stage or engine.world_size != reshard.target.world_size:
        raise RuntimeError(f"engine is ZeRO {target_stage} on {engine.world_size} rank(s), the plan says "
                           f"ZeRO {reshard.target.zero_stage} on {reshard.target.world_size}")
    if not reshard.via_universal:
        path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint '{tag_dir}'. It may be incomplete; resume "
                            f"from an earlier one with train.resume=PATH.")
        return reshard.describe()
    if target_stage > 0 and not engine.load_universal_checkpoint():
        raise RuntimeError("build the engine with reshard.configure(ds_config, plan): DeepSpeed reads "
                           "checkpoint.load_universal at initialize")
    names = optimizer_param_names(engine.module)
    failure = None
    if rank == 0:
        try:
            ensure_universal(tag_dir, names)
        except Exception as err:  # every rank must leave the barrier, then fail together
            failure = err
    (failed,) = dist.all_reduce_max([1.0 if failure else 0.0], torch.device("cpu") if not _on_gpu(engine)
                                    else engine.device)
    if failure:
        raise failure
    if failed:
        raise UserError(f"Rank 0 could not convert '{tag_dir}' to a universal checkpoint; its log says why.")
    folder = universal_dir(tag_dir)
    optim_sd = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    if target_stage == 0:
        _load_into_plain_optimizer(engine, folder, optim_sd)
    else:
        # DeepSpeed loads <dir>/<tag>: here the universal folder is <tag_dir>/universal.
        path, _ = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL_DIR, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"DeepSpeed loaded nothing from the universal checkpoint '{folder}'. Delete that "
                            f"folder (it is rebuilt from the checkpoint) and resume again.")
        _restore_group_hyperparameters(engine, optim_sd["param_groups"])
        _unshare_steps(engine)
    _check_steps(engine, folder)
    return reshard.describe()


def _on_gpu(engine) -> bool:
    return getattr(engine.device, "type", str(engine.device)) == "cuda"


def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _restore_group_hyperparameters(engine, saved_groups: list[dict]) -> None:
    """ZeRO 3's universal load copies group 0's hyperparameters into every group; put each back."""
    groups = _inner_optimizer(engine).param_groups
    if len(groups) != len(saved_groups):
        raise UserError(f"The checkpoint has {len(saved_groups)} optimizer parameter groups, this model "
                        f"{len(groups)}: it belongs to another model.")
    for group, saved in zip(groups, saved_groups):
        for key, value in saved.items():
            if key not in ("params", *IMPLEMENTATION_KEYS):  # the live optimizer's way of computing stays
                group[key] = value


def _unshare_steps(engine) -> None:
    """ZeRO 3's universal load puts one and the same step tensor into every sub-group's state;
    torch's Adam increments it in place, so it would advance once per sub-group and step."""
    for state in _inner_optimizer(engine).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _load_into_plain_optimizer(engine, folder: Path, optim_sd: dict) -> None:
    """ZeRO 0 in fp32: the engine holds the torch model and optimizer as they are; fill them in."""
    from deepspeed.checkpoint.constants import PARAM
    zero = folder / "zero"
    opt = engine.optimizer
    if hasattr(opt, "optimizer") or not isinstance(opt, torch.optim.Optimizer):
        raise UserError("A resume on another layout under ZeRO 0 needs the plain fp32 optimizer; this engine "
                        f"wraps it in {type(opt).__name__}. Resume under ZeRO 1 or more.")
    if len(opt.param_groups) != len(optim_sd["param_groups"]):
        raise UserError(f"The checkpoint has {len(optim_sd['param_groups'])} optimizer parameter groups, this "
                        f"model {len(opt.param_groups)}: it belongs to another model.")
    names = {id(p): n for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                d = zero / name
                if not (d / "fp32.pt").is_file():
                    raise UserError(f"The universal checkpoint '{folder}' has no weights for {name}: it belongs to "
                                    f"another model. Resume with the model config it was trained with.")
                state = {}
                for key in STATE_KEYS:
                    value = torch.load(d / f"{key}.pt", map_location="cpu", weights_only=False)[PARAM]
                    value = value.reshape(p.shape).to(device=p.device, dtype=torch.float32)
                    if key == "fp32":
                        p.copy_(value.to(p.dtype))
                    else:
                        state[key] = value.clone()
                step = torch.load(d / "step.pt", map_location="cpu", weights_only=False)
                state["step"] = (step.detach().clone().float() if torch.is_tensor(step)
                                 else torch.tensor(float(step)))
                opt.state[p] = state
    _restore_group_hyperparameters(engine, optim_sd["param_groups"])
    # The scheduler and DeepSpeed's counters, from the model-states file as DeepSpeed's own load would.
    sd = torch.load(folder / Z12_MODEL_FILE, map_location="cpu", weights_only=False)
    if engine.lr_scheduler is not None and sd.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(sd["lr_scheduler"])
    engine.global_steps = sd["global_steps"]
    engine.global_samples = sd.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = sd["skipped_steps"]


def _check_steps(engine, folder: Path) -> None:
    """After the load, Adam's step count on this rank must be the saved one (not a fresh 0)."""
    optim_sd = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT
    want = float(optim_sd[OPTIMIZER_STATE_DICT]["state"][0]["step"])
    have = {float(s["step"]) for s in _inner_optimizer(engine).state.values() if "step" in s}
    if have != {want}:
        raise UserError(f"After loading the universal checkpoint '{folder}', Adam's step count is {sorted(have)} "
                        f"instead of {want:g}: the optimizer state did not carry over. Delete that folder (it is "
                        f"rebuilt) and resume again, or resume on the layout the checkpoint was saved with.")


def seed_rngs(seed: int, rank: int, step: int) -> None:
    """A new layout's rank has no saved RNG state of its own: seed it from (seed, rank, step)."""
    from dsgpt.train import rng
    rng.seed_everything(rng.derived_seed(seed, rank, step))


# ---- reading the optimizer state back (tests, checks) ------------------------------------------


def full_adam_state(engine) -> tuple[dict, list[float]]:
    """{name: {"fp32", "exp_avg", "exp_avg_sq"}} of every parameter, whole (gathered over ranks),
    and the distinct Adam step counts on this rank. A collective under ZeRO: all ranks call it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    opt = engine.optimizer
    inner = _inner_optimizer(engine)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "bit16_groups"):
        # ZeRO 1/2 in DeepSpeed 0.19.8 links each parameter to its slice of the Adam state once,
        # right after the first group's first step, before any other group has state: later
        # groups' moments are then unreadable through safe_get_full_optimizer_state. Link again.
        from deepspeed.utils import lazy_init_hp_params_optimizer_state
        for i in range(len(inner.param_groups)):
            lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], opt.single_partition_of_fp32_groups[i],
                                                inner.state)
    out = {}
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            out[name] = {"fp32": safe_get_full_fp32_param(p).detach().float().cpu().clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                out[name][key] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
        else:  # ZeRO 0: the torch optimizer's own state
            st = inner.state.get(p, {})
            out[name] = {"fp32": p.detach().float().cpu().clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                out[name][key] = st[key].detach().float().cpu().clone() if key in st else None
    steps = sorted({float(s["step"]) for s in inner.state.values() if "step" in s})
    return out, steps
