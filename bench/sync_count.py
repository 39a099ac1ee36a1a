"""Host synchronisations in the training loop on a GPU, counted by call site.

    python bench/sync_count.py --config configs/gpt2-124m.yaml [--steps 30] [key=value ...]

Trains `--steps` steps of a config on one GPU through the real trainer (dsgpt.train.trainer.train,
logging every `train.log_interval` steps, no evaluation or saving until the end) with
torch.cuda.set_sync_debug_mode("warn"), and counts every synchronising CUDA call by where it comes
from: the loop's phase (the step, the read-back of the dispatched steps, the stop check, logging,
the data loader's thread, set-up), the innermost dsgpt frame and the innermost frame outside dsgpt
(DeepSpeed's or torch's). A count equal to the steps is a sync every step; one equal to
steps / log_interval happens only at log steps. Set-up, the final evaluation and checkpoint are
listed apart. Rows go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTION = "Host synchronisations in the training loop (bench/sync_count.py)"
COLUMNS = ["date", "machine", "device", "config", "phase", "dsgpt call site", "synchronising call", "count",
           "per step", "versions"]
# torch's message for a synchronising call under set_sync_debug_mode("warn").
SYNC_WARNING = "called a synchronizing CUDA operation"
# The loop's phases, by the function a frame on the stack belongs to (the first found from the
# innermost frame outwards names the phase).
PHASES = {"train_step": "step", "settle": "read-back", "stop_reason": "stop check", "_write": "logging",
          "evaluate": "evaluation", "save": "checkpoint", "finish": "finish", "__init__": "set-up",
          "log_sample": "sample", "_fill": "data loader"}
DSGPT = str(REPO / "dsgpt")


def call_site(stack: list[traceback.FrameSummary]) -> tuple[str, str, str]:
    """(phase, innermost dsgpt frame, innermost frame outside dsgpt) of a warning's stack."""
    ours = [f for f in stack if f.filename.startswith(DSGPT)]
    phase = next((PHASES[f.name] for f in reversed(ours) if f.name in PHASES), "other")
    where = ours[-1] if ours else None
    inner = next((f for f in reversed(stack) if not f.filename.startswith(DSGPT) and
                  "warnings" not in Path(f.filename).name and f.filename != __file__), None)

    def show(f):
        if f is None:
            return "-"
        path = Path(f.filename)
        # Relative to the closest root: site-packages (a venv may sit inside the repo) before the repo.
        roots = [r for r in (REPO, *map(Path, sys.path)) if r.name and path.is_relative_to(r)]
        if roots:
            path = path.relative_to(max(roots, key=lambda r: len(r.parts)))
        return f"{path}:{f.lineno} {f.name}"
    return phase, show(where), show(inner)


class SyncCounter:
    """Counts warnings about synchronising calls (from any thread) by call site while active."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __enter__(self):
        self._previous = warnings.showwarning
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")  # every occurrence, not the first per site

        def record(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING in str(message):
                # Drop this function's own frame: the stack ends where the call was made.
                self.counts[call_site(traceback.extract_stack()[:-1])] += 1
            else:
                self._previous(message, category, filename, lineno, file, line)
        warnings.showwarning = record
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        return False


def count_syncs(config: str, overrides: list[str], steps: int) -> tuple[Counter, object]:
    import tempfile

    import torch

    from dsgpt.config import load_config
    from dsgpt.train.trainer import train
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [*overrides, f"run.out_dir={out}", "run.name=syncs", f"train.max_steps={steps}",
                                   "train.eval_interval=1000000000", "train.save_interval=1000000000",
                                   "train.eval_batches=1", "train.save_best=false", "train.sample_interval=0"])
        with SyncCounter() as counter:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, argv=sys.argv)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return counter.counts, cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench/sync_count.py counts CUDA synchronisations (torch.cuda.set_sync_debug_mode) and needs a "
              "CUDA GPU; none is visible here. Run it on a GPU machine.", file=sys.stderr)
        return 2
    os.environ.setdefault("WORLD_SIZE", "1")
    counts, cfg = count_syncs(args.config, args.overrides, args.steps)
    device = torch.cuda.get_device_name()
    print(f"{args.config} {' '.join(args.overrides)}: {args.steps} steps, log_interval {cfg.train.log_interval}, "
          f"on {device}")
    print(f"{'phase':<12} {'count':>6} {'per step':>9}  dsgpt call site  <-  synchronising call")
    from bench import common
    date, machine, versions = common.context_cells()
    for (phase, ours, inner), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"{phase:<12} {n:>6} {n / args.steps:>9.2f}  {ours}  <-  {inner}")
        if not args.no_record:
            common.append_row(SECTION, COLUMNS, [
                date, machine, device, f"{args.config} {' '.join(args.overrides)}".strip(), phase, f"`{ours}`",
                f"`{inner}`", str(n), f"{n / args.steps:.2f}", versions])
    return 0


if __name__ == "__main__":
    sys.exit(main())
