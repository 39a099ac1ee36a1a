"""A heartbeat watchdog, so that a dead or hung rank never hangs the job.

When one rank dies or stops, the others sit in a collective that never returns (NCCL can wait
forever, gloo until its timeout) and nobody says which rank is to blame. Here every rank runs a
daemon thread that, every `interval_s`, rewrites `rank{R:05d}.json` in a directory all ranks
share (the run dir: nodes share it as they share checkpoints) and reads its peers' files. It uses
no collectives: the thread keeps running while the main thread is blocked in one, and a stopped
or dead process cannot write, so its file stops changing.

A rank gives up (prints one paragraph naming the rank and host, then `os._exit(3)`) when:
- a watched peer's file has not changed for `timeout_s` (the peer is stopped, dead or cut off);
- a peer on this machine has no process any more (at once: no need to wait for the timeout);
- a peer never wrote a heartbeat of this launch within `timeout_s` of this rank's start;
- a peer's file vanished, or says that it failed: a failure it detected counts at once; its
  own exception counts at once only if this rank waits in a collective, else after a short
  grace (the same UserError may be on its way on this rank too: let it speak for itself);
- this rank made no `progress()` for `timeout_s` outside a `phase()` while the peers are alive:
  a live process hangs (a deadlock, an endless loop, a collective some rank never joined);
- any rank wrote this launch's verdict (`failure.json`): the first detector tells everyone.

Ages are measured on this rank's own monotonic clock, from the moment it saw a peer's file
change (a sequence number in it), never by comparing the clocks of two hosts, so clock skew
between nodes does not matter. If this rank's own thread could not run for a while (the process
was stopped, or starved), that time is not held against the peers.

Files of an earlier launch in the same directory are ignored: each launch has an id that every
rank agrees on (`start_for_run` broadcasts one), and a file with another id counts as not yet
written. Each rank reads at most `fanout` peers per interval (the next ranks, wrapping around),
so the shared filesystem sees O(world) small reads, not O(world²); any failure is seen by the
live rank just before it, and that rank's verdict file reaches everyone else.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

EXIT_CODE = 3  # distinct from a Python traceback (1) and from the launchers' own codes
VERDICT = "failure.json"


@dataclass
class Failure:
    """Why a rank gives up, and whom it blames."""
    kind: str  # stale | dead | missing | vanished | failed | stalled
    rank: Optional[int]
    host: Optional[str] = None
    node_rank: Optional[int] = None
    pid: Optional[int] = None
    step: Optional[int] = None
    seconds: float = 0.0
    detail: str = ""
    reporter_rank: Optional[int] = None  # who detected it (set when read from a verdict)
    reporter_host: Optional[str] = None
    message: str = ""  # the paragraph this rank printed

    def who(self) -> str:
        if self.rank is None:
            return "an unknown rank"
        if not self.host:
            return f"rank {self.rank} (host unknown)"
        return f"rank {self.rank} on host {self.host} (node {self.node_rank}, pid {self.pid})"

    def cause(self) -> str:
        step = f"last step {self.step}" if self.step is not None else "before its first step"
        extra = f", {self.detail}" if self.detail and self.kind in ("stale", "vanished") else ""
        if self.kind == "stale":
            return f"{self.who()} has not written a heartbeat for {self.seconds:.0f} s ({step}{extra})"
        if self.kind == "dead":
            return f"{self.who()} has died: its process is gone ({step})"
        if self.kind == "missing":
            return (f"{self.who()} never wrote a heartbeat of this launch within {self.seconds:.0f} s "
                    f"(it did not start, or cannot reach the shared directory)")
        if self.kind == "vanished":
            return f"the heartbeat file of {self.who()} was removed while it ran ({step})"
        if self.kind == "failed":
            return f"{self.who()} failed: {self.detail}"
        return self.detail  # stalled: the whole story is in the detail


def _exit_process(failure: Failure) -> None:
    # A hard exit: the main thread is most likely blocked in a collective that will never
    # return, so neither an exception nor sys.exit() from this thread would end the process.
    sys.stderr.write(failure.message + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_CODE)


@dataclass
class _Peer:
    rank: int
    info: Optional[dict] = None  # its last heartbeat of this launch
    seq: object = None
    changed_at: float = 0.0  # our monotonic time when we saw its file change (or our start)
    first_seen: object = None  # (pid, seq) at our first read, when there is no launch id
    missing_reads: int = 0


class Watchdog:
    """One per rank. `start()`, then `progress(step)` after every step, `with phase(...)`
    around long collective phases, `handle_exception(exc)` on the way out of an error, `stop()`
    at a clean end. A watchdog with `timeout_s <= 0` or a world of one does nothing."""

    def __init__(self, directory, rank: int, world_size: int, host: str, node_rank: int,
                 timeout_s: float, interval_s: float = 2.0, on_failure: Optional[Callable] = None, *,
                 launch_id: Optional[str] = None, fanout: int = 8, timeout_key: str = "train.hang_timeout_s",
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.directory = Path(directory)
        self.rank, self.world_size, self.host, self.node_rank = rank, world_size, host, node_rank
        self.timeout_s = float(timeout_s)
        # Several writes per timeout, or a peer that is merely slow to be read looks dead.
        self.interval_s = max(0.05, min(float(interval_s), self.timeout_s / 4)) if timeout_s > 0 else interval_s
        self.on_failure = on_failure or _exit_process
        self.launch_id, self.timeout_key = launch_id, timeout_key
        self.active = timeout_s > 0 and world_size > 1
        self._clock, self._wall = clock, wall
        self.path = self.directory / f"rank{rank:05d}.json"
        watched = [(rank + k) % world_size for k in range(1, min(world_size, fanout + 1))]
        self._peers = {r: _Peer(r) for r in watched}
        self._seq = 0
        self._step: Optional[int] = None
        self._progress_at: Optional[float] = None  # armed by the first progress(): setup may be slow
        self._progress_wall: Optional[float] = None
        self._phase: Optional[str] = None
        self._phase_limit: Optional[float] = None
        self._started_at = 0.0
        self._scan_after = 0.0
        self._last_tick: Optional[float] = None
        self._verdict_seen: object = None
        self._deferred: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = False
        self._failed: Optional[Failure] = None
        self._write_error_shown = False
        self._me = _process_identity()

    # ---- the training loop's side ------------------------------------------------------------

    def start(self, thread: bool = True) -> "Watchdog":
        """Write the first heartbeat and start the thread (thread=False: the caller drives
        beat() and check() itself, as the unit tests do with a fake clock)."""
        if not self.active or self._started:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self._started_at = self._last_tick = self._clock()
        for peer in self._peers.values():
            peer.changed_at = self._started_at
        self._verdict_seen = _signature(self.directory / VERDICT)
        self._write("running")  # at once, and here: an unwritable directory fails in the caller
        self._started = True
        if thread:
            self._thread = threading.Thread(target=self._run, name=f"dsgpt-watchdog-{self.rank}", daemon=True)
            self._thread.start()
        return self

    def beat(self) -> None:
        """Publish this rank's heartbeat now (the thread does this every interval)."""
        self._write("running")

    def progress(self, step: int) -> None:
        """This rank finished `step` (cheap: no I/O; the thread publishes it)."""
        self._step = step
        self._progress_at = self._clock()
        self._progress_wall = self._wall()

    @contextmanager
    def phase(self, name: str, timeout_s: Optional[float] = None):
        """A stretch that may legitimately take longer than the timeout on every rank at once
        (checkpoint writing, evaluation). Inside, this rank's own progress limit is `timeout_s`
        (None: no limit); peers are still watched, so a peer that dies meanwhile is still caught."""
        saved = (self._phase, self._phase_limit)
        self._phase, self._phase_limit = name, timeout_s
        self._progress_at = self._clock() if self._progress_at is not None else None
        try:
            yield self
        finally:
            self._phase, self._phase_limit = saved
            if self._progress_at is not None:
                self._progress_at = self._clock()  # the phase itself was progress

    def handle_exception(self, exc: BaseException) -> None:
        """Call on the way out of an exception (then re-raise). If a peer's failure explains it
        (a collective broke because a rank died), report that peer and exit like a detection.
        Otherwise this rank is the cause: publish that, so peers stuck in a collective exit now,
        naming this rank and the error, instead of waiting for the timeout."""
        if not self.active or not self._started:
            return
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            self.stop()
            return
        failure = None
        if _looks_like_comm_error(exc):
            # The peer that broke the collective may be on another host: its heartbeat goes stale
            # only after the timeout. Wait that long for a culprit before blaming ourselves.
            deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
            failure = self._checked(progress_rule=False, patient=False)
            while failure is None and self._failed is None and time.monotonic() < deadline:
                time.sleep(self.interval_s)
                failure = self._checked(progress_rule=False, patient=False)
        # Any other error is this rank's own (the same UserError may be raised on every rank):
        # never report a peer for it.
        if self._failed is not None:
            return
        if failure is not None:
            self._fail(failure)
            return
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()
        me = self._self_failure("failed", detail=(text[0] if text else type(exc).__name__)[:500])
        self._shutdown("failed", me)
        self._publish_verdict(me)

    def stop(self) -> None:
        """A clean end: the thread stops and the file says `done`, so no peer takes this rank's
        silence for a failure. (The file stays: a removed file would look like a wiped run dir.)"""
        if self.active and self._started and self._failed is None:
            self._shutdown("done")

    @property
    def failure(self) -> Optional[Failure]:
        return self._failed

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._write("running")
                failure = self._checked()
            except Exception:  # a bug here must not kill training; say it once per interval
                traceback.print_exc()
                continue
            if failure is not None and not self._stop.is_set():
                self._fail(failure)
                return

    def _checked(self, progress_rule: bool = True, patient: bool = True) -> Optional[Failure]:
        with self._lock:
            return self.check(progress_rule=progress_rule, patient=patient)

    def check(self, progress_rule: bool = True, patient: bool = True) -> Optional[Failure]:
        """One round: a verdict, then each watched peer, then this rank's own progress."""
        now = self._clock()
        self._credit_own_gap(now)
        found = [self._read_verdict(), *[self._check_peer(peer, now) for peer in self._peers.values()]]
        for failure in found:
            if failure is not None and not (patient and self._defer(failure, now)):
                return failure
        return self._check_progress(now) if progress_rule else None

    def _defer(self, failure: Failure, now: float) -> bool:
        """A peer's own exception (not a detection) may be one this rank is about to raise too
        (a UserError on every rank): give our main thread a moment to raise it, unless it waits
        in a collective that the failed peer will never join."""
        if failure.kind != "failed" or failure.rank != failure.reporter_rank:
            return False
        first = self._deferred.setdefault((failure.rank, failure.pid), now)
        grace = min(self.timeout_s, max(10.0, 3 * self.interval_s))
        return now - first < grace and not _main_thread_location()[1]

    def _credit_own_gap(self, now: float) -> None:
        # If this thread did not run for a while (the whole job was stopped with ^Z, the machine
        # slept, or this process was starved), that time says nothing about the peers.
        if self._last_tick is not None:
            lost = now - self._last_tick - 2 * self.interval_s
            if lost > 0:
                for peer in self._peers.values():
                    peer.changed_at += lost
                if self._progress_at is not None:
                    self._progress_at += lost
                self._started_at += lost
        self._last_tick = now

    def _current(self, data: dict, peer: Optional[_Peer]) -> bool:
        """Is this a heartbeat of this launch (not a leftover of an earlier one)?"""
        if data.get("rank") is None or data.get("world_size") != self.world_size:
            return False
        if self.launch_id is not None:
            return data.get("launch_id") == self.launch_id
        if peer is None:
            return True
        # No launch id: trust a file only once it changed after this rank started.
        mark = (data.get("pid"), data.get("seq"))
        if peer.first_seen is None:
            peer.first_seen = mark
            return False
        return mark != peer.first_seen

    def _check_peer(self, peer: _Peer, now: float) -> Optional[Failure]:
        data, missing = _read_json(self.directory / f"rank{peer.rank:05d}.json")
        if data is not None and not self._current(data, peer):
            data = None
        if data is None:
            if peer.info is not None and missing:
                peer.missing_reads += 1
                if peer.missing_reads >= 2:  # twice in a row: not a rename in flight
                    return self._blame("vanished", peer.info, now - peer.changed_at)
        else:
            peer.missing_reads = 0
            if data.get("seq") != peer.seq:
                peer.seq, peer.info, peer.changed_at = data.get("seq"), data, now
            if data.get("state") == "done":
                return None
            if data.get("state") == "failed":
                return _from_dict(data.get("failure")) or self._blame("failed", data, 0.0,
                                                                       data.get("error") or "unknown error")
        info = peer.info
        if info is not None and info.get("state") == "done":
            return None
        proc = _process_state(info, self._me) if info is not None else None
        if proc == "gone":
            return self._blame("dead", info, now - peer.changed_at)
        age = now - peer.changed_at
        if age <= self.timeout_s:
            return None
        if info is None:
            return Failure("missing", peer.rank, seconds=age)
        return self._blame("stale", info, age, {"stopped": "its process is stopped (SIGSTOP, ^Z or a debugger)",
                                                "zombie": "its process has exited"}.get(proc or "", ""))

    def _check_progress(self, now: float) -> Optional[Failure]:
        if self._progress_at is None:
            return None
        limit = self._phase_limit if self._phase else self.timeout_s
        age = now - self._progress_at
        # A silent peer also stops this rank's progress; the grace lets the staleness rule (here or
        # at the peer's watcher, whose verdict names the silent rank exactly) speak first.
        if limit is None or age <= limit + 3 * self.interval_s:
            return None
        for p in self._peers.values():
            if p.info is not None and p.info.get("state") == "running":
                if now - p.changed_at > 3 * self.interval_s:
                    return None  # silent: the staleness rule will decide
                if p.info.get("phase"):
                    return None  # a declared long phase may be what we wait for: its own limit applies
        if now < self._scan_after:
            return None
        everyone = self._read_all()  # once, when stalled: the diagnosis needs every rank
        if any(d.get("phase") and d.get("state") == "running" for d in everyone if d["rank"] != self.rank):
            self._scan_after = now + self.timeout_s / 4  # an unwatched peer in a phase: look again later
            return None
        running = [d for d in everyone if d.get("state") == "running"]
        steps = [d["step"] for d in running if d.get("step") is not None]
        behind = [d for d in running if d.get("step") == (min(steps) if steps else None)] or running
        # The rank that hangs is usually the one NOT waiting in a collective.
        suspects = [d for d in behind if not d.get("in_collective")] or behind
        names = "; ".join(f"rank {d['rank']} on host {d.get('host')} (pid {d.get('pid')}) at step {d.get('step')}"
                          f"{', in ' + d['where'] if d.get('where') else ''}"
                          f"{', waiting in a collective' if d.get('in_collective') else ''}"
                          for d in suspects[:8])
        more = f" and {len(suspects) - 8} more" if len(suspects) > 8 else ""
        where = f" ({self._phase} phase)" if self._phase else ""
        detail = (f"rank {self.rank} on host {self.host} has made no progress for {age:.0f} s{where} although "
                  f"the ranks it watches are alive, so a live process hangs (a deadlock, an endless loop, "
                  f"or a collective some rank never joined); most likely {names}{more}")
        d = suspects[0] if suspects else {}
        return Failure("stalled", d.get("rank"), d.get("host"), d.get("node_rank"), d.get("pid"),
                       d.get("step"), age, detail)

    def _read_all(self) -> list[dict]:
        out = [self._heartbeat("running")]
        for r in range(self.world_size):
            if r != self.rank:
                data, _ = _read_json(self.directory / f"rank{r:05d}.json")
                if data is not None and self._current(data, None):
                    out.append(data)
        return out

    def _read_verdict(self) -> Optional[Failure]:
        path = self.directory / VERDICT
        data, _ = _read_json(path)
        if data is None or data.get("reporter_rank") == self.rank:
            return None
        if self.launch_id is not None:
            ok = data.get("launch_id") == self.launch_id
        else:
            ok = _signature(path) != self._verdict_seen  # no id: only a verdict written after our start
        return _from_dict(data.get("failure")) if ok else None

    # ---- failing ------------------------------------------------------------------------------

    def _blame(self, kind: str, info: dict, seconds: float, detail: str = "") -> Failure:
        return Failure(kind, info.get("rank"), info.get("host"), info.get("node_rank"), info.get("pid"),
                       info.get("step"), seconds, detail)

    def _self_failure(self, kind: str, detail: str) -> Failure:
        return Failure(kind, self.rank, self.host, self.node_rank, os.getpid(), self._step, 0.0, detail,
                       self.rank, self.host)

    def _fail(self, failure: Failure) -> None:
        with self._lock:
            if self._failed is not None:
                return
            self._failed = failure
        if failure.reporter_rank is None:
            failure.reporter_rank, failure.reporter_host = self.rank, self.host
        failure.message = self.message(failure)
        self._shutdown("failed", failure)
        self._publish_verdict(failure)
        self.on_failure(failure)

    def message(self, failure: Failure) -> str:
        seen_by = ""
        if failure.reporter_rank not in (None, self.rank, failure.rank):
            seen_by = f" (detected by rank {failure.reporter_rank} on host {failure.reporter_host})"
        return (f"dsgpt: {failure.cause()}{seen_by}; this rank {self.rank} on host {self.host} exits with "
                f"code {EXIT_CODE} so the job does not hang. Check that host and process (is it alive? "
                f"dmesg, the out-of-memory killer, GPU errors, its own log). Heartbeats: {self.directory}; "
                f"the limit is {self.timeout_key}={self.timeout_s:g} s.")

    def _shutdown(self, state: str, failure: Optional[Failure] = None) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 3 * self.interval_s))
        if failure is not None and self._failed is None:
            self._failed = failure
        self._write(state, failure)

    def _publish_verdict(self, failure: Failure) -> None:
        # The first verdict of a launch stays (it names the root cause, later ones the cascade).
        path = self.directory / VERDICT
        old, _ = _read_json(path)
        if old is not None and self.launch_id is not None and old.get("launch_id") == self.launch_id:
            return
        self._atomic_write(path, {"launch_id": self.launch_id, "reporter_rank": self.rank,
                                  "failure": asdict(failure), "now": self._wall()})

    # ---- the heartbeat file -------------------------------------------------------------------

    def _heartbeat(self, state: str, failure: Optional[Failure] = None) -> dict:
        now = self._clock()
        where, in_collective = _main_thread_location()
        return {
            "launch_id": self.launch_id, "rank": self.rank, "world_size": self.world_size, "host": self.host,
            "node_rank": self.node_rank, "pid": os.getpid(), **self._me, "seq": self._seq, "state": state,
            "step": self._step, "phase": self._phase,
            # Seconds on this rank's own clock, so a reader needs no clock agreement.
            "progress_age_s": None if self._progress_at is None else round(now - self._progress_at, 3),
            "last_progress_time": self._progress_wall, "now": self._wall(),
            "where": where, "in_collective": in_collective,
            **({"error": failure.cause(), "failure": asdict(failure)} if failure else {}),
        }

    def _write(self, state: str, failure: Optional[Failure] = None) -> None:
        self._seq += 1
        try:
            self._atomic_write(self.path, self._heartbeat(state, failure))
        except OSError as err:
            if not self._write_error_shown:  # peers will call this rank stale; say why here
                self._write_error_shown = True
                print(f"dsgpt: rank {self.rank} cannot write its heartbeat {self.path}: {err}",
                      file=sys.stderr, flush=True)
            if not self._started:
                raise

    def _atomic_write(self, path: Path, obj: dict) -> None:
        # Not dsgpt.io.atomic_write_json: no fsync. Readers on other nodes see the file after
        # close (close-to-open), and an fsync per beat would queue behind checkpoint writes.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)


