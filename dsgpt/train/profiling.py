"""`train.profile: true`: a torch.profiler trace of a few training steps, in the Chrome/Perfetto
trace format (open it at ui.perfetto.dev or chrome://tracing), one file per rank in RUN/profile/,
and beside it a table of the ops that took the most time (self time on the GPU when there is one,
else on the CPU): where the step's time goes, readable without a trace viewer.

The steps traced come after the first (`wait`: compilation, allocator warm-up) and one warm-up step
the profiler itself needs; a run that ends sooner still writes what it recorded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


class StepProfiler:
    def __init__(self, out_dir: Path, rank: int, on_gpu: bool, wait: int = 1, warmup: int = 1, active: int = 3):
        import torch.profiler as tp
        self.path = Path(out_dir) / f"rank{rank:05d}.trace.json"
        self.summary_path = Path(out_dir) / f"rank{rank:05d}.top_ops.txt"
        self.sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if on_gpu else [])
        self._prof = tp.profile(activities=activities, record_shapes=True, profile_memory=True,
                                schedule=tp.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                                on_trace_ready=self._write)
        self._prof.start()
        self._open = True

    @classmethod
    def from_config(cls, cfg, ctx) -> Optional["StepProfiler"]:
        return cls(cfg.run.dir / "profile", ctx.rank, ctx.on_gpu) if cfg.train.profile else None

    def _write(self, prof) -> None:
        tmp = self.path.with_suffix(".tmp")  # a reader never sees half a trace
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, self.path)
        from dsgpt.io import atomic_write_text
        table = prof.key_averages().table(sort_by=self.sort_by, row_limit=30)
        atomic_write_text(self.summary_path, f"ops of the profiled steps by {self.sort_by}\n{table}\n")

    def step(self) -> None:
        if self._open:
            self._prof.step()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._prof.stop()
