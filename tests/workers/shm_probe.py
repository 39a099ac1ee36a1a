"""A rank that brings up DeepSpeed's CPU comm and all-reduces through its shared memory, for
tests/test_hygiene.py.

    deepspeed --num_gpus 2 tests/workers/shm_probe.py OUT_DIR [--raw] [--hold]

Through dsgpt.dist.setup by default; with --raw, through deepspeed.init_distributed alone (as a
rank killed before dsgpt releases its buffer would leave things). Each rank writes
OUT_DIR/rank<R>.json: its pid, the all-reduce buffers it maps (from /proc/self/maps) and whether
an all-reduce through DeepSpeed's shm op summed right. With --hold it then waits to be killed.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def mapped_buffers() -> list[str]:
    with open("/proc/self/maps") as f:
        return sorted({line.split(None, 5)[5].strip() for line in f if "deepspeed_allreduce_buffer" in line})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    if args.raw:
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        from dsgpt import dist
        dist.setup()
    import deepspeed.comm as ds_comm
    rank, world = ds_comm.get_rank(), ds_comm.get_world_size()
    sums_ok = []
    for n in (1000, 1 << 20):  # DeepSpeed's small-message path and its large one
        t = torch.full((n,), float(rank + 1))
        ds_comm.inference_all_reduce(t)
        sums_ok.append(bool(torch.all(t == world * (world + 1) / 2)))
    backend = ds_comm.comm.cdb
    report = {"pid": os.getpid(), "rank": rank, "mapped": mapped_buffers(), "sums_ok": sums_ok,
              "shm_op": backend.shm_comm_op is not None,
              "shm_level": getattr(backend, "shm_vector_kernel_level", 0)}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report))
    tmp.rename(args.out / f"rank{rank}.json")
    if args.hold:
        time.sleep(300)  # a bound if a test forgets us
    return 0


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
