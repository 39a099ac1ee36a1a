"""Clean up what killed or finished runs leave on a machine: DeepSpeed's shared-memory buffers
and torch's extension-build locks.

DeepSpeed's CPU all-reduce (its `shm_comm` op) creates one POSIX shared-memory segment per rank,
`/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}` (~66 MB of RAM),
maps every peer's, and never unlinks them. A rank that unlinks its own name once every peer has
mapped it loses nothing (mappings outlive names) and leaks nothing, even when SIGKILLed later:
`release_own_shm`. A rank killed between creating and unlinking still leaks, so each launch
first removes segments no live process uses: `sweep_stale_shm`.

torch's JIT extension build (torch.utils.file_baton.FileBaton) creates `<ext dir>/<op>/lock`
with O_CREAT|O_EXCL, keeps that fd open while it builds, and removes the file when done. A build
killed half-way leaves the lock, and every later build of that op waits on it forever:
`sweep_stale_build_locks` removes locks that no process holds open.

"In use" is read from /proc/*/fd and /proc/*/maps, matched by inode (a name can be unlinked
and made again). psutil's open_files()/memory_maps() give paths without inodes and skip
non-regular files, so they cannot tell a live segment from a stale one of the same name.
Processes in another PID namespace are invisible here: a container sharing this /dev/shm or
extension dir with ours is outside what this module can protect.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"
# A stale candidate is looked at twice, this far apart, before it goes: a builder that just
# closed its lock fd removes the file itself (FileBaton.release closes, then removes), and a
# job that just reopened a dead job's segment name writes to it at once.
GRACE_S = 0.5
# Filesystems another machine may hold files open on: a lock there may belong to a live build
# on another node, which /proc here cannot see.
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
               "afs", "9p", "panfs", "wekafs", "orangefs", "ocfs2", "gfs2"}

def _note(message: str) -> None:
    print(f"[dsgpt] {message}", file=sys.stderr, flush=True)


def _identity(path: Path) -> Optional[tuple]:
    """(device, inode, mtime): a file made again under the same name, or written to, differs."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


# ---- who holds what --------------------------------------------------------------------------

