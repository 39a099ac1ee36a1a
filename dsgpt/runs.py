"""Reading a run's checkpoints without an engine: which tag `latest`/`best` name, whether a
checkpoint is complete, the state dsgpt saved beside DeepSpeed's files, and the full model weights
from any ZeRO stage.

Layout of `runs/NAME/checkpoints/`:
    step0000010/            one DeepSpeed tag: model + optimizer + scheduler shards
        rng_rank00000.json  each rank's RNG states (DeepSpeed does not save them)
        dsgpt_state.json    step, model/data/seed fingerprint, eval and early-stop state (rank 0)
        manifest.json       every file of the tag with its size, written last: the tag is
                            intact when the files on disk match it
    latest                  the tag to resume from; moved only after every rank finished writing
    best                    the tag with the lowest validation loss, kept out of pruning

Everything dsgpt itself writes here is JSON. DeepSpeed's own `*.pt` files are pickles that torch
must unpickle to load: a checkpoint from elsewhere has to be trusted like code.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dsgpt.data.builtin import data_dir
from dsgpt.errors import UserError

TAG_RE = re.compile(r"^step(\d{7,})$")
STATE_FILE = "dsgpt_state.json"
MANIFEST_FILE = "manifest.json"


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def list_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def tag_files(tag_dir: Path) -> dict[str, int]:
    """Every file under a tag dir (relative path -> size), the manifest itself and temp files left out."""
    files = {}
    for p in sorted(tag_dir.rglob("*")):
        rel = p.relative_to(tag_dir).as_posix()
        if p.is_file() and rel != MANIFEST_FILE and not p.name.endswith(".tmp"):
            files[rel] = p.stat().st_size
    return files


def damage(tag_dir: Path) -> Optional[str]:
    """Why the checkpoint in `tag_dir` cannot be used, or None when it is intact.

    A checkpoint is intact when its manifest (written last) matches the files on disk. One written
    before manifests existed is taken as intact when its state file is there."""
    if not (tag_dir / STATE_FILE).is_file():
        return f"it has no {STATE_FILE} (the save did not finish)"
    manifest_path = tag_dir / MANIFEST_FILE
    if not manifest_path.exists():
        return None
    try:
        expected = json.loads(manifest_path.read_bytes())["files"]
        if not isinstance(expected, dict):
            raise ValueError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST_FILE} is unreadable ({err})"
    on_disk = tag_files(tag_dir)
    for name, size in expected.items():
        if name not in on_disk:
            return f"{name} is missing"
        if on_disk[name] != size:
            return f"{name} is {on_disk[name]} bytes, the manifest says {size}"
    return None


def intact_tags(ckpt_dir: Path) -> list[str]:
    return [t for t in list_tags(ckpt_dir) if damage(ckpt_dir / t) is None]


def read_pointer(ckpt_dir: Path, name: str = "latest") -> Optional[str]:
    """The tag named by `latest` (or `best`); None when there is no such pointer."""
    pointer = ckpt_dir / name
    if not pointer.exists():
        return None
    try:
        # Bytes, not text: a pointer damaged by a crash or a bad disk may not be valid UTF-8.
        tag = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    except OSError as err:  # e.g. `latest` is a folder, or unreadable
        tag = f"<unreadable: {err.strerror or err}>"
    if not TAG_RE.match(tag) or not (ckpt_dir / tag).is_dir():
        found = ", ".join(list_tags(ckpt_dir)) or "none"
        raise UserError(
            f"The checkpoint pointer '{pointer}' is corrupt: it names {tag[:60]!r}, which is not a "
            f"checkpoint in that folder (checkpoints found: {found}). Point train.resume to "
            f"one of them (e.g. train.resume={ckpt_dir / (list_tags(ckpt_dir) or ['stepNNNNNNN'])[-1]}), "
            f"or write its name into '{pointer}'."
        )
    return tag


def read_state(tag_dir: Path) -> dict:
    try:
        state = json.loads((tag_dir / STATE_FILE).read_bytes())
        if not isinstance(state, dict):
            raise ValueError(f"{STATE_FILE} holds a {type(state).__name__}, not an object")
        return state
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        others = [t for t in list_tags(tag_dir.parent) if t != tag_dir.name]
        raise UserError(
            f"The checkpoint '{tag_dir}' is incomplete or corrupt ({err}). Resume from another "
            f"checkpoint with train.resume=PATH (other checkpoints there: {', '.join(others) or 'none'}), "
            f"or delete this one."
        ) from None


@dataclass
class ResumePoint:
    ckpt_dir: Path
    tag: str
    note: str = ""  # why this is not the checkpoint `latest` names, when it is not

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag


def locate(resume: str, ckpt_dir: Path) -> Optional[ResumePoint]:
    """Where to resume from, or None for a fresh start.

    `auto` continues this run's `latest` when that checkpoint is intact, else the newest intact
    one (saying which and why); an explicit path must hold a checkpoint: a tag dir, a checkpoints
    dir with `latest`, or a run dir.
    """
    if resume == "never":
        return None
    if resume != "auto":
        return locate_path(Path(resume), "train.resume")
    tag = read_pointer(ckpt_dir)
    if tag is not None:
        why = damage(ckpt_dir / tag)
        if why is None:
            return ResumePoint(ckpt_dir, tag)
        problem = f"the checkpoint `latest` names, {tag}, is damaged: {why}"
    else:
        problem = "no `latest` pointer was written"
    good = intact_tags(ckpt_dir)
    if not good:
        if tag is None:
            return None  # nothing was ever saved completely: a fresh start
        raise UserError(f"Cannot resume from '{ckpt_dir}': {problem}, and no other checkpoint there is "
                        f"intact. Delete the folder to start the run afresh, or choose a new run.name.")
    return ResumePoint(ckpt_dir, good[-1], note=f"{problem}; resuming from the newest intact checkpoint, "
                                                f"{good[-1]}, instead")


def locate_path(path: Path, key: str) -> ResumePoint:
    if (path / STATE_FILE).is_file():
        _refuse_damaged(path, key)
        return ResumePoint(path.parent, path.name)
    for candidate in (path, path / "checkpoints"):
        tag = read_pointer(candidate) if candidate.is_dir() else None
        if tag:
            _refuse_damaged(candidate / tag, key)
            return ResumePoint(candidate, tag)
    other = {"train.resume": "set train.resume=auto to continue this run's own checkpoints (a fresh start "
                             "when none exist)",
             "train.init_from": "give a Hugging Face GPT-2 model dir (config.json, weights, tokenizer.json)"}
    raise UserError(
        f"{key}={path} holds no checkpoint: expected a checkpoint folder (with {STATE_FILE}), a "
        f"checkpoints folder with a 'latest' file, or a run folder. Check the path, or "
        f"{other.get(key, 'point it at a run dir')}."
    )


def _refuse_damaged(tag_dir: Path, key: str) -> None:
    why = damage(tag_dir)
    if why:
        others = [t for t in intact_tags(tag_dir.parent) if t != tag_dir.name]
        raise UserError(f"{key}: the checkpoint '{tag_dir}' is damaged ({why}). Point {key} at an intact "
                        f"checkpoint (intact ones beside it: {', '.join(others) or 'none'}).")


# What each fingerprint key means, for the message when a resumed config differs from the checkpoint.
_FINGERPRINT_KEYS = {
    "model": "the model shape",
    "data_sha256": "the data",
    "data_pack": "data.pack (packed chat rows or one example per row: other batches)",
    "seed": "run.seed (each step's batch and the dropout masks follow from it)",
}


def check_compatible(saved: dict, fingerprint: dict, where: Path) -> None:
    """Refuse to continue a run whose model shape, data or seed differ from this config.

    A key the checkpoint does not record (written by an earlier dsgpt) is not compared."""
    problems = []
    for key, meaning in _FINGERPRINT_KEYS.items():
        if key in saved and saved.get(key) != fingerprint.get(key):
            problems.append(f"{key} ({meaning}): checkpoint has {saved.get(key)}, this config gives "
                            f"{fingerprint.get(key)}")
    if problems:
        raise UserError(
            f"The checkpoint in '{where}' belongs to a different run: " + "; ".join(problems) +
            ". Resuming would load weights into the wrong shape, continue on other data or with other "
            "random draws. To start a new run from this config, choose a new run.name (or run.out_dir); "
            "to continue the old run, put its values back."
        )


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """Full fp32 model weights from a checkpoint of any ZeRO stage, on CPU, in one process."""
    tag_dir = ckpt_dir / tag
    states = sorted(tag_dir.glob("*model_states.pt"))
    if not states:
        raise UserError(f"The checkpoint '{tag_dir}' has no model states file; it is incomplete. "
                        f"Use another checkpoint.")
    try:  # tensors and plain containers only: a crafted pickle cannot run code here
        first = torch.load(states[0], map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"'{states[0]}' holds more than tensors and plain values ({str(err).splitlines()[0]}), "
                        f"so dsgpt will not load it. Use a checkpoint written by DeepSpeed's save_checkpoint "
                        f"that you trust.") from None
    stage = int((first.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        sd = first["module"]  # complete on every rank without ZeRO
    else:
        import contextlib
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()):  # it narrates on stdout; keep stdout for results
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float() for k, v in sd.items()}


def tokenizer_dir(cfg) -> Path:
    """The data dir whose tokenizer.json a run config's model reads: data.path's, or with data.mix
    its first source's (every source shares it)."""
    if cfg.data.mix:
        from dsgpt.config import resolve_path
        return resolve_path(cfg.data.mix[0].path)
    return data_dir(cfg.data.path, cfg.data.builtin_vocab_size)


