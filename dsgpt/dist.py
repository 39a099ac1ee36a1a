"""The one place that knows about launchers, devices and process groups.

A rank finds out who it is from its environment: the `deepspeed` launcher and torchrun set
RANK/LOCAL_RANK/WORLD_SIZE; `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODEID;
`mpirun` sets its own (read through mpi4py); a plain `python` run is a world of one. It then picks NCCL on a GPU
and gloo on a CPU, and caps its torch threads so that several ranks on one box do not thrash.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

from dsgpt import hygiene

# A gloo group over the same ranks for values that live on the host (signals, clocks): agreeing on
# them over NCCL would copy them to the GPU and read them back, a device synchronisation each time.
_host_group = None


@dataclass
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    backend: str
    device_type: str  # "cuda" or "cpu"
    launcher: str  # "env" (deepspeed/torchrun), "slurm" (srun), "mpi" (mpirun) or "single"
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


def free_port() -> int:
    """A TCP port on this host that nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Launch:
    rank: int
    local_rank: int
    world: int
    local_world: int
    node_rank: int
    launcher: str


def _int_env(*names: str, default: Optional[int] = None) -> Optional[int]:
    for name in names:
        if os.environ.get(name, "").strip().lstrip("-").isdigit():
            return int(os.environ[name])
    return default


def _slurm_tasks_per_node() -> int:
    """SLURM_NTASKS_PER_NODE, or the first count of SLURM_STEP_TASKS_PER_NODE ("2(x3),1")."""
    explicit = _int_env("SLURM_NTASKS_PER_NODE")
    if explicit:
        return explicit
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or "1"
    return int(spec.split("(")[0].split(",")[0] or 1)


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def _from_slurm() -> _Launch:
    """One task per GPU (or CPU slot) started by `srun`: ranks come from SLURM_*."""
    env = os.environ
    launch = _Launch(rank=int(env["SLURM_PROCID"]), local_rank=_int_env("SLURM_LOCALID", default=0),
                     world=int(env["SLURM_NTASKS"]), local_world=_slurm_tasks_per_node(),
                     node_rank=_int_env("SLURM_NODEID", default=0), launcher="slurm")
    env.setdefault("MASTER_ADDR", _first_slurm_host())
    # The same port on every task without talking: derived from the job id.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return launch


def _from_mpi() -> _Launch:
    """`mpirun -np N python ...`: ranks from the MPI runtime, the rendezvous from rank 0 via mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        from dsgpt.errors import UserError
        raise UserError("This process was started by mpirun, but mpi4py is not installed, so the ranks "
                        "cannot agree on a rendezvous address. Install it with `pip install -e .[mpi]` "
                        "(it needs an MPI library such as Debian's openmpi-bin).") from None
    except RuntimeError as err:  # mpi4py's wheels load the system's libmpi at import and say this if none loads
        from dsgpt.errors import UserError
        raise UserError(f"This process was started by mpirun, but mpi4py cannot load an MPI library ("
                        f"{'; '.join(str(err).splitlines())}). "
                        "Install one (Debian: apt-get install openmpi-bin libopenmpi-dev) or point "
                        "MPI4PY_LIBMPI at the libmpi.so of the MPI whose mpirun you use.") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    nodes = comm.allgather(socket.gethostname() if local.Get_rank() == 0 else None)
    node_rank = [h for h in nodes if h is not None].index(local.bcast(socket.gethostname(), root=0))
    addr, port = comm.bcast((socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None, root=0)
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(port))
    return _Launch(rank=comm.Get_rank(), local_rank=local.Get_rank(), world=comm.Get_size(),
                   local_world=local.Get_size(), node_rank=node_rank, launcher="mpi")


def _launcher() -> str:
    """Which launcher started this process, from its environment alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # the deepspeed launcher, torchrun
        return "env"
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env:
        return "mpi"
    return "single"


