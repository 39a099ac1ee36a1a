"""Stop requests from outside: SIGUSR1 (Slurm's warning before a time limit or preemption) and
SIGTERM. The handler only sets a flag; the training loop polls it and all ranks agree on a stop
through one collective, so no rank leaves the others hanging in the next all-reduce."""

from __future__ import annotations

import signal

_requested: list[str] = []


def _handler(signum, frame):
    _requested.append(signal.Signals(signum).name)
    # Under Slurm a warning arrives more than once (scancel --full, srun and the batch script
    # each forward it); one is enough, and a late copy must not kill a rank that is saving.
    if signum == signal.SIGUSR1:
        signal.signal(signum, signal.SIG_IGN)


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def stop_requested() -> bool:
    return bool(_requested)


def reason() -> str:
    return _requested[0] if _requested else ""


def number() -> int:
    """The first requested signal's number (0: none): shared in the stop collective, so every rank
    names the signal even when its own copy has not arrived yet."""
    return int(signal.Signals[_requested[0]]) if _requested else 0


def name(signum: int) -> str:
    return signal.Signals(int(signum)).name
