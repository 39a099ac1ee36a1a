"""What the benchmarks share: the engine a config would train with (on random tokens), peak
memory, and appending a row to its own table in bench/RESULTS.md with the machine, versions and date."""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = Path(__file__).resolve().parents[1]
PREAMBLE = ("# Benchmark results\n\nAppended by `bench/*.py`, one table per benchmark; MFU uses "
            "6N + 12*L*H*Q*T FLOPs per token (see dsgpt/metrics.py).\n")


@dataclass
class Bench:
    cfg: object
    ctx: object
    mcfg: object
    engine: object
    n_params: int


def build(config: str, overrides: list[str]) -> Bench:
    """The same engine launch/train.py builds, with the vocabulary the config would train with
    (the built-in corpus's, or GPT-2's size), without reading any data."""
    import torch

    from dsgpt import dist
    from dsgpt.config import load_config
    from dsgpt.ds_config import resolve_ds_config
    from dsgpt.train.engine import build_engine
    from dsgpt.zero import build_model
    from dsgpt.train.run_setup import apply_tf32, check_precision, model_config

    cfg = load_config(config, overrides)
    check_precision(cfg)
    ctx = dist.setup()
    apply_tf32(cfg, ctx)
    vocab = cfg.data.builtin_vocab_size if cfg.data.path == "builtin" else 50257
    mcfg = model_config(cfg, vocab_size=vocab)
    torch.manual_seed(cfg.run.seed + ctx.rank)
    ds_config = resolve_ds_config(cfg, ctx.world_size, ctx.on_gpu)
    model = build_model(mcfg, ds_config)
    n_params = model.num_params(non_embedding=False)
    engine, _ = build_engine(model, cfg, ds_config)
    return Bench(cfg, ctx, mcfg, engine, n_params)


def random_micro_batches(bench: Bench, generator) -> list:
    import torch
    t, m = bench.cfg.train, bench.mcfg
    x = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.block_size + 1), generator=generator)
    return [(x[:, :-1], x[:, 1:])] * t.grad_accum_steps


def peak_memory_gb(on_gpu: bool) -> float:
    """This process's peak: CUDA's max allocated on GPU, the peak resident set (ru_maxrss) on CPU."""
    if on_gpu:
        import torch
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def peak_allocated_bytes(run, on_gpu: bool) -> int:
    """The most memory allocated while `run()` runs, above what was allocated when it started: CUDA's
    allocator statistics on GPU, the profiler's allocation events on CPU (which also count frees of
    blocks allocated before: free what `run` would free, e.g. old gradients, before calling this)."""
    import json
    import tempfile

    import torch
    if on_gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    before = events[0]["Total Allocated"] - events[0]["Bytes"]  # in use before the first event
    return max(e["Total Allocated"] for e in events) - before


def memory_in_use_gb(on_gpu: bool) -> float:
    """This process's memory now: CUDA's allocated on GPU, the resident set on CPU."""
    if on_gpu:
        import torch
        return torch.cuda.memory_allocated() / 2**30
    import ctypes

    import psutil
    try:  # glibc keeps freed heap mapped: hand it back first, or the RSS counts memory now free
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss / 2**30


def device_name(bench: Bench) -> str:
    import torch
    return torch.cuda.get_device_name() if bench.ctx.on_gpu else f"CPU x{torch.get_num_threads()} threads"


def model_name(bench: Bench) -> str:
    m = bench.mcfg
    return f"{m.n_layer}L/{m.n_embd}d/{m.n_head}h, vocab {m.vocab_size} ({bench.n_params / 1e6:.1f}M)"


def context_cells() -> list[str]:
    """date, machine, versions: the cells every table starts with."""
    versions = ", ".join(f"{n} {metadata.version(n)}" for n in ("torch", "deepspeed"))
    return [time.strftime("%Y-%m-%d"), f"{platform.node()} ({os.cpu_count()} cores)", versions]


def append_row(section: str, columns: list[str], cells: list[str], path: Path = RESULTS) -> None:
    """Add a row to the table under `## section`, creating the file, section or table as needed.
    Rows go after the section's last table line, so each benchmark keeps its own table."""
    lines = path.read_text().splitlines() if path.exists() else PREAMBLE.splitlines()
    row = "| " + " | ".join(cells) + " |"
    heading = f"## {section}"
    if heading not in lines:
        while lines and not lines[-1].strip():  # one blank line before the new section
            lines.pop()
        lines += ["", heading, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        at = len(lines)
    else:
        at = lines.index(heading) + 1
        while at < len(lines) and not lines[at].startswith("## "):
            at += 1
        while lines[at - 1].strip() == "":  # back over the blank lines before the next section
            at -= 1
    lines.insert(at, row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def launcher(ranks: int) -> list[str]:
    """The command prefix that starts `ranks` ranks of a script: python, or the deepspeed launcher."""
    import sys

    from dsgpt.dist import free_port
    if ranks == 1:
        return [sys.executable]
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    import torch
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_trainer(config: str, overrides: list[str], ranks: int, steps: int, warmup: int,
                timeout: float = 1800, log_interval: int = 1) -> dict:
    """Train `warmup + steps` steps through launch/train.py, the real path (data loader, step,
    collectives, logging every `log_interval` steps, when the trainer reads the steps back; no
    evaluation or saving until after the last step), and return the timed steps' figures from its
    metrics.jsonl: step_s and mfu (medians over the logged windows), tokens_s, mem_gb (the largest
    logged: RSS on CPU, max_memory_allocated on GPU, rank 0's). Warmup and steps are rounded up to
    whole windows, so that no timed window holds a warmup step."""
    import json
    import statistics
    import subprocess
    import tempfile
    warmup, steps = (-(-n // log_interval) * log_interval for n in (warmup, steps))
    with tempfile.TemporaryDirectory() as out:
        cmd = [*launcher(ranks), str(REPO / "launch" / "train.py"), "--config", config, *overrides,
               f"run.out_dir={out}", "run.name=bench", f"train.max_steps={steps + warmup}",
               f"train.log_interval={log_interval}",
               "train.eval_interval=1000000000", "train.save_interval=1000000000", "train.eval_batches=1",
               "train.save_best=false", "train.sample_interval=0"]
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(x) for x in (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "train/step_time" in r and r["step"] > warmup]
    seen = [r["train/tokens_seen"] for r in rows if "train/tokens_seen" in r]
    tokens_per_step = (seen[1] - seen[0]) // log_interval
    step_s = statistics.median(r["train/step_time"] for r in timed)
    mfus = [r["train/mfu"] for r in timed if r.get("train/mfu") is not None]
    mem = max((r.get("mem/gpu_max_alloc_gb") or r.get("mem/rss_gb") or 0.0) for r in timed)
    return {"step_s": step_s, "tokens_s": tokens_per_step / step_s, "mfu": statistics.median(mfus) if mfus else None,
            "mem_gb": mem, "tokens_per_step": tokens_per_step, "steps": len(timed)}