def resolve_checkpoint(run_dir, which: str = "latest"):
    """(run config, tag, GPTConfig) of a run's intact checkpoint, without reading its weights.

    `which` is `latest`, `best` or a tag name; anything missing or damaged is a UserError."""
    from dsgpt.config import load_config
    from dsgpt.model import GPTConfig
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"The run dir '{run_dir}' does not exist. Pass --run runs/NAME of a run that "
                        f"launch/train.py wrote (its run.out_dir/run.name).")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run dir (no config.yaml). Pass --run runs/NAME of a run "
                        f"that launch/train.py wrote.")
    cfg = load_config(str(run_dir / "config.yaml"))
    ckpt_dir = run_dir / "checkpoints"
    tag = read_pointer(ckpt_dir, which) if which in ("latest", "best") else which
    if not tag or not (ckpt_dir / tag / STATE_FILE).is_file():
        found = ", ".join(list_tags(ckpt_dir)) or "none"
        raise UserError(f"The run '{run_dir}' has no '{which}' checkpoint (checkpoints found: {found}). "
                        f"Train it first, or pick one of the checkpoints listed.")
    why = damage(ckpt_dir / tag)
    if why:
        others = [t for t in intact_tags(ckpt_dir) if t != tag]
        raise UserError(f"The checkpoint '{ckpt_dir / tag}' of run '{run_dir}' is damaged ({why}). "
                        f"Pick an intact one with --checkpoint (intact: {', '.join(others) or 'none'}).")
    shape = read_state(ckpt_dir / tag).get("model")
    if not isinstance(shape, dict):
        raise UserError(f"The checkpoint '{ckpt_dir / tag}' records no model shape in its {STATE_FILE}; "
                        f"it was not written by this version of dsgpt. Use another checkpoint.")
    return cfg, tag, GPTConfig(**shape, bias=cfg.model.bias, dropout=0.0)


