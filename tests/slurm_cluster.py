"""A real 2-node Slurm cluster on this one machine, for tests of `sbatch slurm/train.sbatch ...`.

What it brings up (all of it private to one state dir, torn down by `stop()`):

- munged with the system socket (started only if none answers; a key is generated in /etc/munge
  only when none exists),
- slurmctld, and two slurmd (`slurmd -N node1`, `slurmd -N node2`) on this host, each on its own
  port, all reading a slurm.conf this module writes into the state dir (`SLURM_CONF` / `-f`),
- `127.0.0.1 node1 node2` in /etc/hosts (added once, idempotently), so that node names work as
  MASTER_ADDR.

Typical use in a test module (a pytest fixture of your own; `conftest.py` is not this module's)::

    import os, pytest
    from tests.slurm_cluster import LocalSlurm, ensure_packages

    @pytest.fixture(scope="module")            # or "session", in a conftest that owns it
    def slurm(tmp_path_factory):
        reason = ensure_packages()             # raises instead when CI=true on root Debian
        if reason:
            pytest.skip(reason)
        with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster                      # stop() runs even when a test failed

    def test_two_nodes(slurm, tmp_path):
        job = slurm.sbatch(["-N", "2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out"],
                           "#!/bin/bash\\nsrun hostname\\n")
        assert slurm.wait(job, timeout=60) == "COMPLETED"

Subprocesses that call Slurm clients themselves (sbatch/squeue/scancel from product code) must get
`cluster.env` (it carries SLURM_CONF and drops any SLURM_* job variables of an outer Slurm job).

A requeued job waits ~2 minutes (Reason=BeginTime) before it may run again; tests call
`cluster.release(job)` (waits until it is pending, then `scontrol update JobId=J StartTime=now`).

Set DSGPT_KEEP_SLURM=1 to keep the state dir (conf, logs) after stop() for debugging.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

NODES = ("node1", "node2")
CLUSTER_NAME = "dsgpttest"
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel",
            "munge", "munged")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Job states after which a job will not run again by itself (COMPLETING, REQUEUED, PENDING are not).
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                      "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT"})
MUNGE_KEY = Path("/etc/munge/munge.key")
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class SlurmError(RuntimeError):
    """The local cluster could not be started, or a Slurm command failed."""


def which(name: str) -> Optional[str]:
    """shutil.which, also looking in sbin dirs (a user's PATH often lacks /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def _missing() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def _is_debian() -> bool:
    return Path("/etc/debian_version").exists() and which("apt-get") is not None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def ensure_packages(timeout: float = 900) -> Optional[str]:
    """Install Slurm + munge with apt when missing. None when usable, else why not (for pytest.skip).

    When CI=true and we are root on Debian (so installing is possible and CI must run the Slurm
    tests), a failure raises SlurmError instead of returning a reason.
    """
    missing = _missing()
    if not missing:
        return None
    if not sys.platform.startswith("linux"):
        return f"Slurm tests need Linux (missing: {', '.join(missing)})"
    if not _is_root():
        return f"Slurm binaries missing ({', '.join(missing)}) and not root, so cannot apt-get install them"
    if not _is_debian():
        return f"Slurm binaries missing ({', '.join(missing)}) and no apt-get (not Debian/Ubuntu)"
    strict = os.environ.get("CI", "").lower() == "true"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    reason = None
    try:
        start = time.monotonic()
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
            left = timeout - (time.monotonic() - start)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(left, 1))
            if proc.returncode != 0:
                reason = (f"`{' '.join(cmd)}` exited {proc.returncode}:\n"
                          f"{(proc.stdout + proc.stderr)[-3000:]}")
                break
    except subprocess.TimeoutExpired:
        reason = f"apt-get did not finish installing {' '.join(APT_PACKAGES)} within {timeout:.0f}s"
    except OSError as e:
        reason = f"apt-get could not run: {e}"
    if reason is None and _missing():
        reason = f"apt-get installed {' '.join(APT_PACKAGES)} but still missing: {', '.join(_missing())}"
    if reason and strict:
        raise SlurmError(f"CI=true, root on Debian, but Slurm could not be installed: {reason}")
    return reason


