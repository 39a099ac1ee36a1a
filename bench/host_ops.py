"""The host's share of a training step: the ATen operations it dispatches, by phase.

    python bench/host_ops.py --config configs/gpt2-124m.yaml [--steps 3] [--top 8] \
        --variant "precision=bf16 deepspeed.zero_stage=1" --variant "precision=bf16-mixed deepspeed.zero_stage=0" \
        [key=value ...]

On a GPU every dispatched operation costs host time (the dispatcher, then usually a kernel launch:
several microseconds each) whatever the tensor sizes, so a step that dispatches thousands of small
per-parameter operations is bound by the host long before the GPU is busy. The count does not
depend on the machine: it can be taken on a CPU and still says how much work the host has per step
on a GPU. Each variant (extra key=value overrides) builds the engine launch/train.py builds (one
rank, random tokens), runs `--warmup` steps through dsgpt's step (dsgpt.train.step.train_step), then
counts the operations of `--steps` steps under a TorchDispatchMode, split by the engine call they
happen in: forward, backward (autograd's own operations and DeepSpeed's gradient hooks), step (the
optimizer and DeepSpeed's checks around it), other (moving the batch, reading the loss). The same
steps are then timed without counting ("step ms", on this machine). Rows go to bench/RESULTS.md.

Under ZeRO 0 with fp32 weights (fp32, bf16-mixed) dsgpt's update is torch's fused AdamW on CPU and
GPU alike, a few operations in all. DeepSpeed's optimizers (ZeRO 1-3, bf16, fp16) hold torch's AdamW,
fused on a GPU but one parameter at a time on a CPU (about 9 operations each): count their optimizer
step on the GPU, or read a CPU's "step" column for them as an upper bound.

model.compile=true is refused: a dispatch mode sees through compiled graphs only by breaking them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402  (after the path: runs as a script from any directory)

SECTION = "Host operations per training step (bench/host_ops.py)"
COLUMNS = ["date", "machine", "device", "config", "variant", "forward", "backward", "step", "other", "ops per step",
           "step ms", "versions"]
PHASES = ("forward", "backward", "step", "other")
RESULT = "HOST_OPS_RESULT "


def count_ops(bench, steps: int, warmup: int) -> tuple[Counter, float]:
    """({(phase, op): count per step}, seconds per step uncounted) over `steps` steps after `warmup`."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsgpt.data.loader import StepBatch
    from dsgpt.train.step import train_step

    counts: Counter = Counter()
    phase = ["other"]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[(phase[0], str(func.overloadpacket.__name__))] += 1
            return func(*args, **(kwargs or {}))

    engine = bench.engine
    for name in ("forward", "backward", "step"):  # instance attributes: nn.Module's __call__ finds forward here
        method = getattr(engine, name)

        def in_phase(*args, _method=method, _name=name, **kwargs):
            outer, phase[0] = phase[0], _name
            try:
                return _method(*args, **kwargs)
            finally:
                phase[0] = outer
        setattr(engine, name, in_phase)

    t, m = bench.cfg.train, bench.mcfg
    tokens = t.micro_batch_size * t.grad_accum_steps * m.block_size * bench.ctx.world_size
    micro = common.random_micro_batches(bench, torch.Generator().manual_seed(0))  # made here: not counted

    def step(i: int) -> None:
        train_step(engine, StepBatch(i, micro, tokens), bench.ctx.device)

    for i in range(warmup):
        step(i)
    with Count():
        for i in range(steps):
            step(warmup + i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + steps + i)  # each step ends reading its loss back: the device has finished
    seconds = (time.perf_counter() - t0) / steps
    return Counter({k: v / steps for k, v in counts.items()}), seconds


def worker(config: str, overrides: list[str], steps: int, warmup: int) -> None:
    """One variant in its own process (an engine per process, as DeepSpeed expects); prints one RESULT line."""
    from dsgpt import dist
    bench = common.build(config, overrides)
    if bench.cfg.model.compile:
        raise SystemExit("bench/host_ops.py counts dispatched operations, which torch.compile's graphs hide: "
                         f"this run compiles the model ({config} or its overrides): add model.compile=false.")
    per_op, seconds = count_ops(bench, steps, warmup)
    facts = {"device": common.device_name(bench), "model": common.model_name(bench), "seconds": seconds,
             "ops": [[phase, op, n] for (phase, op), n in per_op.items()]}
    print(RESULT + json.dumps(facts), flush=True)
    dist.teardown()


def run_variant(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    env = common.child_env()  # a plain single process: one rank
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", config, "--steps", str(steps),
           "--warmup", str(warmup), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench/host_ops.py: the variant {' '.join(overrides) or '(as configured)'} failed "
                         f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--variant", action="append", default=[], metavar='"K=V K=V"',
                   help="extra overrides of one variant, quoted (repeat for more; default: the config as is)")
    p.add_argument("--steps", type=int, default=3, help="counted steps (then as many timed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=6, help="the most frequent operations printed per phase")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.config, args.overrides, args.steps, args.warmup)
        return 0
    variants = [shlex.split(v) for v in args.variant] or [[]]
    base = f"{args.config} {' '.join(args.overrides)}".strip()
    print(f"{base}: operations dispatched per step ({args.steps} counted after {args.warmup})")
    for extra in variants:
        res = run_variant(args.config, [*args.overrides, *extra], args.steps, args.warmup)
        by_phase = Counter()
        for phase, _, n in res["ops"]:
            by_phase[phase] += n
        total = sum(by_phase.values())
        label = " ".join(extra) or "as configured"
        print(f"  {label} ({res['device']}, {res['model']}): {total:,.0f} ops per step = "
              + ", ".join(f"{ph} {by_phase[ph]:,.0f}" for ph in PHASES) + f"; step {res['seconds'] * 1000:.1f} ms")
        for ph in PHASES:
            top = sorted(((n, op) for phase, op, n in res["ops"] if phase == ph), reverse=True)[:args.top]
            if top:
                print(f"    {ph:<8} " + ", ".join(f"{op} {n:,.0f}" for n, op in top))
        if not args.no_record:
            date, machine, versions = common.context_cells()
            common.append_row(SECTION, COLUMNS, [
                date, machine, res["device"], base, label, *(f"{by_phase[ph]:,.0f}" for ph in PHASES),
                f"{total:,.0f}", f"{res['seconds'] * 1000:.1f}", versions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
