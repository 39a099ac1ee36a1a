"""A rank that all-reduces in a loop under the watchdog, for tests/test_watchdog.py.

    deepspeed --num_gpus 2 tests/workers/watchdog_probe.py DIR [--timeout S] [--interval S]
        [--steps N] [--phase-at STEP --phase-seconds S] [--hang-rank R --hang-at STEP]

Heartbeats go to DIR; each rank writes DIR/pid.RANK so the test can signal it. gloo's own
timeout is 10 minutes, so when a peer stops it is the watchdog, not gloo, that ends the wait.
Like the trainer, SIGTERM only sets a flag (dsgpt.train.signals), and an exception goes through
Watchdog.handle_exception before it propagates. Prints `PROBE_DONE rank R steps N phase S` at a
clean end.
"""

import argparse
import datetime
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as td

from dsgpt.train import signals
from dsgpt.watchdog import Watchdog


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=3000)  # ~5 min: a bound if a test forgets us
    ap.add_argument("--phase-at", type=int, default=0)
    ap.add_argument("--phase-seconds", type=float, default=0.0)
    ap.add_argument("--hang-rank", type=int, default=-1)  # this rank sleeps (alive, beating) at --hang-at
    ap.add_argument("--hang-at", type=int, default=0)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()

    torch.set_num_threads(1)
    td.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = td.get_rank(), td.get_world_size()
    signals.install()
    box = [uuid.uuid4().hex if rank == 0 else None]
    td.broadcast_object_list(box, src=0)  # the launch id every rank agrees on
    wd = Watchdog(args.dir, rank, world, socket.gethostname(), int(os.environ.get("GROUP_RANK", 0)),
                  timeout_s=args.timeout, interval_s=args.interval, launch_id=box[0]).start()
    (args.dir / f"pid.{rank}").write_text(str(os.getpid()))

    t = torch.ones(1)
    phase_s = 0.0
    try:
        for step in range(1, args.steps + 1):
            td.all_reduce(t)
            wd.progress(step)
            if rank == args.hang_rank and step == args.hang_at:
                time.sleep(3600)  # a live hang: not in a collective, its heartbeat stays fresh
            if step == args.phase_at:
                t0 = time.monotonic()
                with wd.phase("checkpoint"):  # every rank at once, longer than the timeout
                    time.sleep(args.phase_seconds)
                phase_s = time.monotonic() - t0
            time.sleep(0.1)
        td.barrier()
    except BaseException as exc:
        wd.handle_exception(exc)
        raise
    wd.stop()
    print(f"PROBE_DONE rank {rank} steps {args.steps} phase {phase_s:.1f}", flush=True)
    td.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
