"""Train and resume tiny runs on any layout through dsgpt.train.reshard, several jobs per launch.

    deepspeed --num_gpus N tests/workers/reshard_jobs.py JOBS.json OUT_DIR     (or plain python: 1 rank)

JOBS.json: a list of jobs, run in order:
    {"name", "overrides": [...],            # the run config (data, model, zero stage, micro batch)
     "global_batch": 8,                     # fresh runs: GAS = global / (micro x ranks)
     "last": 8,                             # train up to this step
     "save_at": 4, "save_dir": PATH,        # optional: save a DeepSpeed checkpoint at this step
     "resume": TAG_DIR, "start": 4,         # optional: resume this checkpoint (saved after `start`)
     "reset": false}                        # mutation: wipe Adam's state right after the resume

The engine is driven directly (dsgpt's engine, data and step building blocks) so the test does
not depend on the trainer. Rank 0 writes OUT_DIR/<name>.json (losses, engine facts, the resume
note or error) and the full Adam state right after the resume (<name>.resumed.pt) and right after
the save (<name>.saved.pt).
"""

import gc
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dsgpt import dist  # noqa: E402
from dsgpt.config import load_config  # noqa: E402
from dsgpt.errors import UserError  # noqa: E402


def snapshot(engine, path, rank):
    from dsgpt.train import reshard
    params, steps = reshard.full_adam_state(engine)  # collective
    steps = dist.all_gather_object(steps)  # every rank's step counts
    if rank == 0:
        sched = engine.lr_scheduler.state_dict()
        groups = [{k: g[k] for k in ("lr", "weight_decay", "betas", "eps")}
                  for g in reshard._inner_optimizer(engine).param_groups]
        torch.save({"params": params, "steps": steps, "groups": groups, "global_steps": engine.global_steps,
                    "sched": {k: sched[k] for k in ("base_lrs", "last_epoch", "_step_count", "_last_lr")},
                    "lr": engine.get_lr()}, path)


def run_job(job, ctx, out):
    from dsgpt.ds_config import resolve_ds_config
    from dsgpt.train import reshard
    from dsgpt.train.engine import build_engine, describe_engine
    from dsgpt.zero import build_model
    from dsgpt.train.run_setup import model_config, open_data
    from dsgpt.data.loader import step_batch
    from dsgpt.train.step import train_step

    cfg = load_config(None, job["overrides"])
    micro = cfg.train.micro_batch_size
    cfg.train.grad_accum_steps = job.get("global_batch", 8) // (micro * ctx.world_size)
    data = open_data(cfg)
    mcfg = model_config(cfg, data.vocab_size)
    ds_config = resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu)
    plan, note, t_load = None, "", 0.0
    if job.get("resume"):
        plan = reshard.plan(Path(job["resume"]), ctx.world_size, ds_config)
        if plan:  # the hook the trainer makes: GAS from the plan, then load_universal
            cfg.train.grad_accum_steps = plan.grad_accum_steps
            ds_config = reshard.configure(resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu), plan)
    torch.manual_seed(cfg.run.seed + ctx.rank)
    model = build_model(mcfg, ds_config)
    engine, _ = build_engine(model, cfg, ds_config)
    start = 0
    if job.get("resume"):
        t0 = time.perf_counter()
        start = job["start"]
        tag_dir = Path(job["resume"])
        if plan:
            note = reshard.load(engine, plan, ctx.rank)
            reshard.seed_rngs(cfg.run.seed, ctx.rank, start)
        else:
            path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            assert path is not None
        t_load = time.perf_counter() - t0
        if job.get("reset"):  # the mutation: a resume that forgets Adam's state
            for state in reshard._inner_optimizer(engine).state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key].zero_()
                state["step"] = torch.zeros_like(torch.as_tensor(state["step"]))
        snapshot(engine, out / f"{job['name']}.resumed.pt", ctx.rank)
    losses = {}
    for step in range(start + 1, job["last"] + 1):
        micro_batches = data.train_micro_batches(step - 1, ctx.rank, ctx.world_size, micro,
                                                 cfg.train.grad_accum_steps)
        losses[step] = train_step(engine, step_batch(micro_batches), ctx.device).loss
        if step == job.get("save_at"):
            engine.save_checkpoint(job["save_dir"], tag=f"step{step:07d}", save_latest=False)
            snapshot(engine, out / f"{job['name']}.saved.pt", ctx.rank)
    facts = describe_engine(engine)
    del engine, model
    gc.collect()
    return {"losses": losses, "engine": facts, "note": note, "load_s": t_load,
            "plan": None if plan is None else {"saved": vars(plan.saved), "target": vars(plan.target)}}


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    jobs = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    ctx = dist.setup()
    for job in jobs:
        t0 = time.perf_counter()
        try:
            res = run_job(job, ctx, out)
        except UserError as err:
            res = {"error": str(err)}
        except Exception:
            res = {"error": "unexpected: " + traceback.format_exc()}
        res["seconds"] = time.perf_counter() - t0
        if ctx.rank == 0:
            (out / f"{job['name']}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
