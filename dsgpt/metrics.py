"""Where numbers go: TensorBoard, `metrics.jsonl` and the console, all from rank 0.

Throughput figures use a stated formula. Model FLOPs per token = 6N + 12*L*H*Q*T (PaLM, appendix B:
N non-embedding parameters, L layers, H heads, Q head dim, T sequence length; forward + backward,
no recomputation counted). MFU = achieved model FLOP/s per rank / peak FLOP/s of one device. The
GPU peak comes from a table keyed by device name and precision; a CPU's peak is measured here
with a large matmul in the rank's own thread setting, since no table can know a CPU.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Optional

# Dense peak FLOP/s per device and math mode (vendor figures, no sparsity): bf16/fp16 tensor cores,
# TF32 tensor cores (fp32 matmuls with `tf32: true`) and plain fp32 (what fp32 matmuls run on when
# TF32 is off, torch's default). The SXM and PCIe/NVL forms of a part differ: the name tells them
# apart ("NVIDIA H100 80GB HBM3" is the SXM form, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not).
GPU_PEAK_FLOPS = {
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "tf32": 0.0, "fp32": 31e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "tf32": 0.0, "fp32": 15.7e12},
    "T4": {"bf16": 0.0, "fp16": 65e12, "tf32": 0.0, "fp32": 8.1e12},
}


def gpu_peak_flops(device_name: str, precision: str) -> Optional[float]:
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):  # "L40S" before "L4"
        # Not followed by a digit: "NVIDIA L40" is not an L4 (but "V100S" is a V100).
        if re.search(re.escape(key) + r"(?!\d)", device_name):
            return GPU_PEAK_FLOPS[key].get(precision) or None
    return None


def measure_cpu_peak_flops(precision: str = "fp32", seconds: float = 0.3) -> float:
    """Best observed matmul FLOP/s on this process's threads: the CPU's practical peak.

    The size grows from 256 to 1024 while one matmul stays quick. CPUs with bf16 matrix units
    (AMX) reach their bf16 rate only on large matrices (at 128 such a CPU read about 7x low, which
    overstated bf16 MFU as much), while CPUs that emulate bf16 would spend seconds on the largest."""
    import torch
    dtype = torch.bfloat16 if math_mode(precision, False) == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)  # leave the global RNG alone: exact resume depends on it
    sizes = (256, 512, 1024)
    share = seconds / len(sizes)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        t0 = time.perf_counter()
        a @ b  # warm up; also says how long this size takes
        first = time.perf_counter() - t0
        deadline = time.perf_counter() + share
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / max(time.perf_counter() - t0, 1e-9))
        if first > share / 4:  # the next size is 8x the work: it would not fit its share of the time
            break
    return best


def math_mode(precision: str, tf32: bool) -> str:
    """The peak-table column a run's matmuls use: fp32 runs on TF32 tensor cores when allowed;
    bf16-mixed runs its matmuls in bf16 (autocast)."""
    if precision == "bf16-mixed":
        return "bf16"
    return "tf32" if precision == "fp32" and tf32 else precision


def peak_flops(device_type: str, precision: str, tf32: bool = False) -> Optional[float]:
    if device_type == "cuda":
        import torch
        return gpu_peak_flops(torch.cuda.get_device_name(), math_mode(precision, tf32))
    return measure_cpu_peak_flops(precision)  # CPUs have no TF32: tf32 changes nothing there


class Throughput:
    """Tokens per second and seconds per step averaged over a logging window, not one step's noise.

    The window's time is each step's host time plus the waits for the device when the steps are read
    back (`wait`), so on a GPU it is the device's time too; evaluation and checkpoints between steps
    are left out (the steps are read back before them)."""

    def __init__(self):
        self._tokens = 0
        self._seconds = 0.0
        self._steps = 0

    def add(self, tokens: int, seconds: float) -> None:
        self._tokens += tokens
        self._seconds += seconds
        self._steps += 1

    def wait(self, seconds: float) -> None:
        self._seconds += seconds

    def window(self) -> tuple[float, float]:
        """(tokens/s, seconds per step) since the last call; starts a new window."""
        out = (self._tokens / max(self._seconds, 1e-9), self._seconds / max(self._steps, 1))
        self._tokens, self._seconds, self._steps = 0, 0.0, 0
        return out


def memory_stats(device_type: str) -> dict:
    if device_type == "cuda":
        import torch
        return {"mem/gpu_max_alloc_gb": torch.cuda.max_memory_allocated() / 2**30,
                "mem/gpu_reserved_gb": torch.cuda.memory_reserved() / 2**30}
    import psutil
    return {"mem/rss_gb": psutil.Process().memory_info().rss / 2**30}


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of a metrics.jsonl logged at or before `step` (and no half-written line)."""
    if not path.is_file():
        return
    from dsgpt.io import atomic_write_text
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            row_step = None
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing, so callers need no `if`."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, resume_step: int = 0):
        """`resume_step`: the step the run continues from. Whatever an earlier launch logged after
        it (it died before its next checkpoint) is dropped, so each step appears once."""
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file and the same TensorBoard curves.
        drop_rows_after(run_dir / "metrics.jsonl", resume_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # TensorBoard hides every earlier event at or after purge_step when it reads the logs.
            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        if self.writer:
            for key, value in clean.items():
                self.writer.add_scalar(key, value, step)
        record = {"step": step, "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
        self.jsonl.write(json.dumps(record) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.writer:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict, final: dict, step: int) -> None:
        """The run's hyperparameters and final metrics for TensorBoard's HParams dashboard, at the
        run's last step: at step 0 the metrics would show as one-point charts above the curves."""
        if self.enabled and self.writer:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.writer.add_hparams(flat, final, run_name=".", global_step=step)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