def start_for_run(ctx, run_dir, timeout_s: float, interval_s: float = 2.0, **kw) -> Watchdog:
    """Every rank calls this right after dist.setup(): one broadcast (the launch id), no more
    collectives after it. Heartbeats go to RUN_DIR/heartbeats."""
    w = Watchdog(Path(run_dir) / "heartbeats", ctx.rank, ctx.world_size, ctx.hostname, ctx.node_rank,
                 timeout_s, interval_s, **kw)
    if w.active and w.launch_id is None:
        from dsgpt import dist
        w.launch_id = dist.broadcast_object(uuid.uuid4().hex if ctx.rank == 0 else None)
    return w.start()


def verdict_message(run_dir, since: float = 0.0) -> Optional[str]:
    """The paragraph of the launch's verdict in RUN_DIR/heartbeats, if one was written at or after
    `since` (seconds since the epoch). The rank that printed it may have been killed before its
    output reached the job log (srun tears a failed step down at once): a batch script reads it
    back from here after the step ended."""
    data, _ = _read_json(Path(run_dir) / "heartbeats" / VERDICT)
    if data is None or not isinstance(data.get("now"), (int, float)) or data["now"] < since:
        return None
    failure = _from_dict(data.get("failure"))  # None unless a dict
    if failure is None:
        return None
    return data["failure"].get("message") or f"dsgpt: {failure.cause()}"


