"""One Slurm task's view of the world, for tests/test_slurm_cluster.py.

    srun python tests/workers/slurm_env_probe.py [--wait-signal DIR] [--timeout S]

Prints one line `PROBE {json}` with the task's SLURM_* ids, node list and hostname.
With --wait-signal: installs a SIGUSR1 handler, writes DIR/ready.<procid>, waits for the signal
(at most --timeout seconds), then writes DIR/usr1.<procid> and exits 0 (exit 3 on timeout).
"""

import argparse
import json
import os
import signal
import socket
import sys
import time

KEYS = ("SLURM_PROCID", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST",
        "SLURMD_NODENAME", "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_TASK_ID")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wait-signal", metavar="DIR")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()

    got = []
    if args.wait_signal:
        def on_usr1(signum, frame):
            got.append(signum)
            # More USR1 may follow (scancel --full signals the task, srun forwards its own copy, the
            # batch shell's trap another). Ignore them from now on: at exit Python resets handled
            # signals to SIG_DFL (not ignored ones), and a late USR1 would then kill the task.
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

        signal.signal(signal.SIGUSR1, on_usr1)

    info = {k: os.environ.get(k) for k in KEYS}
    info["hostname"] = socket.gethostname()
    info["pid"] = os.getpid()
    print("PROBE " + json.dumps(info, sort_keys=True), flush=True)
    if not args.wait_signal:
        return 0

    rank = os.environ.get("SLURM_PROCID", "0")
    os.makedirs(args.wait_signal, exist_ok=True)
    with open(os.path.join(args.wait_signal, f"ready.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + args.timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    if not got:
        print(f"PROBE_TIMEOUT rank={rank}", flush=True)
        return 3
    with open(os.path.join(args.wait_signal, f"usr1.{rank}"), "w") as f:
        f.write(str(len(got)))
    print(f"PROBE_USR1 rank={rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
