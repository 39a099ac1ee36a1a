"""Run several training jobs in one launch of N ranks and write what each rank saw.

    deepspeed --num_gpus 2 tests/workers/train_jobs.py JOBS.json OUT_DIR

JOBS.json: a list of {"name": ..., "config": path, "overrides": [...], "grad_scale": optional,
"count_reads": optional}. For each job, each rank writes OUT_DIR/<name>.rank<R>.json with the run
summary (per-step losses, engine facts; with count_reads, what each step read back from its tensors,
the steps at which the trainer read its dispatched steps back and the collectives of each stop
check). Several jobs share one launch because starting ranks costs more than a tiny run itself.
"""

import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dsgpt.config import load_config  # noqa: E402
from dsgpt.errors import UserError  # noqa: E402
from dsgpt.train.trainer import train  # noqa: E402


@contextlib.contextmanager
def wrong_gradient_scale(factor):
    """A deliberate bug for mutation tests: every backward pass scales the gradients by `factor`
    while the reported loss stays right."""
    if factor is None:
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine
    original = DeepSpeedEngine.backward

    def scaled(self, loss, *args, **kwargs):
        return original(self, loss * factor, *args, **kwargs)

    DeepSpeedEngine.backward = scaled
    try:
        yield
    finally:
        DeepSpeedEngine.backward = original


# Tensor calls that bring a value to the host: on a GPU each one waits for the device.
READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "equal"}


@contextlib.contextmanager
def counted_reads(enabled: bool, seen: dict):
    """Records the reads made inside each Run.train_step (seen["step_reads"]: step -> call names),
    the steps at which Run.settle read dispatched steps back (seen["read_back_at"]) and the
    collectives of each stop check (seen["stop_collectives"])."""
    if not enabled:
        yield
        return
    from torch.overrides import TorchFunctionMode

    from dsgpt.train.trainer import Run

    class Reads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in READS:
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    import torch.distributed as td

    from dsgpt import dist

    original_step, original_settle, original_stop = Run.train_step, Run.settle, Run.stop_reason
    original_all_reduce = td.all_reduce
    seen.update(step_reads={}, read_back_at=[], stop_collectives=[])

    def train_step(run, step):
        with Reads() as reads:
            original_step(run, step)
        seen["step_reads"][step] = reads.names

    def settle(run, now):
        if run.unread.steps:
            seen["read_back_at"].append(now)
        return original_settle(run, now)

    def stop_reason(run):
        """Records each collective of the stop check: its group and where its tensor lives."""
        def all_reduce(tensor, *args, group=None, **kwargs):
            on = "host group" if group is not None and group is dist.host_group() else "default group"
            seen["stop_collectives"].append(f"{on}, {tensor.device.type}")
            return original_all_reduce(tensor, *args, group=group, **kwargs)
        td.all_reduce = all_reduce
        try:
            return original_stop(run)
        finally:
            td.all_reduce = original_all_reduce

    Run.train_step, Run.settle, Run.stop_reason = train_step, settle, stop_reason
    try:
        yield
    finally:
        Run.train_step, Run.settle, Run.stop_reason = original_step, original_settle, original_stop


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    jobs = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    for job in jobs:
        cfg = load_config(job.get("config"), job.get("overrides", []))
        seen: dict = {}
        try:
            with wrong_gradient_scale(job.get("grad_scale")), counted_reads(job.get("count_reads", False), seen):
                summary = asdict(train(cfg, argv=[job["name"]]))
        except UserError as err:
            summary = {"error": str(err)}
        summary.update(seen)
        summary["run_dir"] = str(summary.get("run_dir", ""))
        (out / f"{job['name']}.rank{rank}.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