# ---- helpers ----------------------------------------------------------------------------------


def _read_json(path: Path) -> tuple[Optional[dict], bool]:
    """(data, missing). Unreadable or half-visible files read as (None, False): try next time."""
    try:
        with open(path) as f:
            data = json.load(f)
        return (data, False) if isinstance(data, dict) else (None, False)
    except FileNotFoundError:
        return None, True
    except (OSError, ValueError):
        return None, False


def _signature(path: Path):
    try:
        st = path.stat()
        return (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def _from_dict(d) -> Optional[Failure]:
    if not isinstance(d, dict):
        return None
    known = {k: d[k] for k in Failure.__dataclass_fields__ if k in d and k != "message"}
    try:
        return Failure(**known)
    except TypeError:
        return None


def _process_identity() -> dict:
    """What tells whether another rank's pid can be looked up here: same kernel boot and pid
    namespace (containers on one host may share a hostname but not pids), and its start time
    (pids are reused)."""
    ident = {"boot_id": None, "pidns": None, "pid_start": None}
    try:
        ident["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ident["pidns"] = os.readlink("/proc/self/ns/pid")
        ident["pid_start"] = _stat_fields(os.getpid())[19]
    except (OSError, IndexError, TypeError):
        pass
    return ident


def _stat_fields(pid: int) -> Optional[list[str]]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the name in (...) may contain spaces


def _process_state(info: dict, me: dict) -> Optional[str]:
    """gone | zombie | stopped | running for a peer on this machine; None when we cannot tell."""
    if not me.get("boot_id") or info.get("boot_id") != me["boot_id"] or info.get("pidns") != me["pidns"]:
        return None
    pid = info.get("pid")
    if not isinstance(pid, int):
        return None
    fields = _stat_fields(pid)
    if fields is None or (info.get("pid_start") and fields[19] != info["pid_start"]):
        return "gone"  # no such process, or the pid now belongs to another one
    return {"Z": "zombie", "X": "gone", "T": "stopped", "t": "stopped"}.get(fields[0], "running")


def _main_thread_location() -> tuple[Optional[str], bool]:
    """Where the main thread is (innermost frame), and whether it waits inside a collective."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return None, False
    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({frame.f_code.co_name})"
    in_collective = False
    f = frame
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if "torch/distributed" in name or "deepspeed/comm" in name:
            in_collective = True
            break
        f = f.f_back
    return where, in_collective


def _looks_like_comm_error(exc: BaseException) -> bool:
    """A broken collective (gloo: 'Connection closed by peer', NCCL errors, timeouts)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection closed", "connection reset", "remote worker",
                            "timed out", "broken pipe", "peer"))
