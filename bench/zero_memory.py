"""Memory per rank under each ZeRO stage: parameters and optimizer state each rank holds, its
memory in use after a few training steps of a config's model on random tokens, and its peak.

    python bench/zero_memory.py --config configs/tiny.yaml --ranks 2 model.n_layer=8 model.n_embd=512
    python bench/zero_memory.py --config configs/gpt2-124m.yaml --ranks 8 --stages 1 2 3

Each stage is its own launch of `--ranks` ranks under the DeepSpeed launcher (peak memory is per
process, so stages must not share one), on every GPU or as CPU ranks over gloo. Prints a table and
appends one row per stage to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402  (after the path: runs as a script from any directory)

SECTION = "Memory per rank by ZeRO stage (bench/zero_memory.py)"
COLUMNS = ["date", "machine", "device", "ranks", "config", "model", "precision", "ZeRO",
           "params MB/rank", "optimizer state MB/rank", "mem after steps GB", "peak mem GB", "versions"]
MB = 2**20


def measure(config: str, overrides: list[str], steps: int, out: Path) -> None:
    """One rank of one launch: train `steps` steps, then rank 0 writes every rank's figures."""
    import torch

    from dsgpt import dist
    from dsgpt.train.engine import describe_engine
    from dsgpt.data.loader import step_batch
    from dsgpt.train.step import train_step

    b = common.build(config, overrides)
    gen = torch.Generator().manual_seed(b.ctx.rank)
    for _ in range(steps):
        train_step(b.engine, step_batch(common.random_micro_batches(b, gen)), b.ctx.device)
    facts = describe_engine(b.engine)
    held = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in b.engine.module.parameters())
    mine = {"params_bytes": held, "optimizer_state_bytes": facts["optimizer_state_bytes"],
            "now_gb": common.memory_in_use_gb(b.ctx.on_gpu), "peak_gb": common.peak_memory_gb(b.ctx.on_gpu)}
    everyone = dist.all_gather_object(mine)
    if b.ctx.is_main:
        out.write_text(json.dumps({
            "ranks": everyone, "zero_stage": facts["zero_stage"], "device": common.device_name(b),
            "model": common.model_name(b), "precision": b.cfg.precision, "world_size": b.ctx.world_size}))
    dist.barrier()


def launch_stage(args, stage: int, out: Path) -> dict:
    from dsgpt.dist import free_port, gpu_available
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(args.ranks), "--master_port", str(free_port()), __file__,
           "--measure", str(out), "--config", args.config, "--steps", str(args.steps),
           *args.overrides, f"deepspeed.zero_stage={stage}"]
    env = dict(os.environ)
    if not gpu_available():
        env["DS_ACCELERATOR"] = "cpu"  # say it, rather than have DeepSpeed guess (and warn) per rank
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"ZeRO {stage}: the launch failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--ranks", type=int, default=2, help="ranks per launch (GPUs, or CPU processes)")
    p.add_argument("--stages", nargs="+", default=["0", "1", "2", "3"], help="ZeRO stages, one launch each")
    p.add_argument("--steps", type=int, default=3, help="training steps before measuring")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # a rank of one launch
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    # --stages takes every word after it: key=value overrides written after it are overrides still.
    args.overrides += [v for v in args.stages if "=" in v]
    stages = [v for v in args.stages if "=" not in v]
    if not stages or any(v not in ("0", "1", "2", "3") for v in stages):
        p.error(f"--stages takes ZeRO stages 0-3, not {' '.join(stages) or 'nothing'}")
    args.stages = [int(v) for v in stages]
    if args.measure:
        from dsgpt.dist import exit_rank, teardown
        measure(args.config, args.overrides, args.steps, args.measure)
        teardown()
        exit_rank(0)  # a launched rank: gloo's exit clean-up can abort a finished rank (see exit_rank)

    date, machine, versions = common.context_cells()
    print(f"{'ZeRO':>4} {'params MB/rank':>15} {'optim state MB/rank':>20} {'in use GB':>10} {'peak GB':>8}"
          "   (the largest rank's)")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            r = launch_stage(args, stage, Path(tmp) / f"zero{stage}.json")
            params = max(x["params_bytes"] for x in r["ranks"]) / MB
            state = max(x["optimizer_state_bytes"] for x in r["ranks"]) / MB
            now = max(x["now_gb"] for x in r["ranks"])
            peak = max(x["peak_gb"] for x in r["ranks"])
            print(f"{r['zero_stage']:>4} {params:>15.1f} {state:>20.1f} {now:>10.2f} {peak:>8.2f}   {r['model']}, "
                  f"{r['precision']}, {r['world_size']} ranks on {r['device']}")
            if not args.no_record:
                common.append_row(SECTION, COLUMNS, [
                    date, machine, r["device"], str(r["world_size"]),
                    f"{args.config} {' '.join(args.overrides)}".strip(), r["model"], r["precision"],
                    str(r["zero_stage"]), f"{params:.1f}", f"{state:.1f}", f"{now:.2f}", f"{peak:.2f}", versions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