def load_model(run_dir, which: str = "latest"):
    """A trained model from a run dir, in one process on CPU, in eval mode.

    `which` is `latest`, `best` or a tag name. Returns (model, run config, tag).
    """
    from dsgpt.model import GPT
    cfg, tag, mcfg = resolve_checkpoint(run_dir, which)
    ckpt_dir = Path(run_dir) / "checkpoints"
    model = GPT(mcfg)
    sd = consolidated_state_dict(ckpt_dir, tag)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # The output layer is tied to the embedding; ZeRO's consolidation may store it once.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"The checkpoint '{ckpt_dir / tag}' does not match its model: missing {missing}, "
                        f"unexpected {unexpected}. It may come from another version of dsgpt.")
    model.lm_head.weight = model.transformer.wte.weight
    return model.eval(), cfg, tag


def tokenizer_of(path) -> str:
    """`path` itself, or for a run dir (runs/NAME) the tokenizer.json of the data it trained on."""
    run_dir = Path(path).expanduser()
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "checkpoints").is_dir():
        return str(path)
    from dsgpt.config import load_config
    cfg = load_config(str(run_dir / "config.yaml"))
    file = tokenizer_dir(cfg) / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"The run '{run_dir}' was trained on the data in '{file.parent}', which holds no "
                        "tokenizer.json any more. Restore that data dir, or pass --tokenizer its tokenizer.json.")
    return str(file)


