"""Training throughput: tokens/s, MFU and memory of a config's model, on random tokens.

    python bench/throughput.py --config configs/tiny.yaml [--steps 20] [key=value ...]
    deepspeed --num_gpus 1 bench/throughput.py --config configs/gpt2-124m.yaml precision=bf16

Runs the same engine and train step as launch/train.py (no data loading, no eval, no checkpoints),
drops the warmup steps, prints the figures and appends a row to bench/RESULTS.md on rank 0.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402  (after the path: runs as a script from any directory)

SECTION = "Training throughput (bench/throughput.py)"
COLUMNS = ["date", "machine", "device", "ranks", "config", "model", "precision", "ZeRO", "micro x GAS x seq",
           "tokens/s", "MFU", "peak mem GB", "versions"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch

    from dsgpt import dist
    from dsgpt.metrics import peak_flops
    from dsgpt.model import flops_per_token
    from dsgpt.data.loader import step_batch
    from dsgpt.train.step import train_step

    b = common.build(args.config, args.overrides)
    ctx, t, mcfg = b.ctx, b.cfg.train, b.mcfg
    gen = torch.Generator().manual_seed(ctx.rank)
    times = []
    for i in range(args.warmup + args.steps):
        mb = common.random_micro_batches(b, gen)
        if ctx.on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(b.engine, step_batch(mb), ctx.device)
        if ctx.on_gpu:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = t.micro_batch_size * t.grad_accum_steps * ctx.world_size * mcfg.block_size
    step_time = statistics.median(times)
    tok_s = tokens / step_time
    peak = peak_flops(ctx.device_type, b.cfg.precision, b.cfg.tf32)
    mfu = flops_per_token(mcfg) * tok_s / (peak * ctx.world_size) if peak else float("nan")
    (mem,) = dist.all_reduce_max([common.peak_memory_gb(ctx.on_gpu)], ctx.device)
    if ctx.is_main:
        device, model = common.device_name(b), common.model_name(b)
        zero = b.engine.zero_optimization_stage()
        print(f"{args.config}: {model}, {b.cfg.precision}, ZeRO {zero}, {ctx.world_size} rank(s) on {device}")
        print(f"  step time {step_time * 1000:.1f} ms (median of {len(times)}), {tok_s:,.0f} tokens/s, "
              f"MFU {mfu:.1%} (peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s per device), "
              f"peak memory {mem:.2f} GB (the largest rank's)")
        if not args.no_record:
            date, machine, versions = common.context_cells()
            common.append_row(SECTION, COLUMNS, [
                date, machine, device, str(ctx.world_size), f"{args.config} {' '.join(args.overrides)}".strip(),
                model, b.cfg.precision, str(zero),
                f"{t.micro_batch_size} x {t.grad_accum_steps} x {mcfg.block_size}", f"{tok_s:,.0f}",
                f"{mfu:.1%}", f"{mem:.2f}", versions])
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
