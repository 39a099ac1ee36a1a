"""A training run, top to bottom: set up, resume, loop, evaluate, checkpoint, stop."""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dsgpt import dist
from dsgpt.config import Config, save_config
from dsgpt.errors import UserError
from dsgpt.io import atomic_write_json
from dsgpt import runs
from dsgpt.train import checkpoint, provenance, signals
from dsgpt.train.run_setup import check_precision, fingerprint, model_config, open_data


@dataclass
class RunState:
    """What the loop carries between steps and across a resume (saved in dsgpt_state.json)."""
    step: int = 0
    tokens_seen: int = 0
    val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    evals_since_best: int = 0
    skipped_steps: int = 0
    history: list = field(default_factory=list)  # launches: (start step, argv)


@dataclass
class RunSummary:
    run_dir: Path
    first_step: int
    last_step: int
    stop_reason: str  # max_steps | early_stop | signal:NAME | time_budget | nonfinite
    losses: dict  # step -> train loss (this process's steps)
    val_loss: Optional[float]
    best_val_loss: Optional[float]
    engine: dict  # describe_engine(): what DeepSpeed actually built


def _due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _params_finite(engine, device) -> bool:
    import torch
    bad = 0.0
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps only this rank's shard
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad = 1.0
            break
    (bad,) = dist.all_reduce_max([bad], device)
    return bad == 0.0


