"""The hang watchdog: a stopped or killed rank ends the job within a bounded time, and the message
names the rank and host; healthy runs (long phases, leftover files of an earlier launch) are left
alone. Unit tests drive the rules with a fake clock; the others launch 2 real ranks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEEPSPEED, REPO, child_env, free_port
from dsgpt.watchdog import VERDICT, Watchdog

TIMEOUT, INTERVAL = 4.0, 0.5  # the probe's; the detection bound is TIMEOUT + 2 intervals + slack


# ---- the rules, with a fake clock and no threads ---------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def dog(directory, rank, clock, world=2, launch_id="L1", **kw) -> Watchdog:
    got = []
    w = Watchdog(directory, rank, world, f"host{rank}", rank, timeout_s=10, interval_s=1,
                 on_failure=got.append, launch_id=launch_id, clock=clock, **kw)
    w.got = got
    return w.start(thread=False)


def tick(clock, seconds, *beating):
    """Let `seconds` pass, one second at a time; the `beating` watchdogs write and check."""
    found = []
    for _ in range(int(seconds)):
        clock.t += 1
        for w in beating:
            w.beat()
        for w in beating:
            f = w.check()
            if f:
                found.append((clock.t, w.rank, f))
    return found


def test_a_silent_peer_is_named_after_the_timeout_not_before(tmp_path):
    clock = Clock()
    a, b = dog(tmp_path, 0, clock), dog(tmp_path, 1, clock)
    a.progress(3), b.progress(3)
    assert tick(clock, 5, a, b) == []
    silent_since = clock.t
    found = tick(clock, 15, a)  # rank 1 stops writing (stopped or dead on another host)
    t, rank, f = found[0]
    assert rank == 0 and f.kind == "stale" and f.rank == 1 and f.host == "host1" and f.step == 3
    assert 10 < t - silent_since <= 12
    a._fail(f)
    msg = a.got[0].message
    assert "rank 1 on host host1 (node 1, pid " in msg and "last step 3" in msg
    assert "this rank 0 on host host0 exits with code 3" in msg and "train.hang_timeout_s=10" in msg
    # The detector publishes its verdict and its own file says failed, so every rank hears of it.
    assert json.loads((tmp_path / VERDICT).read_text())["failure"]["rank"] == 1
    assert json.loads((tmp_path / "rank00000.json").read_text())["state"] == "failed"


def test_the_verdict_is_read_back_for_the_job_log(tmp_path):
    # srun may kill the detecting rank before its stderr reaches the job log; the batch script then
    # prints the verdict from the run dir with `dsgpt failure RUN_DIR --since START`.
    from dsgpt.cli import main
    from dsgpt.watchdog import verdict_message
    hb = tmp_path / "heartbeats"
    assert verdict_message(tmp_path) is None and main(["failure", str(tmp_path)]) == 1
    clock = Clock()
    a = Watchdog(hb, 0, 2, "host0", 0, timeout_s=10, interval_s=1, on_failure=lambda f: None,
                 launch_id="L1", clock=clock, wall=lambda: 5000.0).start(thread=False)
    b = Watchdog(hb, 1, 2, "host1", 1, timeout_s=10, interval_s=1, on_failure=lambda f: None,
                 launch_id="L1", clock=clock, wall=lambda: 5000.0).start(thread=False)
    a.progress(7), b.progress(7)
    tick(clock, 2, a, b)
    _, _, f = tick(clock, 15, a)[0]
    a._fail(f)
    message = verdict_message(tmp_path, since=4999.0)
    assert message == f.message and "rank 1 on host host1 (node 1" in message
    assert verdict_message(tmp_path, since=5001.0) is None  # an earlier launch's verdict
    assert main(["failure", str(tmp_path), "--since", "5001"]) == 1


def test_leftovers_of_an_earlier_launch_are_ignored(tmp_path):
    # An earlier launch (id OLD) failed here: rank 1's file says failed and a verdict exists.
    old = {"launch_id": "OLD", "rank": 1, "world_size": 2, "host": "old", "pid": 1, "seq": 9,
           "state": "failed", "error": "boom", "failure": {"kind": "failed", "rank": 1, "host": "old"}}
    (tmp_path / "rank00001.json").write_text(json.dumps(old))
    (tmp_path / VERDICT).write_text(json.dumps({"launch_id": "OLD", "reporter_rank": 1, "failure": old["failure"]}))
    clock = Clock()
    a = dog(tmp_path, 0, clock, launch_id="NEW")
    assert tick(clock, 4, a) == []
    b = dog(tmp_path, 1, clock, launch_id="NEW")  # rank 1 of this launch starts late but in time
    assert tick(clock, 30, a, b) == []
    # A rank that never writes a heartbeat of this launch is named by rank (its host is unknown).
    clock2 = Clock()
    (tmp_path / "rank00001.json").write_text(json.dumps(old))
    c = dog(tmp_path, 0, clock2, launch_id="NEWER")
    t, _, f = tick(clock2, 15, c)[0]
    assert f.kind == "missing" and f.rank == 1 and "rank 1 (host unknown) never wrote" in f.cause()
    assert 10 < t - 1000.0 <= 12


def test_without_a_launch_id_only_files_that_change_count(tmp_path):
    (tmp_path / "rank00001.json").write_text(json.dumps({"rank": 1, "world_size": 2, "pid": 1, "seq": 5,
                                                         "state": "failed", "error": "old"}))
    clock = Clock()
    a = dog(tmp_path, 0, clock, launch_id=None)
    assert tick(clock, 5, a) == []
    b = dog(tmp_path, 1, clock, launch_id=None)
    assert tick(clock, 30, a, b) == []


def test_time_this_rank_did_not_run_is_not_held_against_peers(tmp_path):
    clock = Clock()
    a, b = dog(tmp_path, 0, clock), dog(tmp_path, 1, clock)
    a.progress(1), b.progress(1)
    assert tick(clock, 3, a, b) == []
    clock.t += 120  # the whole job was stopped (^Z) or the machine slept
    assert tick(clock, 5, a, b) == []


def test_a_live_hang_names_the_rank_behind_and_phases_are_exempt(tmp_path):
    clock = Clock()
    a, b = dog(tmp_path, 0, clock), dog(tmp_path, 1, clock)
    for step in range(1, 4):
        a.progress(step), b.progress(step)
        assert tick(clock, 1, a, b) == []
    a.progress(4)  # rank 1 never finishes step 4, yet both processes live and beat
    with a.phase("checkpoint"), b.phase("checkpoint"):
        assert tick(clock, 30, a, b) == []  # inside a phase: no progress limit
    a.progress(5)
    found = tick(clock, 16, a, b)
    f = next(f for _, rank, f in found if rank == 0)
    assert f.kind == "stalled" and f.rank == 1 and f.step == 3
    assert "rank 0 on host host0 has made no progress" in f.cause() and "most likely rank 1 on host host1" in f.cause()


def test_a_failure_reaches_ranks_that_do_not_watch_the_failed_one(tmp_path):
    clock = Clock()
    ranks = [dog(tmp_path, r, clock, world=3, fanout=1) for r in range(3)]  # 0 watches 1, 1 watches 2
    assert tick(clock, 3, *ranks) == []
    ranks[2].handle_exception(ValueError("boom in rank 2"))
    assert json.loads(ranks[2].path.read_text())["state"] == "failed"
    # Not at once: rank 2's error may be one every rank raises (a UserError), and these main
    # threads are not waiting in a collective. After a short grace, they give up too.
    assert tick(clock, 9, *ranks[:2]) == []
    found = tick(clock, 2, *ranks[:2])
    assert sorted(rank for _, rank, _ in found) == [0, 1]
    for _, _, f in found:
        assert f.kind == "failed" and f.rank == 2 and f.host == "host2" and "ValueError: boom in rank 2" in f.cause()
        assert "detected by" not in ranks[0].message(f)


def test_a_dead_peer_on_this_machine_is_found_at_once(tmp_path):
    clock = Clock()
    a, b = dog(tmp_path, 0, clock), dog(tmp_path, 1, clock)
    assert tick(clock, 2, a, b) == []
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    beat = json.loads(b.path.read_text())
    beat.update(pid=gone.pid, seq=beat["seq"] + 1)
    b.path.write_text(json.dumps(beat))
    clock.t += 1
    f = a.check()
    assert f.kind == "dead" and f.rank == 1 and f.pid == gone.pid and "has died: its process is gone" in f.cause()


def test_a_clean_stop_and_a_removed_file(tmp_path):
    clock = Clock()
    a, b, c = (dog(tmp_path, r, clock, world=3) for r in range(3))
    assert tick(clock, 2, a, b, c) == []
    b.stop()
    assert json.loads(b.path.read_text())["state"] == "done"
    assert tick(clock, 5, a, c) == []
    c.path.unlink()
    found = tick(clock, 2, a)
    assert found and found[0][2].kind == "vanished" and found[0][2].rank == 2
    assert Watchdog(tmp_path / "single", 0, 1, "h", 0, timeout_s=10).start().active is False
    assert not (tmp_path / "single").exists()


# ---- two real ranks under the deepspeed launcher -----------------------------------------------


class Launch:
    """The probe under `deepspeed --num_gpus 2`, in the background; kills whatever is left."""

    def __init__(self, directory: Path, *args: str):
        self.dir = directory
        self.log = open(directory.parent / f"{directory.name}.log", "w+")
        cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "tests/workers/watchdog_probe.py"), str(directory),
               "--timeout", str(TIMEOUT), "--interval", str(INTERVAL), *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=self.log, stderr=subprocess.STDOUT)

    def pid(self, rank: int) -> int:
        return int((self.dir / f"pid.{rank}").read_text())

    def wait_for_step(self, step: int, limit: float = 60) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                beats = [json.loads((self.dir / f"rank{r:05d}.json").read_text()) for r in (0, 1)]
                if all((b.get("step") or 0) >= step for b in beats) and all(
                        (self.dir / f"pid.{r}").exists() for r in (0, 1)):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"the ranks did not reach step {step}\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def wait(self, limit: float) -> int:
        try:
            return self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the launch did not end within {limit} s\n{self.output()}") from None

    def cleanup(self) -> None:
        for r in (0, 1):
            try:
                os.kill(self.pid(r), signal.SIGKILL)  # works on a stopped process too
            except (OSError, ValueError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def launches():
    started = []
    yield lambda *a: started.append(Launch(*a)) or started[-1]
    for launch in started:
        launch.cleanup()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def test_a_stopped_rank_ends_the_job_and_is_named(tmp_path, launches):
    run = launches(tmp_path / "hb")
    run.wait_for_step(3)
    rank0, rank1 = run.pid(0), run.pid(1)
    os.kill(rank1, signal.SIGSTOP)  # the whole process stops, its watchdog thread too
    t0 = time.monotonic()
    while not _gone(rank0) and time.monotonic() - t0 < TIMEOUT + 15:
        time.sleep(0.05)
    took = time.monotonic() - t0
    print(f"watchdog: ended {took:.2f} s after the fault")
    assert _gone(rank0), run.output()
    # The launcher takes rank 0's exit code, then waits (up to 30 s) for the stopped rank to
    # take its SIGTERM; end it then (sooner, and the launcher might report rank 1's -9 instead).
    deadline = time.monotonic() + 10
    while "Killing subprocess" not in run.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(rank1, signal.SIGKILL)
    rc = run.wait(30)
    out = run.output()
    assert TIMEOUT - 2 * INTERVAL - 1 <= took <= TIMEOUT + 2 * INTERVAL + 2.5, (took, out)
    assert rc == 3, out  # the watchdog's exit code, passed on by the launcher
    host = socket.gethostname()
    assert f"dsgpt: rank 1 on host {host} (node 0, pid {rank1}) has not written a heartbeat" in out, out
    assert "its process is stopped" in out and f"this rank 0 on host {host} exits with code 3" in out


def test_a_killed_rank_ends_the_job_and_is_named(tmp_path, launches):
    run = launches(tmp_path / "hb")
    run.wait_for_step(3)
    rank1 = run.pid(1)
    t0 = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    rc = run.wait(TIMEOUT + 10)
    took = time.monotonic() - t0
    print(f"watchdog: ended {took:.2f} s after the fault")
    out = run.output()
    assert rc != 0, out
    # gloo fails the next all-reduce at once; handle_exception sees rank 1's process gone.
    assert f"dsgpt: rank 1 on host {socket.gethostname()} (node 0, pid {rank1}) has died" in out, out
    assert took <= 5, (took, out)


def test_a_live_hang_ends_the_job_and_names_the_rank_outside_the_collective(tmp_path, launches):
    # Rank 1 sleeps after step 5 (alive: its heartbeat stays fresh); rank 0 waits in all_reduce.
    run = launches(tmp_path / "hb", "--hang-rank", "1", "--hang-at", "5")
    run.wait_for_step(5)
    rank1 = run.pid(1)
    t0 = time.monotonic()
    rc = run.wait(TIMEOUT + 15)
    took = time.monotonic() - t0
    print(f"watchdog: ended {took:.2f} s after the fault")
    out = run.output()
    assert rc == 3, out
    host = socket.gethostname()
    assert "has made no progress" in out and "a live process hangs" in out, out
    assert f"most likely rank 1 on host {host} (pid {rank1}) at step 5, in watchdog_probe.py:" in out, out
    assert took <= TIMEOUT + 5 * INTERVAL + 3, (took, out)


def test_a_healthy_run_with_a_long_phase_and_old_files_finishes(tmp_path, launches):
    hb = tmp_path / "hb"
    hb.mkdir()
    # Leftovers of an earlier, failed launch in the same directory (a larger one, too).
    for r in range(3):
        (hb / f"rank{r:05d}.json").write_text(json.dumps(
            {"launch_id": "earlier", "rank": r, "world_size": 2, "host": "gone", "pid": 1, "seq": 7,
             "state": "failed", "error": "old", "failure": {"kind": "stale", "rank": 1, "host": "gone"}}))
    (hb / VERDICT).write_text(json.dumps({"launch_id": "earlier", "reporter_rank": 0,
                                          "failure": {"kind": "stale", "rank": 1, "host": "gone"}}))
    steps, phase = 15, TIMEOUT + 2  # longer than the timeout plus the stall rule's grace
    run = launches(hb, "--steps", str(steps), "--phase-at", "5", "--phase-seconds", str(phase))
    rc = run.wait(90)
    out = run.output()
    assert rc == 0, out
    assert out.count("PROBE_DONE rank") == 2 and f"steps {steps} phase {phase:.1f}" in out, out
    launch_ids = set()
    for r in (0, 1):
        beat = json.loads((hb / f"rank{r:05d}.json").read_text())
        assert beat["state"] == "done" and beat["step"] == steps
        launch_ids.add(beat["launch_id"])
    assert len(launch_ids) == 1 and "earlier" not in launch_ids
    assert "dsgpt: rank" not in out
