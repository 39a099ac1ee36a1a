"""The matmul rate this device really reaches, per math mode, beside the peak MFU is reported against.

    python bench/matmul_peak.py [--n 8192] [--repeats 20] [--modes bf16,fp16,tf32,fp32]

An n x n x n matmul (2n^3 FLOPs), best of `--repeats` timed runs after a warm-up, on the GPU when
there is one (events around each run), else on this process's CPU threads (--n defaults to 1024
there; bf16 is emulated on CPUs without bf16 instructions). `tf32` is an fp32 matmul with TF32
tensor cores allowed. The "of table" column divides by dsgpt's peak table (dsgpt/metrics.py), which
MFU uses on GPUs. Rows go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTION = "Measured matmul rate (bench/matmul_peak.py)"
COLUMNS = ["date", "machine", "device", "math mode", "n", "best TFLOP/s", "of table peak", "versions"]
MODES = ("bf16", "fp16", "tf32", "fp32")


def measure(mode: str, n: int, repeats: int, on_gpu: bool) -> float:
    """Best FLOP/s of an n^3 matmul in `mode` over `repeats` runs."""
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, torch.float32)
    device = "cuda" if on_gpu else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        a @ b  # warm up (and pick the kernel)
        best = 0.0
        for _ in range(repeats):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                a @ b
                seconds = time.perf_counter() - t0
            best = max(best, 2 * n ** 3 / max(seconds, 1e-9))
        return best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="matrix size (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or args.repeats < 1 or (args.n is not None and args.n < 1):
        print(f"bench/matmul_peak.py: --modes takes {', '.join(MODES)} (got {', '.join(bad) or args.modes}); "
              f"--n and --repeats must be positive.", file=sys.stderr)
        return 2
    import torch

    from bench import common
    from dsgpt.metrics import gpu_peak_flops
    on_gpu = torch.cuda.is_available()
    n = args.n or (8192 if on_gpu else 1024)
    device = torch.cuda.get_device_name() if on_gpu else f"CPU x{torch.get_num_threads()} threads"
    date, machine, versions = common.context_cells()
    for mode in modes:
        if on_gpu and mode == "bf16" and not torch.cuda.is_bf16_supported():
            print(f"{mode}: not supported on {device}")
            continue
        rate = measure(mode, n, args.repeats, on_gpu)
        table = gpu_peak_flops(device, mode) if on_gpu else None
        share = f"{rate / table:.1%}" if table else "-"
        print(f"{mode}: {rate / 1e12:,.2f} TFLOP/s at n={n} on {device} (table peak: "
              f"{f'{table / 1e12:,.0f} TFLOP/s, reached {share}' if table else 'none'})", flush=True)
        if not args.no_record:
            common.append_row(SECTION, COLUMNS, [date, machine, device, mode, str(n), f"{rate / 1e12:,.2f}", share,
                                                 versions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
