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
    engine, _ = build_engine(model, cfg, ds_config, ctx.on_gpu)
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
