"""Run several training jobs in one launch of N ranks and write what each rank saw.

    deepspeed --num_gpus 2 tests/workers/train_jobs.py JOBS.json OUT_DIR

JOBS.json: a list of {"name": ..., "config": path, "overrides": [...], "grad_scale": optional}. For each job, each rank
writes OUT_DIR/<name>.rank<R>.json with the run summary (per-step losses, engine facts). Several
jobs share one launch because starting ranks costs more than a tiny run itself.
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


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    jobs = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    for job in jobs:
        cfg = load_config(job.get("config"), job.get("overrides", []))
        try:
            with wrong_gradient_scale(job.get("grad_scale")):
                summary = asdict(train(cfg, argv=[job["name"]]))
        except UserError as err:
            summary = {"error": str(err)}
        summary["run_dir"] = str(summary.get("run_dir", ""))
        (out / f"{job['name']}.rank{rank}.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
