"""Training throughput of a config on the real training path: tokens/s, step time, MFU, peak memory.

    python bench/throughput.py --config configs/tiny.yaml [--ranks 2] [--steps 20] [key=value ...]
    python bench/throughput.py --config configs/tiny.yaml --ranks 2 --matrix zero=0,1,2,3 offload=off,on ac=off,on micro=4,8
    python bench/throughput.py --config configs/gpt2-124m.yaml --ranks 1 data.path=data/corpus precision=bf16
    python bench/throughput.py --config configs/tiny.yaml --ranks 2 --matrix block=256,512,1024,2048
    python bench/throughput.py --config configs/tiny.yaml --ranks 2 --matrix width=128,256,512,1024

Each cell runs launch/train.py (data loader, trainer, collectives, logging every `--log-interval`
steps, the GPU configs' 10 included, where the trainer reads the steps back; no evaluation or saving
inside the timed steps) for `--warmup` + `--steps` steps and reads its metrics.jsonl: the median
step time of the timed windows, tokens/s from it, the median MFU (6N + 12·L·H·Q·T per
token; the peak measured on CPU, from the device table on GPU, where the MFU of the rate an 8192^3
matmul really reaches in the run's math mode follows in brackets: bench/matmul_peak.py) and peak
memory (RSS on CPU, max_memory_allocated on GPU; rank 0's). `--matrix` runs every combination of
ZeRO stage, optimizer offload (the zero2_offload / zero3_offload templates; not with ZeRO 0),
activation checkpointing and micro batch; the scaling axes are block size (model.block_size) and
width (model.n_embd, one head per 64 channels as in GPT-2). Rows go to bench/RESULTS.md with the
machine, versions and date.
"""

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402  (after the path: runs as a script from any directory)

SECTION = "Training throughput on the real training path (bench/throughput.py)"
COLUMNS = ["date", "machine", "device", "ranks", "config", "cell", "tokens/s", "step ms", "MFU", "peak mem GB",
           "versions"]
AXES = {"zero": ("0", "1", "2", "3"), "offload": ("off", "on"), "ac": ("off", "on"), "micro": None, "block": None,
        "width": None}
HEAD_DIM = 64  # the width axis keeps GPT-2's head size: n_head = n_embd / 64


def parse_matrix(items: list[str]) -> list[dict]:
    """`zero=0,1 ac=off,on` -> every combination, as {axis: value}; no axes -> one empty cell."""
    axes = {}
    for item in items:
        key, _, values = item.partition("=")
        if key not in AXES or not values:
            raise SystemExit(f"--matrix {item!r}: give AXIS=v1,v2 with AXIS one of {', '.join(AXES)}")
        axes[key] = values.split(",")
        allowed = AXES[key]
        bad = [v for v in axes[key] if (allowed and v not in allowed) or (not allowed and not v.isdigit())]
        if bad:
            raise SystemExit(f"--matrix {key}: {', '.join(bad)} not allowed ({', '.join(allowed or ['integers'])})")
        if key == "width" and any(int(v) % HEAD_DIM for v in axes[key]):
            raise SystemExit(f"--matrix width: give multiples of {HEAD_DIM} (one attention head per {HEAD_DIM} "
                             f"channels), not {values}")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def cell_overrides(cell: dict):
    """(overrides, label) of a matrix cell; None when the cell cannot exist (offload needs ZeRO >= 1)."""
    out = []
    zero = cell.get("zero")
    if cell.get("offload") == "on":
        if zero == "0":
            return None
        out.append("deepspeed.config=ds_configs/" + ("zero3_offload.json" if zero == "3" else "zero2_offload.json"))
    if zero is not None:
        out.append(f"deepspeed.zero_stage={zero}")
    if "ac" in cell:
        out.append(f"model.activation_checkpointing={'true' if cell['ac'] == 'on' else 'false'}")
    if "micro" in cell:
        out.append(f"train.micro_batch_size={cell['micro']}")
    if "block" in cell:
        out.append(f"model.block_size={cell['block']}")
    if "width" in cell:
        out += [f"model.n_embd={cell['width']}", f"model.n_head={int(cell['width']) // HEAD_DIM}"]
    label = " ".join(f"{k}={v}" for k, v in cell.items())
    return out, label


def device_cell(ranks: int) -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{ranks}"
    return f"CPU, {max(1, (os.cpu_count() or 1) // ranks)} threads x {ranks} ranks"


def measured_matmul_peak(config: str, overrides: list[str]):
    """On a GPU: (table peak, measured peak) FLOP/s of the run's math mode; None on CPU, where the
    trainer's MFU already uses a measured peak."""
    import torch
    if not torch.cuda.is_available():
        return None
    from bench.matmul_peak import measure
    from dsgpt.config import load_config
    from dsgpt.metrics import gpu_peak_flops, math_mode
    cfg = load_config(config, overrides)
    mode = math_mode(cfg.precision, cfg.tf32)
    table = gpu_peak_flops(torch.cuda.get_device_name(), mode)
    measured = measure(mode, 8192, 10, on_gpu=True)
    torch.cuda.empty_cache()  # the trainer's children get the whole GPU
    print(f"measured {mode} matmul (8192^3, best of 10): {measured / 1e12:,.1f} TFLOP/s; table peak "
          f"{(table or 0) / 1e12:,.0f} TFLOP/s")
    return (table, measured) if table else None


def mfu_cell(mfu, peaks) -> str:
    """`28.7%`, or on a GPU `28.7% (41.0% of measured)`."""
    if mfu is None:
        return "n/a"
    if not peaks:
        return f"{mfu:.1%}"
    table, measured = peaks
    return f"{mfu:.1%} ({mfu * table / measured:.1%} of measured)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--log-interval", type=int, default=1,
                   help="train.log_interval: the trainer reads the steps back (one sync) every this many steps")
    p.add_argument("--matrix", nargs="*", default=[], metavar="AXIS=V1,V2",
                   help="zero=0,1,2,3 offload=off,on ac=off,on micro=4,8 block=256,2048 width=256,512")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("overrides", nargs="*")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cells = parse_matrix(args.matrix)
    device = device_cell(args.ranks)
    peaks = measured_matmul_peak(args.config, args.overrides)
    print(f"{args.config} {' '.join(args.overrides)} on {device}: {args.steps} timed steps after {args.warmup}")
    for cell in cells:
        made = cell_overrides(cell)
        if made is None:
            print(f"  {cell}: skipped (optimizer offload needs ZeRO 1 or more)")
            continue
        extra, label = made
        res = common.run_trainer(args.config, [*args.overrides, *extra], args.ranks, args.steps, args.warmup,
                                 log_interval=args.log_interval)
        mfu = mfu_cell(res["mfu"], peaks)
        print(f"  {label or 'as configured'}: {res['tokens_s']:,.0f} tokens/s, step {res['step_s'] * 1000:.1f} ms, "
              f"MFU {mfu}, peak memory {res['mem_gb']:.2f} GB", flush=True)
        if not args.no_record:
            date, machine, versions = common.context_cells()
            common.append_row(SECTION, COLUMNS, [
                date, machine, device, str(args.ranks), f"{args.config} {' '.join(args.overrides)}".strip(),
                label or "-", f"{res['tokens_s']:,.0f}", f"{res['step_s'] * 1000:.1f}", mfu, f"{res['mem_gb']:.2f}",
                versions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