def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _may_hold(pid: int) -> bool:
    """Whether process `pid` could hold files of this uid: its own, or any if we are root."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return os.getuid() == 0 or owner == os.getuid()


def held(paths: Iterable[Path], maps: bool = False) -> set[Path]:
    """The paths that some live process has open (and, with `maps`, mapped).

    Conservative: when a process of this uid cannot be inspected, every path counts as held.
    """
    by_inode = _by_inode(paths)
    if not by_inode:
        return set()
    names = {p.name for p in by_inode.values()}
    found: set[Path] = set()
    for pid in _pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # it ended
        except PermissionError:
            if _may_hold(pid):
                return set(by_inode.values())
            continue
        for fd in fds:
            link = f"/proc/{pid}/fd/{fd}"
            try:
                # The link text first: stat only what could be one of ours (never a socket or a
                # file on a hung network mount).
                if os.path.basename(os.readlink(link).removesuffix(" (deleted)")) not in names:
                    continue
                st = os.stat(link)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in by_inode:
                found.add(by_inode[(st.st_dev, st.st_ino)])
        if maps:
            found |= _mapped(pid, by_inode)
    return found


def _by_inode(paths: Iterable[Path]) -> dict:
    out = {}
    for path in paths:
        ident = _identity(path)
        if ident is not None:
            out[(ident[0], ident[1])] = path
    return out


def _mapped(pid: int, by_inode: dict) -> set[Path]:
    """Which of `by_inode` process `pid` maps (a mapping outlives the fd it was made from)."""
    inodes = {ino for _, ino in by_inode}
    found = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                # address perms offset dev(major:minor, hex) inode path
                fields = line.split(None, 5)
                if len(fields) < 6 or int(fields[4]) not in inodes:
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                key = (os.makedev(major, minor), int(fields[4]))
                if key in by_inode:
                    found.add(by_inode[key])
    except OSError:
        pass
    return found


def _remove_stale(candidates: list[Path], maps: bool, what: str) -> list[Path]:
    """Remove the candidates that nobody holds, looked at twice GRACE_S apart, unchanged between."""
    before = {p: _identity(p) for p in candidates}
    busy = held(candidates, maps)
    suspects = [p for p in candidates if before[p] is not None and p not in busy]
    if not suspects:
        return []
    time.sleep(GRACE_S)
    busy = held(suspects, maps)
    removed = []
    for path in suspects:
        if path in busy or _identity(path) != before[path]:
            continue
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            continue  # another rank's sweep was first
        except OSError as err:
            _note(f"could not remove {what} {path}: {err}")
            continue
        _note(f"removed {what} {path} ({size / 2**20:.0f} MiB)" if size >= 2**20 else f"removed {what} {path}")
        removed.append(path)
    return removed


# ---- DeepSpeed's shared-memory all-reduce buffers -------------------------------------------

def shm_name(rank: int, addr: Optional[str] = None, port: Optional[str] = None) -> str:
    """The name DeepSpeed's shm_comm op gives `rank`'s segment (shm.cpp: shm_initialize, with
    MASTER_ADDR/MASTER_PORT read from the environment by shm_interface.cpp)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def shm_segments() -> list[Path]:
    """This uid's DeepSpeed all-reduce segments in /dev/shm, in use or not."""
    try:
        return sorted(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"))
    except OSError:
        return []


def sweep_stale_shm(world_size: int = 0) -> list[Path]:
    """Remove this uid's segments that no live process maps or has open.

    This job's own names (ranks below `world_size` at this MASTER_ADDR:MASTER_PORT) are left
    alone: a sibling rank may be creating one right now, and DeepSpeed reuses a dead job's
    segment of the same name anyway; `release_own_shm` unlinks those once they are mapped.
    """
    ours = {shm_name(r) for r in range(world_size)}
    candidates = [p for p in shm_segments() if p.name not in ours]
    return _remove_stale(candidates, maps=True, what="a stale DeepSpeed shared-memory buffer") if candidates else []


def release_own_shm(rank: int) -> Optional[Path]:
    """Unlink this rank's segment once every peer has mapped it (call after a barrier that
    follows deepspeed.init_distributed). Only a segment this process maps is touched."""
    path = SHM_DIR / shm_name(rank)
    if path not in _mapped(os.getpid(), _by_inode([path])):
        return None
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


# ---- torch extension-build locks -------------------------------------------------------------

def extensions_root() -> Path:
    """Where torch JIT-builds extensions: TORCH_EXTENSIONS_DIR, else its per-user default."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """`lock` files of op builds: <root>/<op>/lock with TORCH_EXTENSIONS_DIR set, else
    <root>/<py tag>_<accelerator>/<op>/lock."""
    try:
        return sorted(p for p in [*root.glob("*/lock"), *root.glob("*/*/lock")] if p.is_file())
    except OSError:
        return []


def _fstype(path: Path, mountinfo: Optional[str] = None) -> str:
    """The filesystem type of the mount that holds `path` (from /proc/self/mountinfo)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, fstype = "", ""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, right.split()[0]
    return fstype


def on_network_fs(path: Path, mountinfo: Optional[str] = None) -> bool:
    fstype = _fstype(path, mountinfo)
    return fstype in _NETWORK_FS or fstype.startswith("fuse")


def sweep_stale_build_locks(root: Optional[Path] = None, per_node: bool = False) -> list[Path]:
    """Remove extension-build locks that no process holds open (a build killed half-way).

    Only a process on this machine can hold a lock we may judge: so the extension dir must be
    this node's own. dsgpt gives each node its own dir under slurm and mpirun (dist._export sets
    TORCH_EXTENSIONS_DIR per host, `per_node`); any other dir is swept only when it is on a
    local filesystem, since on a shared one a lock may belong to a live build on another node.
    Every rank may call this: sweepers take turns (flock on the dir), and a lock goes only if it
    is the same file, unheld, on both looks, so a fresh lock that replaced a stale one is kept.
    """
    root = Path(root) if root is not None else extensions_root()
    locks = build_locks(root)
    if not locks or (not per_node and on_network_fs(root)):
        return []
    with _taking_turns(root):
        return _remove_stale(build_locks(root), maps=False, what="a stale extension-build lock (a build was killed)")


@contextlib.contextmanager
def _taking_turns(directory: Path):
    """An exclusive flock on a directory, so concurrent sweepers of it take turns. Best effort:
    where the filesystem refuses flock, sweepers rely on the identity checks alone."""
    fd = None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