def load_tokenizer_for(cfg):
    from dsgpt.data.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_dir(cfg))


def run_tokenizer(run_dir, cfg, tag: Optional[str] = None, model_vocab: Optional[int] = None):
    """(tokenizer, EOS id) a run trained with: its data dir's tokenizer.json and meta's eos_id.

    The run dir keeps no copy of them, so a run whose data dir is gone cannot say which text its
    token ids stand for: that is an error naming the dir, not a guess. With `tag`, the tokenizer
    must be the one that checkpoint recorded; with `model_vocab`, every id must have a row."""
    from dsgpt.data.tokenizer import configured_eos, eos_id, load_tokenizer
    path = tokenizer_dir(cfg)
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"The run '{run_dir}' was trained on the data in '{path}' (data.path in its config.yaml), "
                        f"which holds no tokenizer.json any more, and its tokenizer is needed here. Restore that "
                        f"data dir, or set data.path in '{Path(run_dir) / 'config.yaml'}' to a copy of it.")
    tok = load_tokenizer(path)
    _check_run_tokenizer(tok, path, Path(run_dir), tag, model_vocab)
    try:
        eos = int(json.loads((path / "meta.json").read_bytes())["eos_id"])
    except (OSError, ValueError, KeyError, TypeError):  # meta unreadable: the tokenizer's own EOS
        eos = eos_id(tok, configured_eos(path))
    return tok, eos


def _check_run_tokenizer(tok, data_path: Path, run_dir: Path, tag: Optional[str], model_vocab: Optional[int]) -> None:
    """The data dir's tokenizer must still be the run's: a data dir prepared again with another
    tokenizer would turn every id into another piece of text without any other sign."""
    from dsgpt.data.tokenizer import vocab_hash
    recorded = read_state(run_dir / "checkpoints" / tag).get("vocab_sha256") if tag else None
    size = tok.get_vocab_size(with_added_tokens=True)
    found = vocab_hash(tok) if recorded else None
    if recorded and found != recorded:
        problem = f"checkpoint {tag} was trained with vocab sha256 {recorded}, the data dir now holds {found}"
    elif model_vocab is not None and size > model_vocab:
        problem = f"its {size} tokens do not fit the model's {model_vocab} embedding rows"
    else:
        return
    raise UserError(f"The tokenizer in '{data_path}' (data.path of run '{run_dir}') is not the one the run was "
                    f"trained with: {problem}. The data dir was prepared again with another tokenizer. Restore "
                    f"the original data dir, or set data.path in '{run_dir / 'config.yaml'}' to a copy of it.")
