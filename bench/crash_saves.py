"""Kill a rank at random moments of a run that checkpoints every step, relaunch, and count how
many relaunches resumed from an intact checkpoint.

    python bench/crash_saves.py --trials 20 --ranks 2 --zero 1

Each trial SIGKILLs one random rank of a 2-rank CPU run (the DeepSpeed launcher then ends the
other) at a random moment after its first checkpoint: it waits a random while, catches the next save
under way (a tag dir without its manifest) and kills 0-100 ms into it; the run saves every step. The next launch must resume from `latest` or, when that checkpoint is damaged, from
the newest intact one, and go on training. Prints one line per trial and a summary, and appends
the summary to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

SECTION = "Crash-safe checkpoints (bench/crash_saves.py)"
COLUMNS = ["date", "machine", "ranks", "ZeRO", "kills", "inside a save", "resumed from latest",
           "resumed from an older intact one", "relaunches that failed", "versions"]
# 4 layers x 256 wide (3.7M parameters, ~45 MB per checkpoint with Adam's state): a save takes long
# enough to be hit.
SHAPE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=64",
         "train.micro_batch_size=2", "train.eval_interval=1000000", "train.save_interval=1",
         "train.keep_last=2", "train.log_interval=1", "optim.warmup_steps=0"]


def launcher(ranks: int, run_dir: Path, zero: int, max_steps: int) -> subprocess.Popen:
    from dsgpt.dist import free_port
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(free_port()), str(REPO / "launch/train.py"), "--config", "configs/tiny.yaml",
           f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", f"deepspeed.zero_stage={zero}",
           f"train.max_steps={max_steps}", *SHAPE]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rank_pids(proc: subprocess.Popen) -> list[int]:
    import psutil
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    # The ranks, not the launcher processes above them (their command lines name the script too).
    return [c.pid for c in children if any(part.startswith("--local_rank") for part in c.cmdline())]


def in_save(ckpt: Path) -> bool:
    """Whether a save is under way: a tag dir newer than `latest` without its manifest yet."""
    from dsgpt.runs import MANIFEST_FILE, list_tags
    tags = list_tags(ckpt)
    return bool(tags) and not (ckpt / tags[-1] / MANIFEST_FILE).exists()


def trial(ranks: int, run_dir: Path, zero: int, rnd: random.Random) -> dict:
    """One launch, killed at a random moment after it has saved at least once."""
    from dsgpt.runs import read_pointer
    ckpt = run_dir / "checkpoints"
    before = read_pointer(ckpt) if (ckpt / "latest").exists() else None
    proc = launcher(ranks, run_dir, zero, max_steps=10**6)
    # Wait until this launch has saved (latest moved), then a random 0-3 s more.
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and read_pointer(ckpt) in (None, before):
        time.sleep(0.05)
    if proc.poll() is not None:
        return {"error": "the launch ended before it saved", "log": proc.stdout.read()[-3000:], "resumed": False}
    started_from = before
    # Let it run a random while, then catch a save under way and strike a random moment into it.
    time.sleep(rnd.uniform(0.0, 2.0))
    catch_by = time.time() + 30
    while time.time() < catch_by and not in_save(ckpt) and proc.poll() is None:
        time.sleep(0.001)
    time.sleep(rnd.uniform(0.0, 0.1))
    victims = rank_pids(proc)
    saving = in_save(ckpt)
    os.kill(rnd.choice(victims), signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log = proc.stdout.read()
    fell_back = "resuming from the newest intact checkpoint" in log
    return {"started_from": started_from, "killed_in_save": saving, "fell_back": fell_back, "resumed": True,
            "latest_after": read_pointer(ckpt), "log": log[-2000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    rnd = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="crash-saves-") as tmp:
        run_dir = Path(tmp) / "runs" / "crash"
        results = []
        for i in range(args.trials + 1):  # the last launch only has to resume; it is killed like the rest
            r = trial(args.ranks, run_dir, args.zero, rnd)
            results.append(r)
            if "error" in r and i > 0:
                print(f"trial {i}: relaunch FAILED: {r['error']}\n{r['log']}")
            else:
                print(f"trial {i}: resumed from {r.get('started_from') or 'scratch'}"
                      f"{' (fell back past a damaged checkpoint)' if r.get('fell_back') else ''}; killed "
                      f"{'inside a save' if r.get('killed_in_save') else 'between saves'}; latest now "
                      f"{r.get('latest_after')}", flush=True)
        relaunches = results[1:]  # each one follows a kill
        kills = results[:-1]
        summary = {
            "kills": len(kills),
            "inside a save": sum(bool(r.get("killed_in_save")) for r in kills),
            "resumed from latest": sum("error" not in r and not r["fell_back"] for r in relaunches),
            "resumed from an older intact one": sum("error" not in r and r["fell_back"] for r in relaunches),
            "failed": sum("error" in r for r in relaunches),
        }
    print(json.dumps(summary))
    if not args.no_record:
        import platform
        cells = common.context_cells()
        common.append_row(SECTION, COLUMNS, [cells[0], cells[1], str(args.ranks), str(args.zero),
                                             *(str(v) for v in summary.values()), cells[2]])
        print(f"appended to {common.RESULTS} ({platform.node()})")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