def ensure_hosts(names: Iterable[str] = NODES, hosts_file: Path = Path("/etc/hosts")) -> None:
    """Make each node name resolve to 127.0.0.1 via /etc/hosts (adds one line, only if missing)."""
    names = list(names)
    text = hosts_file.read_text() if hosts_file.exists() else ""
    known = set()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            known.update(fields[1:])
    todo = [n for n in names if n not in known]
    if todo:
        sep = "" if (not text or text.endswith("\n")) else "\n"
        with open(hosts_file, "a") as f:
            f.write(f"{sep}127.0.0.1 {' '.join(todo)}\n")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _pick_ports(base: int, count: int, tries: int = 40) -> int:
    """First base' >= base (in steps of 10) with ports base'..base'+count-1 all free."""
    for i in range(tries):
        b = base + 10 * i
        if all(_port_free(b + k) for k in range(count)):
            return b
    raise SlurmError(f"no {count} free consecutive TCP ports found from {base}")


def _pdeathsig() -> None:
    """In the child: die with the test process (so a killed pytest leaves no daemons behind)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _marked_processes() -> list[tuple[int, str, bytes]]:
    """(pid, cluster dir, cmdline) of processes carrying a DSGPT_LOCAL_SLURM=dir marker."""
    out = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            env = (pid_dir / "environ").read_bytes().split(b"\0")
            cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"DSGPT_LOCAL_SLURM="):
                out.append((int(pid_dir.name), item.split(b"=", 1)[1].decode(errors="replace"), cmd))
                break
    return out


def _kill(pids: Iterable[int]) -> None:
    pids = list(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if pids:
        time.sleep(0.3)


def _node_hardware() -> str:
    """`slurmd -C`'s view of this machine: 'CPUs=2 Boards=1 SocketsPerBoard=1 ...' (no memory)."""
    try:
        out = subprocess.run([which("slurmd") or "slurmd", "-C"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        if line.startswith("NodeName="):
            keep = [f for f in line.split() if f.split("=")[0] in
                    ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")]
            if keep:
                return " ".join(keep)
    return f"CPUs={os.cpu_count() or 1}"


class LocalSlurm:
    """A 2-node Slurm cluster (node1, node2) on this host, private to `state_dir`.

    Use as a context manager, or call start() / stop(). stop() is idempotent and also registered
    with atexit, so daemons go away even when a test errors out.
    """

    def __init__(self, state_dir: Union[str, Path, None] = None, *, base_port: int = 17000,
                 start_timeout: float = 60.0, debug: str = "info"):
        self._own_dir = state_dir is None
        self.dir = Path(state_dir or tempfile.mkdtemp(prefix="dsgpt-slurm-")).resolve()
        self.base_port = base_port
        self.start_timeout = start_timeout
        self.debug = debug
        self.conf = self.dir / "slurm.conf"
        self.nodes = NODES
        self.hostname = socket.gethostname().split(".")[0]
        self._procs: dict[str, subprocess.Popen] = {}
        self._munged: Optional[subprocess.Popen] = None
        self._started = False
        self._stopped = False
        self.ctld_port: Optional[int] = None
        self.node_ports: Optional[tuple[int, int]] = None
        self.env = self._client_env()

    # ---- environment and config -------------------------------------------------------------
    def _client_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_",
                                                                        "SALLOC_", "SQUEUE_"))}
        # A launcher's variables in the test process (RANK, MASTER_PORT, ...) must not reach the
        # jobs: there each task learns its place from srun.
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        env["SLURM_CONF"] = str(self.conf)
        env["DSGPT_LOCAL_SLURM"] = str(self.dir)  # marks every process of this cluster (see _sweep)
        env["PATH"] = os.pathsep.join([env.get("PATH", "/usr/bin:/bin"), *_SBIN_DIRS])
        return env

    def _write_conf(self) -> None:
        base = _pick_ports(self.base_port, 1 + len(self.nodes))
        self.ctld_port, self.node_ports = base, (base + 1, base + len(self.nodes))
        d = self.dir
        for sub in ("state", "log", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (d / "spool" / n).mkdir(exist_ok=True)
        hw = _node_hardware()
        # CPUs: each slurmd reports this machine's real CPU layout (2 cores here), so each node is
        # declared with exactly that (no "low CPU count" drain), i.e. the 2 real cores are offered
        # twice, 4 slots in all. With CR_CPU a 1-task job takes 1 CPU, so `sbatch -N 2
        # --ntasks-per-node=1` runs at once, a 2-task array runs both tasks together, and a later
        # test may still ask for --ntasks-per-node=2. Oversubscribing is fine for tests (tiny work,
        # one thread per rank); CPUs=1 per node would forbid 2 tasks per node.
        # Memory is not a consumable resource (CR_CPU), so no RealMemory bookkeeping.
        text = f"""\
# Written by tests/slurm_cluster.py for a throwaway 2-node test cluster on one host.
ClusterName={CLUSTER_NAME}
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
SlurmctldDebug={self.debug}
SlurmdDebug={self.debug}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
PropagateResourceLimits=NONE
MailProg=/bin/true
# fast and predictable for tests
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=100000,batch_sched_delay=1
MinJobAge=600
KillWait=3
MessageTimeout=20
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
UnkillableStepTimeout=30
TCPTimeout=5
JobRequeue=1
SlurmdParameters=config_overrides
# one slurmd per node name on this host, each on its own port (Port=[a-b]: one per node, in order)
NodeName=node[1-{len(self.nodes)}] NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port=[{self.node_ports[0]}-{self.node_ports[1]}] {hw} State=UNKNOWN
PartitionName=debug Nodes=node[1-{len(self.nodes)}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        self.conf.write_text(text)

    # ---- munge ------------------------------------------------------------------------------
    def _munge_ok(self) -> bool:
        try:
            cred = subprocess.run([which("munge") or "munge", "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            back = subprocess.run([which("unmunge") or "unmunge"], input=cred.stdout,
                                  capture_output=True, timeout=10)
            return back.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        if self._munge_ok():
            return
        # Run munged as the owner of the key (Debian's package makes both the key and the dirs
        # belong to user "munge"); a key we generate goes to that user too when it exists.
        try:
            import pwd
            munge_user = pwd.getpwnam("munge")
            uid, gid = munge_user.pw_uid, munge_user.pw_gid
        except (ImportError, KeyError):
            uid, gid = os.geteuid(), os.getegid()
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            tmp = MUNGE_KEY.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
            os.chown(tmp, uid, gid)
            os.replace(tmp, MUNGE_KEY)
        st = MUNGE_KEY.stat()
        uid, gid = st.st_uid, st.st_gid
        for d, mode in (("/run/munge", 0o755), ("/var/lib/munge", 0o700), ("/var/log/munge", 0o700)):
            if not Path(d).exists():
                Path(d).mkdir(parents=True)
                os.chown(d, uid, gid)
                os.chmod(d, mode)
        log = open(self.dir / "log" / "munged.out", "ab")
        self._munged = subprocess.Popen(
            [which("munged") or "munged", "--foreground"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={k: v for k, v in self.env.items() if k != "DSGPT_LOCAL_SLURM"},  # not swept
            user=uid if uid != os.geteuid() else None, group=gid if uid != os.geteuid() else None,
            preexec_fn=_pdeathsig)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._munge_ok():
                return
            if self._munged.poll() is not None:
                break
            time.sleep(0.2)
        raise SlurmError("munged did not start:\n" + _tail(self.dir / "log" / "munged.out", 20)
                         + "\n" + _tail(Path("/var/log/munge/munged.log"), 20))

    # ---- lifecycle --------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "ab")
        self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env, cwd=self.dir,
                                             preexec_fn=_pdeathsig)
        out.close()

    def start(self) -> "LocalSlurm":
        if self._started:
            return self
        missing = _missing()
        if missing:
            raise SlurmError(f"Slurm binaries missing: {', '.join(missing)} (call ensure_packages())")
        self._started = True
        atexit.register(self.stop)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "log").mkdir(exist_ok=True)
            self.sweep_stale()
            ensure_hosts([*self.nodes, self.hostname])
            self._write_conf()
            self._start_munge()
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
            for n in self.nodes:
                self._spawn(f"slurmd.{n}", [which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        seen = ""
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} during start-up\n{self.log_tail()}")
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=15)
            seen = proc.stdout.strip() + proc.stderr.strip()
            states = dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)
            if proc.returncode == 0 and all(states.get(n, "").rstrip("*~#!%$@^-") == "idle"
                                            for n in self.nodes):
                return
            time.sleep(0.3)
        raise SlurmError(f"nodes not idle after {self.start_timeout:.0f}s; sinfo says:\n{seen}\n{self.log_tail()}")

    def stop(self) -> None:
        if self._stopped or not self._started:
            return
        self._stopped = True
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        ctld_alive = "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None
        if ctld_alive:
            try:
                self.run(["scancel", "--quiet", "--user", str(os.geteuid())], check=False, timeout=15)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    q = self.run(["squeue", "-h", "-o", "%i %T"], check=False, timeout=15)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.3)
            except Exception:
                pass
        # slurmd first (they own the steps), then slurmctld; SIGTERM, then SIGKILL.
        order = [n for n in self._procs if n != "slurmctld"] + (["slurmctld"] if "slurmctld" in self._procs else [])
        for name in order:
            p = self._procs[name]
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for name in order:
            p = self._procs[name]
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self._sweep()
        if self._munged is not None and self._munged.poll() is None:
            self._munged.terminate()
            try:
                self._munged.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._munged.kill()
                self._munged.wait(timeout=10)
        if self._own_dir and not os.environ.get("DSGPT_KEEP_SLURM"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _sweep(self) -> None:
        """Kill leftovers of this cluster only: slurmstepd and job processes carry our marker env."""
        for _ in range(3):
            found = [pid for pid, d, _ in _marked_processes() if d == str(self.dir)]
            if not found:
                return
            _kill(found)

    @staticmethod
    def sweep_stale() -> None:
        """Kill what a cluster of this module left behind when its test process died abruptly
        (SIGKILL: the daemons die with it, but job steps, being daemonized, live on). Only
        processes carrying a DSGPT_LOCAL_SLURM marker whose slurmctld is gone are touched."""
        procs = _marked_processes()
        alive = {d for _, d, cmd in procs if cmd.startswith(b"slurmctld") or b"/slurmctld" in cmd.split(b" ")[0]}
        _kill([pid for pid, d, _ in procs if d not in alive])

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- commands ---------------------------------------------------------------------------
    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 60,
            input: Optional[str] = None, cwd: Union[str, Path, None] = None,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """Run a Slurm client (sbatch, squeue, ...) against this cluster; raise SlurmError if check."""
        cmd = [str(c) for c in cmd]
        full_env = dict(self.env, **(env or {}))
        proc = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=full_env, capture_output=True,
                              text=True, timeout=timeout, input=input, cwd=cwd)
        if check and proc.returncode != 0:
            raise SlurmError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.run(["scontrol", *args], check=check).stdout

    def squeue(self, *args: str) -> str:
        return self.run(["squeue", *args]).stdout

    def scancel(self, *args: str) -> str:
        return self.run(["scancel", *args]).stdout

    def sbatch(self, args: Sequence[str] = (), script: Union[str, Path, None] = None, *,
               wrap: Optional[str] = None, script_args: Sequence[str] = (),
               cwd: Union[str, Path, None] = None, env: Optional[dict] = None) -> str:
        """Submit a batch job; returns its job id (for an array, the array's job id).

        `script` is a path to a batch script, or the script's text (anything with a newline);
        alternatively `wrap` is a shell command line (sbatch --wrap). `env` adds variables to the
        submission environment (sbatch exports it to the job by default).
        """
        if (script is None) == (wrap is None):
            raise ValueError("give exactly one of script= or wrap=")
        cmd = ["sbatch", "--parsable", *args]
        if wrap is not None:
            cmd += ["--wrap", wrap]
        else:
            if isinstance(script, str) and "\n" in script:
                path = self.dir / f"script-{time.monotonic_ns()}.sh"
                path.write_text(script)
                path.chmod(0o755)
                script = path
            cmd += [str(script), *script_args]
        out = self.run(cmd, cwd=cwd or self.dir, env=env).stdout.strip()
        return out.split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job -o` as dicts (one per array task). [] when the job is unknown."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return []
        out = []
        for line in proc.stdout.splitlines():
            if not line.strip():
                continue
            rec = {}
            for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line):
                rec.setdefault(m.group(1), m.group(2))
            out.append(rec)
        return out

    def state(self, job_id: str) -> str:
        """Current state; for an array, its tasks' states joined by ',' (sorted, unique)."""
        recs = self.jobs(job_id)
        if not recs:
            return self._jobcomp_state(job_id) or "UNKNOWN"
        return ",".join(sorted({r.get("JobState", "UNKNOWN") for r in recs}))

    def _jobcomp_state(self, job_id: str) -> Optional[str]:
        """Final state from the jobcomp file, for a job slurmctld already forgot (MinJobAge)."""
        path = self.dir / "log" / "jobcomp.txt"
        last = None
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if f"JobId={job_id} " in line:
                    m = re.search(r"JobState=(\S+)", line)
                    last = m.group(1) if m else last
        return last

    def wait(self, job_id: str, timeout: float = 120, *, until: Iterable[str] = TERMINAL) -> str:
        """Poll until every task of the job is in one of `until` (default: finished); return state().

        Raises TimeoutError with the job's record and the daemons' log tails.
        """
        until = set(until)
        deadline = time.monotonic() + timeout
        while True:
            recs = self.jobs(job_id)
            states = {r.get("JobState", "UNKNOWN") for r in recs} if recs else \
                {self._jobcomp_state(job_id) or "UNKNOWN"}
            if states <= until:
                return ",".join(sorted(states))
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {','.join(sorted(states))} after {timeout:.0f}s "
                                   f"(waiting for {sorted(until)}):\n"
                                   f"{self.scontrol('show', 'job', str(job_id), check=False)}\n{self.log_tail()}")
            time.sleep(0.25)

    def release(self, job_id: str, timeout: float = 60) -> None:
        """After a requeue: wait until the job is pending again, then make it eligible now
        (a requeued job otherwise waits ~2 minutes with Reason=BeginTime).

        Not at once, though: a slurmd refuses a job's new launch credential when it was made in
        the same second as (or before) that job's revocation by the requeue ("Job credential
        revoked", the job then ends FAILED) - that is what the 2 minutes guard against.
        """
        self.wait(job_id, timeout, until={"PENDING"})
        time.sleep(2.0)
        self.scontrol("update", f"JobId={job_id}", "StartTime=now")

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ["slurmctld", *[f"slurmd.{n}" for n in self.nodes]]:
            parts.append(f"--- {name}.log ---\n{_tail(self.dir / 'log' / f'{name}.log', lines)}")
            out = self.dir / "log" / f"{name}.out"
            if out.exists() and out.stat().st_size:
                parts.append(f"--- {name} stdout/stderr ---\n{_tail(out, lines)}")
        return "\n".join(parts)
