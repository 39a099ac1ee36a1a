"""The one place that knows about launchers, devices and process groups.

A rank finds out who it is from its environment: the `deepspeed` launcher and torchrun set
RANK/LOCAL_RANK/WORLD_SIZE; a plain `python` run is a world of one. It then picks NCCL on a GPU
and gloo on a CPU, and caps its torch threads so that several ranks on one box do not thrash.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass


@dataclass
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: str
    device_type: str  # "cuda" or "cpu"
    launcher: str  # "env" (deepspeed/torchrun) or "single"
    hostname: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device_type == "cuda"

    @property
    def device(self):
        import torch
        return torch.device(f"cuda:{self.local_rank}") if self.on_gpu else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_launcher_env() -> tuple[int, int, int, int, str]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        return rank, local_rank, world, local_world, "env"
    # A plain `python launch/train.py`: a world of one, on a free local port.
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        env[key] = value
    return 0, 0, 1, 1, "single"


def gpu_available() -> bool:
    if os.environ.get("DS_ACCELERATOR", "") == "cpu":
        return False
    import torch
    return torch.cuda.is_available()


def setup(timeout_minutes: float = 10.0) -> DistContext:
    """Bring this rank into the process group. Must run before DeepSpeed picks its accelerator."""
    rank, local_rank, world, local_world, launcher = _read_launcher_env()
    on_gpu = gpu_available()
    if not on_gpu:
        # DeepSpeed picks its accelerator at import; say it explicitly instead of letting it
        # guess (and warn) on every rank.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    if on_gpu:
        torch.cuda.set_device(local_rank)
    else:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    import deepspeed
    backend = "nccl" if on_gpu else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                       backend=backend, device_type="cuda" if on_gpu else "cpu", launcher=launcher,
                       hostname=socket.gethostname())


def barrier() -> None:
    import torch.distributed as td
    if td.is_initialized():
        td.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over all ranks in one collective."""
    import torch
    import torch.distributed as td
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as td
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t, op=td.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    import torch.distributed as td
    if not (td.is_initialized() and td.get_world_size() > 1):
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]
