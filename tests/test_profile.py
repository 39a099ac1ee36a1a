"""`train.profile: true` writes a Chrome/Perfetto trace of the profiled steps into the run dir."""

from __future__ import annotations

import json

from conftest import run_jobs, tiny_overrides


def test_profile_writes_a_trace_of_the_profiled_steps(corpus, tmp_path):
    out = tmp_path / "runs"
    jobs = [{"name": "prof", "overrides": tiny_overrides(corpus, out, "prof", "train.profile=true",
                                                         "train.max_steps=6", "train.eval_interval=100")},
            {"name": "short", "overrides": tiny_overrides(corpus, out, "short", "train.profile=true",
                                                          "train.max_steps=3", "train.eval_interval=100")}]
    results = run_jobs(jobs, ranks=1, work=tmp_path / "jobs")
    assert "error" not in results["prof"][0]
    trace = json.loads((out / "prof" / "profile" / "rank00000.trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"], steps  # after a wait and a warm-up step
    assert any("addmm" in n or "matmul" in n or "mm" == n.split("::")[-1] for n in names)  # the model's own ops
    # A run that ends inside the profiled steps still leaves what it recorded, and no temp file.
    short = out / "short" / "profile"
    assert (short / "rank00000.trace.json").is_file() and not list(short.glob("*.tmp"))
    assert not (out / "prof" / "profile" / "rank00000.trace.tmp").exists()
    # The table of the ops that took the most time, beside the trace.
    top = (out / "prof" / "profile" / "rank00000.top_ops.txt").read_text()
    assert top.startswith("ops of the profiled steps by self_cpu_time_total") and "Self CPU" in top
    assert "aten::" in top
