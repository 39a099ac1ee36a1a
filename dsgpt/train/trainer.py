"""A training run, top to bottom: set up, resume, loop, evaluate, checkpoint, stop.

`train()` is the loop a reader should be able to hold in one screen; `Run` holds the engine and the
run's state and calls the parts that live in their own modules: the data loader that owns the
position in the data (dsgpt.data.loader.StepLoader), the step (step.dispatch_step) and the window of
steps not yet read back from the device (step.UnreadSteps), the training curve
and when it is read back (step_metrics.StepMetrics), checkpoints (checkpoint), evaluation
(dsgpt.eval.perplexity), profiling, sweep pruning and task evaluations.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dsgpt import dist, runs, watchdog
from dsgpt.config import Config, save_config
from dsgpt.data.loader import StepLoader
from dsgpt.errors import UserError
from dsgpt.io import atomic_write_json
from dsgpt.train import checkpoint, provenance, reshard, rng, run_setup, signals
from dsgpt.train.run_setup import check_precision, fingerprint, model_config, open_data
from dsgpt.train.step import LOSS_SCALE_AT_MINIMUM, Dispatched, UnreadSteps, dispatch_step, step_outcome
from dsgpt.train.step_metrics import StepMetrics
from dsgpt.train.profiling import StepProfiler
from dsgpt.train.task_evals import TaskEvals
from dsgpt.train.pruning import TrialPruning


@dataclass
class RunState:
    """What the loop carries between steps and across a resume (saved in dsgpt_state.json)."""
    step: int = 0
    tokens_seen: int = 0
    val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    best_step: Optional[int] = None  # the step whose evaluation gave best_val_loss
    evals_since_best: int = 0
    skipped_steps: int = 0  # non-finite steps in a row
    overflow_skips: int = 0  # fp16 steps DeepSpeed skipped to lower the loss scale (routine, not errors)
    history: list = field(default_factory=list)  # one entry per launch: start step, argv


@dataclass
class RunSummary:
    run_dir: Path
    first_step: int
    last_step: int
    stop_reason: str  # max_steps | early_stop | signal:NAME | time_budget | nonfinite | pruned
    losses: dict  # step -> train loss, for the steps this process ran
    grad_norms: dict  # step -> gradient norm before clipping, at logged steps
    val_loss: Optional[float]
    best_val_loss: Optional[float]
    engine: dict  # describe_engine(): what DeepSpeed actually built


def train(cfg: Config, argv: Optional[list[str]] = None) -> RunSummary:
    check_precision(cfg)  # before any work: fp16 has no CPU path
    t = cfg.train
    # torch's own collective timeout must come after the watchdog's, whose message names the rank.
    ctx = dist.setup(timeout_minutes=max(10.0, 2 * t.hang_timeout_s / 60))
    signals.install()
    run_setup.apply_tf32(cfg, ctx)
    # Every rank says who it is: in a multi-node log this line is the proof of the layout.
    print(f"[dsgpt] rank {ctx.rank}/{ctx.world_size} local_rank {ctx.local_rank} node {ctx.node_rank} "
          f"host {ctx.hostname} pid {os.getpid()} launcher {ctx.launcher} backend {ctx.backend}", flush=True)
    hang = watchdog.start_for_run(ctx, cfg.run.dir, t.hang_timeout_s)
    try:
        with contextlib.ExitStack() as cleanup:  # the loader's thread and the profiler end however the run does
            run = Run(cfg, ctx, list(sys.argv if argv is None else argv))
            cleanup.callback(run.loader.close)
            task_evals = TaskEvals.from_config(cfg, run.data)
            pruning = TrialPruning.for_run(run)  # a sweep trial's pruner; inert otherwise
            profiler = StepProfiler.from_config(cfg, ctx)
            if profiler:
                cleanup.callback(profiler.close)
            reason = ""
            try:
                for step in range(run.state.step + 1, t.max_steps + 1):
                    run.train_step(step)  # dispatched; read back (run.settle) when the step is busy
                    if profiler:
                        profiler.step()
                    hang.progress(step)
                    evaluating = _due(step, t.eval_interval) or step == t.max_steps
                    task_evaluating = bool(task_evals and task_evals.due(step, t.max_steps))
                    sampling = _due(step, t.sample_interval)
                    saving = _due(step, t.save_interval) or step == t.max_steps
                    busy = evaluating or task_evaluating or sampling or saving or _due(step, t.log_interval)
                    if run.unread.due(busy) and run.settle(step):
                        reason = "nonfinite"
                        break
                    improved = False
                    if evaluating:
                        with hang.phase("eval"):
                            improved = run.evaluate(step)
                            pruning.after_eval(step)
                    if task_evaluating:
                        with hang.phase("eval"):
                            scores = task_evals.run(run.engine, ctx)
                            run.log.log(step, scores)
                            run.console(f"step {step}: {task_evals.summary(scores)}")
                    if sampling:
                        with hang.phase("sample"):
                            run.log_sample(step)
                    reason = run.stop_reason() or pruning.reason()  # agreed by all ranks
                    if reason and run.settle(step):  # a stop saves: the steps before it are read first
                        reason = "nonfinite"
                        break
                    if saving or reason or (improved and t.save_best):
                        with hang.phase("checkpoint"):
                            run.save(step)
                    if reason:
                        break
            except NonFiniteWeights as err:
                reason = "nonfinite"
                run.console(str(err))
            with hang.phase("finish"):
                summary = run.finish(reason or "max_steps")
    except BaseException as exc:
        hang.handle_exception(exc)  # a peer's death reads as a gloo/NCCL error: name the peer
        raise
    hang.stop()
    return summary


def _due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


class NonFiniteWeights(Exception):
    """Raised instead of saving a checkpoint whose weights hold inf or NaN."""


class Run:
    """Everything one training launch holds: data, engine, state, logger."""

    def __init__(self, cfg: Config, ctx: dist.DistContext, argv: list[str]):
        from dsgpt.ds_config import resolve_ds_config
        from dsgpt.metrics import MetricsLogger
        from dsgpt.train.engine import build_engine, describe_engine
        from dsgpt.zero import build_model

        self.cfg, self.ctx, self.t = cfg, ctx, cfg.train
        self.run_dir = cfg.run.dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.data = open_data(cfg)
        self.mcfg = model_config(cfg, self.data.vocab_size)
        self.fingerprint = fingerprint(self.mcfg, self.data, cfg.run.seed)
        resume_from = self._check_resume()
        init_from = None if resume_from else self._check_init_from()

        # Different dropout masks per rank; the batches themselves depend only on (seed, step).
        rng.seed_everything(cfg.run.seed + ctx.rank)
        ds_config = resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu)
        # A checkpoint saved on other ranks or another ZeRO stage: same global batch, another GAS.
        relayout = reshard.plan(resume_from.tag_dir, ctx.world_size, ds_config) if resume_from else None
        if relayout:
            cfg.train.grad_accum_steps = relayout.grad_accum_steps
            ds_config = reshard.configure(resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu), relayout)
        model = build_model(self.mcfg, ds_config)  # sharded from the start under ZeRO-3
        self.engine, ds_config = build_engine(model, cfg, ds_config)
        self.device = ctx.device
        self._announce(describe_engine(self.engine))

        self.state = RunState()
        if relayout:
            self.console(reshard.load(self.engine, relayout, ctx.rank))
            saved = runs.read_state(resume_from.tag_dir)
            # The saved RNG states belong to the old ranks: each rank starts from (seed, rank, step).
            reshard.seed_rngs(cfg.run.seed, ctx.rank, int(saved.get("step", 0)))
            self.state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
        elif resume_from:
            saved, rng_note = checkpoint.load(self.engine, resume_from.ckpt_dir, resume_from.tag, ctx.rank,
                                              cfg.run.seed)
            self.state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
            if rng_note:
                print(f"[dsgpt] {rng_note}", flush=True)
        elif init_from:
            from dsgpt.train.init_from import load_source
            self.console(load_source(self.engine, init_from))
        self.state.history.append({"start_step": self.state.step + 1, "argv": argv})
        self.first_step = self.state.step + 1

        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            atomic_write_json(self.run_dir / "ds_config.json", ds_config)
            provenance.record(self.run_dir, provenance.collect(argv, ctx.world_size,
                                                               self.data.meta.get("data_sha256", "")))
        # Rows past the resumed step were logged by a launch that died before saving: drop them.
        self.log = MetricsLogger(self.run_dir, enabled=ctx.is_main, resume_step=self.state.step)
        if ctx.is_main and self.first_step == 1:
            _log_data_reports(self.log, self.data)
        self.tokens_per_step = (self.t.micro_batch_size * self.t.grad_accum_steps * ctx.world_size
                                * self.mcfg.block_size)
        if hasattr(self.data, "sources"):
            self.console(_mixture_line(self.data, self.t.max_steps, self.tokens_per_step))
        self.last_saved = self.state.step
        self.loader = StepLoader(self.data, ctx.rank, ctx.world_size, self.t.micro_batch_size,
                                 self.t.grad_accum_steps, self.first_step, self.t.max_steps, ctx.device)
        self.unread = UnreadSteps()  # steps dispatched but not yet read back (settle)
        self.metrics = StepMetrics(self.log, cfg, ctx, self.mcfg, self.tokens_per_step, self.first_step, self.console)
        self.start_time = time.time()
        self.engine.train()

    # ---- set-up checks ------------------------------------------------------------------------

    def _check_resume(self):
        """Where to resume from, after refusing anything that would overwrite or mix runs."""
        resume_from = runs.locate(self.t.resume, self.ckpt_dir)
        if self.t.resume == "never" and runs.list_tags(self.ckpt_dir):
            raise UserError(
                f"The run dir '{self.run_dir}' already holds checkpoints and train.resume=never would "
                f"write over them. Set train.resume=auto to continue that run, or pick a new run.name."
            )
        if resume_from:
            if resume_from.note:
                self.console(f"resume: {resume_from.note}")
            runs.check_compatible(runs.read_state(resume_from.tag_dir), self.fingerprint, resume_from.tag_dir)
        return resume_from

    def _check_init_from(self):
        """The weights a fine-tune starts from (a dsgpt checkpoint or an HF GPT-2 dir), after
        checking that they fit this model and this data's tokenizer."""
        if not self.t.init_from:
            return None
        from dsgpt.data.tokenizer import load_tokenizer
        from dsgpt.train.init_from import locate_source
        return locate_source(self.t.init_from, self.mcfg, load_tokenizer(self.data.tokenizer_path))

    def _announce(self, facts: dict) -> None:
        offload = " (optimizer offloaded to CPU)" if facts["offload_optimizer"] else ""
        autocast = f" (forward under {facts['autocast']} autocast)" if facts["autocast"] else ""
        self.console(f"engine: ZeRO {facts['zero_stage']}, {facts['param_dtype']} parameters{autocast}, "
                     f"{facts['optimizer']}{offload}, {self.ctx.world_size} rank(s) on {self.ctx.device_type} "
                     f"({self.ctx.backend}), global batch {facts['train_batch_size']} x "
                     f"{self.mcfg.block_size} tokens")

    # ---- the loop's steps ---------------------------------------------------------------------

    def train_step(self, step: int) -> None:
        """Dispatches one optimizer step. Its numbers stay on the device until `settle` reads them
        (no sync per step on a GPU)."""
        lr = self.engine.get_lr()[0]  # the lr this step uses; the step advances the schedule
        t0 = time.perf_counter()
        try:
            pending = dispatch_step(self.engine, self.loader.get(step), self.device)
        except Exception as err:
            if LOSS_SCALE_AT_MINIMUM in str(err):
                raise UserError(_loss_scale_message(step, self.last_saved, self.engine)) from None
            raise
        self.metrics.timed(time.perf_counter() - t0)
        self.state.step = step
        self.unread.add(Dispatched(step, lr, self.engine.was_step_applied(), pending))

    def settle(self, now: int) -> bool:
        """Reads every dispatched step back (one sync) and does its bookkeeping in order: losses,
        tokens seen, non-finite and overflow skips, logging. True when the run should stop on
        non-finite steps. A step the optimizer skipped on the device was skipped at its own step;
        only the stop comes at `now`."""
        if not self.unread.steps:
            return False
        t0 = time.perf_counter()
        read = self.unread.read()
        self.metrics.waited(time.perf_counter() - t0)  # the device's share of the steps' time
        give_up = False
        for d, res in read:
            if self._book(d.step, d.lr, d.applied and not res.skipped_on_device, res, now) == "nonfinite":
                give_up = give_up or self.give_up_on_nonfinite(d.step, now)
        return give_up

    def _book(self, step: int, lr: float, applied: bool, res, now: int) -> str:
        """One step's bookkeeping; returns its outcome (dsgpt.train.step.step_outcome)."""
        outcome = step_outcome(res.loss, applied, self.cfg.precision)
        if outcome == "nonfinite":
            self.state.skipped_steps += 1
            self.log.log(step, {"train/skipped": 1.0})
            late = f" (read back at step {now})" if now != step else ""
            self.console(f"step {step}: non-finite loss ({res.loss}); update skipped{late}")
            return outcome
        if outcome == "overflow":
            self.state.overflow_skips += 1
            self.log.log(step, {"train/overflow_skips": self.state.overflow_skips})
        self.state.skipped_steps = 0
        self.state.tokens_seen += self.tokens_per_step
        self.metrics.record(step, res.loss, lr, self.state.tokens_seen, self.engine)
        return outcome

    def give_up_on_nonfinite(self, step: int, now: int) -> bool:
        if self.t.on_nonfinite == "stop" or self.state.skipped_steps > self.t.max_nonfinite_steps:
            self.console(f"step {now}: stopping (train.on_nonfinite={self.t.on_nonfinite}, "
                         f"{self.state.skipped_steps} non-finite step(s) in a row up to step {step})")
            return True
        return False

    def evaluate(self, step: int) -> bool:
        """Validation loss now; True when it is the best so far (by more than early_stop_min_delta)."""
        from dsgpt.eval.perplexity import evaluate_data, val_set_size
        # The same windows on 1 rank, on N ranks and in launch/eval.py; each rank scores its share.
        n_windows, batch_size = val_set_size(self.cfg)
        res, per_source = evaluate_data(self.engine, self.data, n_windows, batch_size, self.ctx.rank,
                                        self.ctx.world_size, self.device)
        s = self.state
        s.val_loss = res.loss
        improved = s.best_val_loss is None or res.loss < s.best_val_loss - self.t.early_stop_min_delta
        if improved:
            s.best_val_loss, s.best_step, s.evals_since_best = res.loss, step, 0
        else:
            s.evals_since_best += 1
        self.log.log(step, {"val/loss": res.loss, "val/ppl": res.ppl, "val/accuracy": res.accuracy,
                            **{f"val/{name}/loss": r.loss for name, r in per_source.items()}})
        self.console(f"step {step}: val loss {res.loss:.4f}, ppl {res.ppl:.2f}, acc {res.accuracy:.3f}")
        return improved

    def log_sample(self, step: int) -> None:
        """A short text sample for TensorBoard; every rank runs it (ZeRO-3 forwards are collective)."""
        import torch

        from dsgpt.data.tokenizer import load_tokenizer
        from dsgpt.generate import sample
        gen = torch.Generator().manual_seed(self.cfg.run.seed)  # its own RNG: exact resume stays exact
        x, _ = next(iter(self.data.val_batches(1, 1, 0, 1)))
        self.engine.eval()
        out = sample(self.engine, x[:, :16].to(self.device), self.t.sample_tokens, self.mcfg.block_size,
                     generator=gen, top_k=50, vocab_size=self.data.vocab_size)  # never the padding rows
        self.engine.train()
        if self.ctx.is_main:
            text = load_tokenizer(self.data.path).decode(out[0].tolist())
            self.log.text(step, "samples/val_prompt", text)

    def stop_reason(self) -> str:
        """'' to go on; otherwise why to stop. One collective, so every rank decides the same."""
        t = self.t
        early = 0 < t.early_stop_patience <= self.state.evals_since_best  # same on every rank
        time_up = t.max_minutes is not None and (time.time() - self.start_time) / 60 >= t.max_minutes
        signum, time_flag = dist.host_max([float(signals.number()), float(time_up)])  # no device sync
        if early:
            return "early_stop"
        if signum:
            return f"signal:{signals.name(signum)}"
        return "time_budget" if time_flag else ""

    def save(self, step: int) -> None:
        if not _params_finite(self.engine, self.device):
            raise NonFiniteWeights(f"step {step}: the weights are not finite; not saving a checkpoint")
        s = self.state
        is_best = s.best_step == step  # these weights are the ones that evaluated best
        payload = dict(vars(s), step=step, is_best=is_best, **self.fingerprint)
        checkpoint.save(self.engine, self.ckpt_dir, step, payload, self.ctx.rank, self.t.keep_last)
        self.last_saved = step

    def finish(self, reason: str) -> RunSummary:
        from dsgpt.train.engine import describe_engine
        self.settle(self.state.step)  # steps left unread when the loop ended on an error
        self.metrics.close()
        s = self.state
        nan = float("nan")
        self.log.hparams(_hparams(self.cfg, self.mcfg),
                         {"hparam/val_loss": nan if s.val_loss is None else s.val_loss,
                          "hparam/best_val_loss": nan if s.best_val_loss is None else s.best_val_loss}, s.step)
        self.console(f"stopped at step {s.step} ({reason}); last checkpoint: step {self.last_saved}; "
                     f"TensorBoard: tensorboard --logdir {self.cfg.run.out_dir}")
        self.log.close()
        dist.barrier()
        return RunSummary(run_dir=self.run_dir, first_step=self.first_step, last_step=s.step,
                          stop_reason=reason, losses=self.metrics.losses, grad_norms=self.metrics.grad_norms,
                          val_loss=s.val_loss,
                          best_val_loss=s.best_val_loss,
                          engine=describe_engine(self.engine))  # now: the optimizer state exists

    def console(self, msg: str) -> None:
        if self.ctx.is_main:
            _console(msg)


