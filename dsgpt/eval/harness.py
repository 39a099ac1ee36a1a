"""`dsgpt eval`: score a run's checkpoint on a list of tasks, in one process or on every rank of a
launch (see loaded.py for how ranks share the work); `score` does the same on a training run's
live engine.

Tasks:
  lm        the prepared val split: loss, perplexity and next-token accuracy over the same windows
            the trainer scores (see perplexity.py), and bits per byte over whole documents (bpb.py)
  gen:FILE  continue each prompt of a JSONL file, score against references (generation.py)
  NAME      any other name: an lm-evaluation-harness task (lm_eval_adapter.py)

Results go three ways: a table on stdout (the caller prints `format_table`), `eval/<tag>.json` in
the run dir, and TensorBoard scalars `eval/<task>/<metric>` at the checkpoint's step in `tb/`
(files from rank 0 only).
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from dsgpt.errors import UserError

TASKS = ("lm", "gen")  # dsgpt's own; any other bare name is an lm-evaluation-harness task
RUN_FACTS = "run"  # the results' key for how the evaluation ran (ranks, lockstep or split, ZeRO stage)


@dataclass
class Task:
    name: str               # the key in results: "lm", or "gen/<file stem>"
    kind: str               # one of TASKS, or "lm_eval"
    path: Optional[Path] = None


@dataclass
class EvalOptions:
    which: str = "latest"
    tasks: str = "lm"
    batches: Optional[int] = None      # lm windows: the run's train.eval_batches unless given
    batch_size: Optional[int] = None
    max_docs: Optional[int] = 100      # bits per byte: the first N val documents (None: all)
    max_new_tokens: int = 64
    dtype: str = "fp32"
    device: str = "auto"
    progress: Optional[bool] = None    # None: a bar when stderr is a terminal
    include_path: Optional[str] = None  # lm-eval: a folder of task YAMLs of your own
    limit: Optional[int] = None        # lm-eval: at most N examples per task
    zero_stage: Optional[int] = None   # on several ranks: how to share the model (default: the run's stage)
    bootstrap_iters: int = 100000      # lm-eval: resamples for standard errors (0: none)


def parse_tasks(spec: str) -> list[Task]:
    """`lm,gen:qa.jsonl,hellaswag` -> tasks; a bare name that is not lm is an lm-eval task (checked
    against lm-eval's index later); an unknown `kind:ARG` is a UserError naming the closest kinds."""
    tasks: list[Task] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, _, arg = item.partition(":")
        if kind not in TASKS and not arg:
            tasks.append(Task(kind, "lm_eval"))
            continue
        if kind not in TASKS:
            close = difflib.get_close_matches(kind, TASKS, n=2, cutoff=0.3)
            raise UserError(f"Unknown eval task '{kind}' in --tasks {spec!r}"
                            + (f" (closest: {', '.join(close)})" if close else "")
                            + ". Tasks: lm, gen:FILE.jsonl, or lm-eval task names.")
        if kind == "lm":
            if arg:
                raise UserError(f"The lm task takes no argument ('{item}' in --tasks); write just lm.")
            tasks.append(Task("lm", "lm"))
            continue
        if not arg:
            raise UserError(f"The gen task needs a file: gen:FILE.jsonl ('{item}' in --tasks).")
        path = Path(arg).expanduser()
        tasks.append(Task(f"gen/{path.stem}", "gen", path))
    names = [t.name for t in tasks]
    if not tasks:
        raise UserError("--tasks is empty; give lm and/or gen:FILE.jsonl, separated by commas.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--tasks names {', '.join(dup)} twice (gen tasks are named by file stem); "
                        f"rename one of the files or drop the repeat.")
    return tasks


def _check_options(opts: EvalOptions) -> None:
    for flag, value in (("--batches", opts.batches), ("--batch-size", opts.batch_size),
                        ("--max-docs", opts.max_docs), ("--max-new-tokens", opts.max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{flag} = {value}: must be an integer >= 1 (or left out for the default).")
    if opts.zero_stage not in (None, 0, 1, 2, 3):
        raise UserError(f"--zero-stage {opts.zero_stage} is not one of 0, 1, 2, 3.")
    if opts.dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype {opts.dtype!r} is not one of fp32, bf16.")


def checkpoint_step(run_dir: Path, tag: str) -> int:
    from dsgpt.runs import read_state
    return int(read_state(run_dir / "checkpoints" / tag).get("step", 0))


def prepare_tasks(opts: EvalOptions) -> tuple[list[Task], dict]:
    """(tasks, gen examples by task name), every input checked before any model is loaded."""
    from dsgpt.eval.generation import read_examples
    _check_options(opts)
    tasks = parse_tasks(opts.tasks)
    examples = {t.name: read_examples(t.path) for t in tasks if t.kind == "gen"}
    harness_tasks = [t.name for t in tasks if t.kind == "lm_eval"]
    if harness_tasks:
        from dsgpt.eval.lm_eval_adapter import check_task_names, task_manager
        check_task_names(harness_tasks, task_manager(opts.include_path))
    return tasks, examples


def run_eval(run_dir, opts: Optional[EvalOptions] = None) -> dict:
    """Evaluate a run's checkpoint on `opts.tasks`; rank 0 writes `eval/<tag>.json` and TensorBoard
    scalars in the run dir. Returns the results (on every rank)."""
    from dsgpt.eval import loaded
    from dsgpt.io import atomic_write_json
    from dsgpt.runs import run_tokenizer
    run_dir = Path(run_dir)
    opts = opts or EvalOptions()
    tasks, examples = prepare_tasks(opts)  # a typo costs no model load
    lm, cfg = loaded.load(run_dir, opts.which, opts.device, opts.dtype, opts.zero_stage)
    tok, eos = run_tokenizer(run_dir, cfg, lm.tag, lm.config.vocab_size)
    step = checkpoint_step(run_dir, lm.tag)
    out: dict = {"checkpoint": lm.tag, "step": step, "dtype": opts.dtype, RUN_FACTS: lm.facts()}
    progress = lm.is_main and (sys.stderr.isatty() if opts.progress is None else opts.progress)
    out.update(score(lm, cfg, tok, eos, tasks, examples, opts, progress))
    if lm.is_main:
        atomic_write_json(run_dir / "eval" / f"{lm.tag}.json", out)
        write_tensorboard(run_dir, step, out)
    return out


def score(lm, cfg, tok, eos: int, tasks: list[Task], examples: dict, opts: EvalOptions,
          progress: bool = False) -> dict:
    """Every task's results on a LoadedModel (a checkpoint, or a training run's live engine).

    Global RNG states are left as they were, so a training run that evaluates draws what it would
    have drawn without."""
    from dsgpt.eval.generation import run_generation
    from dsgpt.eval.rng_guard import keep_rng
    out: dict = {}
    harness_tasks = [t.name for t in tasks if t.kind == "lm_eval"]
    with keep_rng(), lm.precision():
        for task in tasks:
            if task.kind == "lm":
                out.update(_lm_task(lm, cfg, tok, opts, progress))
            elif task.kind == "gen":
                scores, records = run_generation(lm, tok, eos, examples[task.name], opts.max_new_tokens, progress)
                out[task.name] = {**scores, "file": str(task.path), "samples": records}
        if harness_tasks:
            from dsgpt.eval.lm_eval_adapter import DsgptLM, run_tasks
            model = DsgptLM(loaded=lm, tokenizer=(tok, eos), max_gen_toks=opts.max_new_tokens)
            out.update(run_tasks(None, harness_tasks, include_path=opts.include_path, limit=opts.limit,
                                 model=model, progress=progress, bootstrap_iters=opts.bootstrap_iters))
    return out


def _lm_task(lm, cfg, tok, opts: EvalOptions, progress: bool) -> dict:
    from dsgpt.data.prepared import open_run_data
    from dsgpt.eval.bpb import bits_per_byte
    from dsgpt.eval.perplexity import evaluate_data, val_set_size
    data = open_run_data(cfg, lm.config.block_size)
    n_windows, bs = val_set_size(cfg, opts.batches)
    # The trainer's windows, each rank its share (ZeRO-3 too: every rank gets as many batches).
    res, per_source = evaluate_data(lm.forward, data, n_windows, opts.batch_size or bs, lm.rank, lm.world_size,
                                    lm.device)
    lm_scores = {"loss": res.loss, "ppl": res.ppl, "accuracy": res.accuracy, "tokens": res.tokens,
                 **{f"{name}/loss": r.loss for name, r in per_source.items()}}
    # bpb is over whole documents of one dir; a chat dir's loss counts the replies only.
    if not data.masks_labels and not per_source:
        bpb = bits_per_byte(lm, data, tok, opts.max_docs, progress=progress)
        lm_scores.update({"bpb": bpb.bpb, "bpb_documents": bpb.documents, "bpb_bytes": bpb.bytes,
                          "bpb_tokens": bpb.tokens, "bpb_stride": bpb.stride})
    # The flat keys are what eval results held before tasks existed; readers rely on them.
    return {"val/loss": res.loss, "val/ppl": res.ppl, "val/accuracy": res.accuracy, "tokens": res.tokens,
            "lm": lm_scores}


def scalars(result: dict) -> dict[str, float]:
    """`eval/<task>/<metric>` for every finite number under a task."""
    tags = {}
    for task, metrics in result.items():
        if not isinstance(metrics, dict) or task == RUN_FACTS:
            continue
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tags[f"eval/{task}/{key}"] = float(value)
    return tags


def write_tensorboard(run_dir: Path, step: int, result: dict) -> None:
    # A writer of its own (a new events file in tb/), without purge_step: purging would hide the
    # training curves logged after this step.
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    try:
        for tag, value in scalars(result).items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def summary_line(run_dir, result: dict) -> str:
    """The one-line lm summary that launch/eval.py has always printed."""
    return (f"{run_dir} [{result['checkpoint']}]: val loss {result['val/loss']:.4f}, "
            f"perplexity {result['val/ppl']:.2f}, next-token accuracy {result['val/accuracy']:.3f} "
            f"over {result['tokens']} tokens")


def format_table(run_dir, result: dict) -> str:
    """A readable table of every task's metrics (lm's summary line first, when it ran)."""
    lines = [summary_line(run_dir, result)] if "lm" in result else []
    rows = [(task, key, value) for task, metrics in result.items() if isinstance(metrics, dict) and task != RUN_FACTS
            for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    w_task = max([len("task")] + [len(t) for t, _, _ in rows])
    w_key = max([len("metric")] + [len(k) for _, k, _ in rows])
    lines.append(f"checkpoint {result['checkpoint']} (step {result['step']}, {result['dtype']})")
    lines.append(f"{'task':<{w_task}}  {'metric':<{w_key}}  {'value':>12}")
    for task, key, value in rows:
        text = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{task:<{w_task}}  {key:<{w_key}}  {text:>12}")
    return "\n".join(lines)