def _discover() -> _Launch:
    env = os.environ
    launcher = _launcher()
    if launcher == "env":
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        return _Launch(rank=rank, local_rank=_int_env("LOCAL_RANK", default=rank), world=world,
                       local_world=_int_env("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world),
                       node_rank=_int_env("GROUP_RANK", "NODE_RANK", default=0), launcher="env")
    if launcher == "slurm":
        return _from_slurm()
    if launcher == "mpi":
        return _from_mpi()
    # A plain `python launch/train.py`: a world of one, on a free local port.
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return _Launch(rank=0, local_rank=0, world=1, local_world=1, node_rank=0, launcher="single")


def launched_world_size() -> int:
    """How many ranks the launcher started (1 for a plain `python`), before any process group."""
    launcher = _launcher()
    if launcher == "env":
        return max(1, _int_env("WORLD_SIZE", default=1))
    if launcher == "slurm":
        return max(1, _int_env("SLURM_NTASKS", default=1))
    if launcher == "mpi":
        return _int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE") or _from_mpi().world
    return 1


def _export(launch: _Launch) -> None:
    """What torch.distributed's env:// rendezvous reads, whatever the launcher."""
    for key, value in (("RANK", launch.rank), ("LOCAL_RANK", launch.local_rank), ("WORLD_SIZE", launch.world),
                       ("LOCAL_WORLD_SIZE", launch.local_world)):
        os.environ[key] = str(value)
    if launch.launcher in ("slurm", "mpi"):
        # Nodes often share a home directory: one JIT-extension build dir per node, or their
        # compilers overwrite each other's objects.
        base = os.environ.get("DSGPT_TORCH_EXTENSIONS_BASE") or os.environ.get(
            "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
        os.environ["DSGPT_TORCH_EXTENSIONS_BASE"] = base
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(base, f"{socket.gethostname()}-node{launch.node_rank}")


def gpu_available() -> bool:
    if os.environ.get("DS_ACCELERATOR", "") == "cpu":
        return False
    import torch
    return torch.cuda.is_available()


def _sweep_leftovers(launch: _Launch, on_gpu: bool) -> None:
    """Before DeepSpeed builds ops (its shm op at init, CPU Adam later) and makes shared memory:
    remove build locks and all-reduce buffers that killed runs left behind."""
    # Under slurm/mpirun the extension dir is this node's own (_export); see the sweep's notes.
    hygiene.sweep_stale_build_locks(per_node=launch.launcher in ("slurm", "mpi"))
    if not on_gpu:  # DeepSpeed's shm all-reduce exists on its CPU accelerator only
        hygiene.sweep_stale_shm(world_size=launch.world)


def setup(timeout_minutes: float = 10.0) -> DistContext:
    """Bring this rank into the process group. Must run before DeepSpeed picks its accelerator."""
    launch = _discover()
    _export(launch)
    on_gpu = gpu_available()
    if not on_gpu:
        # DeepSpeed picks its accelerator at import; say it explicitly instead of letting it
        # guess (and warn) on every rank.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    if on_gpu:
        torch.cuda.set_device(launch.local_rank)
    else:
        # The cores Slurm gave this task, else an equal share of the machine's.
        threads = _int_env("SLURM_CPUS_PER_TASK") if launch.launcher == "slurm" else None
        threads = threads or max(1, (os.cpu_count() or 1) // max(1, launch.local_world))
        if hasattr(os, "sched_getaffinity"):  # no more threads than the cores it may run on
            threads = min(threads, len(os.sched_getaffinity(0)))
        torch.set_num_threads(threads)
    _sweep_leftovers(launch, on_gpu)
    import deepspeed
    # DeepSpeed's ZeRO calls torch collectives that newer torch marks deprecated, once per step:
    # nothing a user can act on, and it buries the training log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    backend = "nccl" if on_gpu else "gloo"
    global _host_group
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        if not on_gpu:
            # Every peer has mapped every rank's all-reduce buffer once all passed init: each
            # rank's name can go now, so no exit (SIGKILL included) leaves it in /dev/shm.
            if launch.world > 1:
                torch.distributed.barrier()
            hygiene.release_own_shm(launch.rank)
    if launch.world > 1 and _host_group is None:  # every rank, here: creating a group is collective
        _host_group = torch.distributed.new_group(backend="gloo", timeout=timeout)
    return DistContext(rank=launch.rank, local_rank=launch.local_rank, world_size=launch.world,
                       local_world_size=launch.local_world, node_rank=launch.node_rank, backend=backend,
                       device_type="cuda" if on_gpu else "cpu", launcher=launch.launcher,
                       hostname=socket.gethostname())


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    import torch.distributed as td
    return td.get_rank() if td.is_initialized() else 0


def teardown() -> None:
    """End this rank's part in the process group once every rank is done: left to interpreter
    exit, gloo's threads can abort the process after its work is finished."""
    import torch.distributed as td
    global _host_group
    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()  # the host group with it
    _host_group = None


def exit_rank(code: int) -> None:
    """End a launched rank with `code` once its work is done and its files are closed.

    With gloo and DeepSpeed's CPU ops loaded, the C++ clean-up after interpreter exit now and then
    aborts a rank that has finished ("terminate called without an active exception", exit -6),
    turning a good run into a failed one; a plain single process that joined a one-rank group
    aborts the same way. A rank started by a launcher (WORLD_SIZE, Slurm or MPI > 1), or any
    process whose group is still up, therefore runs Python's exit handlers, flushes its output and
    leaves with os._exit; a plain process without a group exits normally."""
    import torch.distributed as td
    if launched_world_size() <= 1 and not td.is_initialized():
        sys.exit(code)
    import atexit
    import logging
    atexit._run_exitfuncs()
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")  # mpirun counts a rank that never finalized MPI as failed
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def barrier() -> None:
    import torch.distributed as td
    if td.is_initialized():
        td.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over all ranks in one collective (none on one rank)."""
    return _all_reduce_floats(values, device, "sum")


def world_size() -> int:
    import torch.distributed as td
    return td.get_world_size() if td.is_initialized() else 1


def all_reduce_tensor(t):
    """Sum of `t` over all ranks (in place; `t` itself without a process group)."""
    import torch.distributed as td
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t)
    return t


def all_reduce_max(values: list[float], device) -> list[float]:
    """The largest of each float over all ranks in one collective (none on one rank)."""
    return _all_reduce_floats(values, device, "max")


def host_max(values: list[float]) -> list[float]:
    """The largest of each host-side float (a signal number, a clock flag) over all ranks, agreed
    over the host group: no device is involved, so the trainer can ask every step."""
    import torch
    return _all_reduce_floats(values, torch.device("cpu"), "max", group=host_group())


def host_group():
    """The gloo group for host-side values (None without a process group of several ranks)."""
    import torch.distributed as td
    if _host_group is None and td.is_initialized() and td.get_world_size() > 1:
        raise RuntimeError("dsgpt.dist.setup() has not run on this process group: it makes the gloo group "
                           "that host-side values (signals, clocks) are agreed over; call it on every rank first")
    return _host_group


def _all_reduce_floats(values: list[float], device, op: str, group=None) -> list[float]:
    # On one rank nothing goes to the device: on a GPU, the copy there and the read back would be
    # two host synchronisations each time.
    import torch
    import torch.distributed as td
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t, op=td.ReduceOp.SUM if op == "sum" else td.ReduceOp.MAX, group=group)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    import torch.distributed as td
    if not (td.is_initialized() and td.get_world_size() > 1):
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    import torch.distributed as td
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out
