"""Training throughput: tokens/s, MFU and memory of a config's model, on random tokens.

    python bench/throughput.py --config configs/tiny.yaml [--steps 20] [key=value ...]
    deepspeed --num_gpus 1 bench/throughput.py --config configs/gpt2-124m.yaml precision=bf16

Runs the same engine and train step as launch/train.py (no data loading, no eval, no checkpoints),
drops the warmup steps, prints the figures and appends a row to bench/RESULTS.md on rank 0.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("| date | machine | device | ranks | config | model | precision | ZeRO | micro x GAS x seq "
          "| tokens/s | MFU | peak mem GB | versions |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


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
    from dsgpt.config import load_config
    from dsgpt.ds_config import resolve_ds_config
    from dsgpt.metrics import memory_stats, peak_flops
    from dsgpt.model import GPT, flops_per_token
    from dsgpt.train.engine import build_engine
    from dsgpt.train.run_setup import check_precision, model_config
    from dsgpt.train.step import train_step

    cfg = load_config(args.config, args.overrides)
    check_precision(cfg)
    ctx = dist.setup()
    # The vocabulary the config would train with: the built-in corpus's, or GPT-2's size.
    vocab = cfg.data.builtin_vocab_size if cfg.data.path == "builtin" else 50257
    mcfg = model_config(cfg, vocab_size=vocab)
    torch.manual_seed(cfg.run.seed + ctx.rank)
    model = GPT(mcfg)
    n_params = model.num_params(non_embedding=False)
    engine, _ = build_engine(model, cfg, resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu), ctx.on_gpu)
    t = cfg.train
    gen = torch.Generator().manual_seed(ctx.rank)

    def batch():
        x = torch.randint(0, mcfg.vocab_size, (t.micro_batch_size, mcfg.block_size + 1), generator=gen)
        return [(x[:, :-1], x[:, 1:])] * t.grad_accum_steps

    times = []
    for i in range(args.warmup + args.steps):
        mb = batch()
        if ctx.on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(engine, mb, ctx.world_size, ctx.device)
        if ctx.on_gpu:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = t.micro_batch_size * t.grad_accum_steps * ctx.world_size * mcfg.block_size
    step_time = statistics.median(times)
    tok_s = tokens / step_time
    peak = peak_flops(ctx.device_type, cfg.precision)
    mfu = flops_per_token(mcfg) * tok_s / (peak * ctx.world_size) if peak else float("nan")
    mem = max(memory_stats(ctx.device_type).values())
    if ctx.is_main:
        device = torch.cuda.get_device_name() if ctx.on_gpu else f"CPU x{torch.get_num_threads()} threads"
        model = f"{mcfg.n_layer}L/{mcfg.n_embd}d/{mcfg.n_head}h, vocab {mcfg.vocab_size} ({n_params / 1e6:.1f}M)"
        zero = engine.zero_optimization_stage()
        print(f"{args.config}: {model}, {cfg.precision}, ZeRO {zero}, {ctx.world_size} rank(s) on {device}")
        print(f"  step time {step_time * 1000:.1f} ms (median of {len(times)}), {tok_s:,.0f} tokens/s, "
              f"MFU {mfu:.1%} (peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s per device), "
              f"peak memory {mem:.2f} GB")
        if not args.no_record:
            versions = ", ".join(f"{n} {metadata.version(n)}" for n in ("torch", "deepspeed"))
            row = (f"| {time.strftime('%Y-%m-%d')} | {platform.node()} ({os.cpu_count()} cores) | {device} | "
                   f"{ctx.world_size} | {args.config} {' '.join(args.overrides)} | {model} | {cfg.precision} | "
                   f"{zero} | {t.micro_batch_size} x {t.grad_accum_steps} x {mcfg.block_size} | {tok_s:,.0f} | "
                   f"{mfu:.1%} | {mem:.2f} | {versions} |\n")
            if not RESULTS.exists():
                RESULTS.write_text("# Benchmark results\n\nAppended by `bench/*.py`; MFU uses "
                                   "6N + 12*L*H*Q*T FLOPs per token (see dsgpt/metrics.py).\n\n" + HEADER)
            with open(RESULTS, "a") as f:
                f.write(row)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
