"""Build real DeepSpeed engines and write what each rank holds, to check `dsgpt plan` against.

    python tests/workers/plan_probe.py JOBS.json OUT_DIR                   # 1 rank
    deepspeed --num_gpus 2 tests/workers/plan_probe.py JOBS.json OUT_DIR   # 2 ranks

JOBS.json: a list of {"name": ..., "overrides": [...], "steps": N} on top of configs/tiny.yaml. Each
job builds the engine launch/train.py would build (bench/common.py, random tokens, no data), trains N
steps and writes OUT_DIR/<name>.rank<R>.json: parameter bytes held (ZeRO-3: this rank's shards),
fp32 master bytes, optimizer-state bytes (describe_engine), and the resident-set sizes: `base_rss`
(after imports and the process group, before any job) and `peak_rss` (ru_maxrss, the process's
lifetime peak). Jobs that measure memory must run one per process.
"""

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def rss_now() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def master_bytes(engine) -> int:
    """The fp32 master copy a ZeRO or mixed-precision wrapper keeps beside the model's weights."""
    opt = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat",
                 "fp32_groups"):
        groups = getattr(opt, name, None)
        if groups:
            flat = [t for g in groups for t in (g if isinstance(g, (list, tuple)) else [g])]
            return sum(t.numel() * t.element_size() for t in flat)
    return 0


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    jobs = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from bench import common
    from dsgpt import dist
    from dsgpt.train.engine import describe_engine

    dist.setup()
    base = rss_now()
    for job in jobs:
        b = common.build("configs/tiny.yaml", job["overrides"])
        gen = torch.Generator().manual_seed(b.ctx.rank)
        for _ in range(job.get("steps", 0)):  # what train_step does, minus its bookkeeping
            for x, y in common.random_micro_batches(b, gen):
                loss, n = b.engine(x, targets=y)  # the loss is computed inside the model
                b.engine.backward(loss / n)
                b.engine.step()
                del loss
        params = [getattr(p, "ds_tensor", p) for p in b.engine.module.parameters()]
        summary = {
            "engine": describe_engine(b.engine),
            "n_params": b.n_params,
            "params_bytes": sum(t.numel() * t.element_size() for t in params),
            "master_bytes": master_bytes(b.engine),
            "base_rss": base,
            "peak_rss": peak_rss(),
        }
        (out / f"{job['name']}.rank{b.ctx.rank}.json").write_text(json.dumps(summary, indent=1))
        del b
    dist.barrier()
    return 0


if __name__ == "__main__":
    from dsgpt.dist import exit_rank
    exit_rank(main())  # not sys.exit: see exit_rank