def train(cfg: Config, argv: Optional[list[str]] = None) -> RunSummary:
    import torch

    from dsgpt.ds_config import resolve_ds_config
    from dsgpt.metrics import MetricsLogger, memory_stats, peak_flops
    from dsgpt.model import GPT, flops_per_token
    from dsgpt.train.engine import build_engine, describe_engine
    from dsgpt.eval.perplexity import evaluate
    from dsgpt.train.step import train_step

    argv = list(sys.argv if argv is None else argv)
    check_precision(cfg)  # before any work: fp16 has no CPU path
    ctx = dist.setup()
    signals.install()
    t = cfg.train
    run_dir = cfg.run.dir
    ckpt_dir = run_dir / "checkpoints"

    data = open_data(cfg)
    mcfg = model_config(cfg, data.vocab_size)
    fp = fingerprint(mcfg, data)
    resume_from = runs.locate(t.resume, ckpt_dir)
    if t.resume == "never" and runs.list_tags(ckpt_dir):
        raise UserError(
            f"The run dir '{run_dir}' already holds checkpoints and train.resume=never would write "
            f"over them. Set train.resume=auto to continue that run, or pick a new run.name."
        )
    if resume_from:
        runs.check_compatible(runs.read_state(resume_from[0] / resume_from[1]), fp,
                                    resume_from[0] / resume_from[1])

    # Different dropout masks per rank; the batches themselves depend only on (seed, step).
    _seed_everything(cfg.run.seed + ctx.rank)
    ds_config = resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu)
    model = GPT(mcfg)
    engine, ds_config = build_engine(model, cfg, ds_config, ctx.on_gpu)
    device = ctx.device
    engine_facts = describe_engine(engine)
    if ctx.is_main:
        _console(f"engine: ZeRO {engine_facts['zero_stage']}, {engine_facts['param_dtype']} parameters, "
                 f"{engine_facts['optimizer']}{' (optimizer offloaded to CPU)' if engine_facts['offload_optimizer'] else ''}, "
                 f"{ctx.world_size} rank(s) on {ctx.device_type} ({ctx.backend}), "
                 f"global batch {engine_facts['train_batch_size']} x {mcfg.block_size} tokens")

    state = RunState()
    if resume_from:
        saved = checkpoint.load(engine, resume_from[0], resume_from[1], ctx.rank)
        state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
    elif t.init_from:
        init_dir, init_tag = runs.locate_path(Path(t.init_from), "train.init_from")
        checkpoint.load_weights(engine, init_dir, init_tag)
    state.history.append({"start_step": state.step + 1, "argv": argv})

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "ds_config.json", ds_config)
        provenance.record(run_dir, provenance.collect(argv, ctx.world_size, data.meta.get("data_sha256", "")))
    log = MetricsLogger(run_dir, enabled=ctx.is_main)
    flops_tok = flops_per_token(mcfg)
    peak = peak_flops(ctx.device_type, cfg.precision)
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * ctx.world_size * mcfg.block_size

    def save(step: int, is_best: bool = False) -> None:
        if not _params_finite(engine, device):
            raise _NonFinite(f"parameters are not finite at step {step}; not saving")
        payload = dict(vars(state), step=step, is_best=is_best, **fp)
        checkpoint.save(engine, ckpt_dir, step, payload, ctx.rank, t.keep_last)

    def run_eval(step: int) -> None:
        # train.eval_batches counts batches over all ranks, so the validation set (and its
        # loss) is the same on 1 rank, on N ranks and in launch/eval.py.
        per_rank = -(-t.eval_batches // ctx.world_size)
        batches = data.val_batches(per_rank, cfg.eval.batch_size or t.micro_batch_size, ctx.rank, ctx.world_size)
        res = evaluate(engine, batches, device)
        state.val_loss = res.loss
        improved = state.best_val_loss is None or res.loss < state.best_val_loss - t.early_stop_min_delta
        if improved:
            state.best_val_loss, state.evals_since_best = res.loss, 0
        else:
            state.evals_since_best += 1
        log.log(step, {"val/loss": res.loss, "val/ppl": res.ppl, "val/accuracy": res.accuracy})
        if ctx.is_main:
            _console(f"step {step}: val loss {res.loss:.4f}, ppl {res.ppl:.2f}, acc {res.accuracy:.3f}")

    first_step = state.step + 1
    losses: dict[int, float] = {}
    stop_reason = "max_steps"
    start_time = time.time()
    last_saved = state.step
    progress = _progress(ctx.is_main, first_step, t.max_steps)
    engine.train()
    try:
        for step in range(first_step, t.max_steps + 1):
            lr = engine.get_lr()[0]  # the lr this step uses; the step advances the schedule
            t0 = time.perf_counter()
            micro = data.train_micro_batches(step - 1, ctx.rank, ctx.world_size, t.micro_batch_size,
                                             t.grad_accum_steps)
            res = train_step(engine, micro, ctx.world_size, device)
            dt = time.perf_counter() - t0
            applied = math.isfinite(res.loss) and engine.was_step_applied()
            state.step = step
            if applied:
                state.tokens_seen += tokens_per_step
                state.skipped_steps = 0
                losses[step] = res.loss
            else:
                state.skipped_steps += 1
                log.log(step, {"train/skipped": 1.0})
                if t.on_nonfinite == "stop" or state.skipped_steps > t.max_nonfinite_steps:
                    stop_reason = "nonfinite"
                    _console(f"step {step}: non-finite loss ({res.loss}); stopping "
                             f"(train.on_nonfinite={t.on_nonfinite}, {state.skipped_steps} in a row)",
                             ctx.is_main)
                    break
                _console(f"step {step}: non-finite loss ({res.loss}); step skipped", ctx.is_main)
            if applied and _due(step, t.log_interval):
                tok_s = tokens_per_step / dt
                grad_norm = engine.get_global_grad_norm()
                scalars = {
                    "train/loss": res.loss, "train/lr": lr,
                    "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "train/tokens_per_sec": tok_s, "train/step_time": dt,
                    "train/mfu": flops_tok * tok_s / (peak * ctx.world_size) if peak else None,
                    "train/tokens_seen": state.tokens_seen,
                }
                if cfg.precision == "fp16":
                    scalars["train/loss_scale"] = getattr(engine.optimizer, "cur_scale", None) or \
                        getattr(engine.optimizer, "loss_scale", None)
                scalars.update(memory_stats(ctx.device_type))
                log.log(step, scalars)
                if progress:
                    progress.set_postfix(loss=f"{res.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                elif ctx.is_main and _due(step, max(1, t.max_steps // 20)):
                    # No terminal (a batch job's log): a plain line every 5% instead of a bar.
                    _console(f"step {step}/{t.max_steps}: loss {res.loss:.4f}, lr {lr:.2e}, "
                             f"{tok_s:,.0f} tokens/s")
            if progress:
                progress.update(1)

            early_stop = False
            if _due(step, t.eval_interval) or step == t.max_steps:
                run_eval(step)
                early_stop = 0 < t.early_stop_patience <= state.evals_since_best
            if t.sample_interval and _due(step, t.sample_interval):
                _log_sample(engine, data, mcfg, cfg, step, log, device)

            time_up = t.max_minutes is not None and (time.time() - start_time) / 60 >= t.max_minutes
            signal_flag, time_flag = dist.all_reduce_max(
                [float(signals.stop_requested()), float(time_up)], device)
            if early_stop:
                stop_reason = "early_stop"
            elif signal_flag:
                stop_reason = f"signal:{signals.reason() or 'peer'}"
            elif time_flag:
                stop_reason = "time_budget"
            stopping = stop_reason != "max_steps" or step == t.max_steps
            if _due(step, t.save_interval) or stopping:
                is_best = state.val_loss is not None and state.val_loss == state.best_val_loss
                save(step, is_best=is_best)
                last_saved = step
            if stopping:
                break
    except _NonFinite as err:
        stop_reason = "nonfinite"
        _console(f"{err}", ctx.is_main)
    finally:
        if progress:
            progress.close()
        log.flush()

    if ctx.is_main:
        final = {"hparam/val_loss": state.val_loss if state.val_loss is not None else float("nan"),
                 "hparam/best_val_loss": state.best_val_loss if state.best_val_loss is not None else float("nan")}
        log.hparams(_hparams(cfg, mcfg), final)
        _console(f"stopped at step {state.step} ({stop_reason}); last checkpoint: step {last_saved}; "
                 f"TensorBoard: tensorboard --logdir {cfg.run.out_dir}")
    log.close()
    dist.barrier()
    return RunSummary(run_dir=run_dir, first_step=first_step, last_step=state.step, stop_reason=stop_reason,
                      losses=losses, val_loss=state.val_loss, best_val_loss=state.best_val_loss,
                      engine=describe_engine(engine))  # after training: optimizer state exists now


class _NonFinite(Exception):
    pass


def _console(msg: str, enabled: bool = True) -> None:
    if not enabled:
        return
    try:
        from tqdm import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)


def _progress(enabled: bool, first: int, last: int):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=last, initial=first - 1, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def _log_sample(engine, data, mcfg, cfg, step, log, device) -> None:
    """A short text sample for TensorBoard; every rank runs it (ZeRO-3 forwards are collective)."""
    import torch

    from dsgpt.generate import sample
    gen = torch.Generator().manual_seed(cfg.run.seed)
    x, _ = next(iter(data.val_batches(1, 1, 0, 1)))
    prompt = x[:, :16].to(device)
    engine.eval()
    out = sample(lambda idx: engine(idx), prompt, cfg.train.sample_tokens, mcfg.block_size,
                 generator=gen, top_k=50)
    engine.train()
    text = data.decode(out[0].tolist()) if hasattr(data, "decode") else str(out[0].tolist())
    log.text(step, "samples/val_prompt", text)


def _hparams(cfg: Config, mcfg) -> dict:
    return {
        "model/n_layer": mcfg.n_layer, "model/n_embd": mcfg.n_embd, "model/n_head": mcfg.n_head,
        "model/block_size": mcfg.block_size, "model/dropout": mcfg.dropout,
        "optim/lr": cfg.optim.lr, "optim/schedule": cfg.optim.schedule,
        "optim/weight_decay": cfg.optim.weight_decay, "optim/warmup_steps": cfg.optim.warmup_steps,
        "train/micro_batch_size": cfg.train.micro_batch_size,
        "train/grad_accum_steps": cfg.train.grad_accum_steps,
        "zero_stage": cfg.deepspeed.zero_stage if cfg.deepspeed.zero_stage is not None else -1,
        "precision": cfg.precision,
    }