def _log_data_reports(log, data) -> None:
    """Each data dir's preparation report (report.json, when prepare wrote one) as TensorBoard text."""
    sources = [(s.name, s.data.path) for s in data.sources] if hasattr(data, "sources") else [("data", data.path)]
    for name, path in sources:
        report = path / "report.json"
        if report.is_file():
            log.text(0, f"data/{name}/report", "```\n" + report.read_text(encoding="utf-8")[:20000] + "\n```")


def _mixture_line(data, max_steps: int, tokens_per_step: int) -> str:
    epochs = data.epochs(max_steps, tokens_per_step)
    parts = [f"{s.name} {s.weight:.0%} ({epochs[s.name]:.2f} epochs)" for s in data.sources]
    return f"data.mix over {max_steps} steps: " + ", ".join(parts)


def _loss_scale_message(step: int, last_saved: int, engine) -> str:
    floor = getattr(engine.optimizer, "min_loss_scale", None) or getattr(
        getattr(engine.optimizer, "loss_scaler", None), "min_scale", "its minimum")
    return (f"step {step}: the fp16 loss scale fell to its floor ({floor}) and the gradients still "
            f"overflow, so no update can be applied: the run is diverging or its values leave fp16's range. "
            f"Resume from the last checkpoint (step {last_saved}) with a lower optim.lr, a warmup or "
            f"stronger clipping (optim.grad_clip), or use precision=bf16, which needs no loss scaling.")


def _params_finite(engine, device) -> bool:
    import torch
    # ZeRO-3 keeps only this rank's shard. One read back for all parameters, not one each.
    finite = [torch.isfinite(t).all() for t in (getattr(p, "ds_tensor", p) for p in engine.module.parameters())
              if t.numel()]
    bad = 0.0 if not finite or bool(torch.stack(finite).all()) else 1.0
    (bad,) = dist.all_reduce_max([bad], device)
    return bad == 0.0


def _console(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stdout)


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
