"""The benchmarks' results file: each benchmark appends to its own table, whatever order they run in."""

from __future__ import annotations

import functools
import re

import pytest

from bench.common import append_row


def table_rows(text: str, section: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"## {section}") + 1
    rows = []
    for line in lines[start:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| date"):
            rows.append(line)
    return rows


def test_rows_go_to_their_own_table(tmp_path):
    path = tmp_path / "RESULTS.md"
    append_row("A", ["date", "x"], ["d1", "a1"], path)
    append_row("B", ["date", "y", "z"], ["d1", "b1", "b1z"], path)
    append_row("A", ["date", "x"], ["d2", "a2"], path)  # A is no longer the last section
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert table_rows(text, "A") == ["| d1 | a1 |", "| d2 | a2 |"]
    assert table_rows(text, "B") == ["| d1 | b1 | b1z |"]
    assert text.count("| date | x |") == 1 and text.count("|---|---|---|") == 1
    assert not list(tmp_path.glob("*.tmp")) and "\n\n\n" not in text


def test_the_shipped_results_file_has_one_table_per_section():
    from bench.common import RESULTS
    text = RESULTS.read_text()
    for line in text.splitlines():
        if line.startswith("## "):
            assert table_rows(text, line[3:]), line


def test_peers_bench_runs_every_side_on_a_tiny_shape(capsys, monkeypatch):
    """A smoke run: the real trainer, the HF Trainer + DeepSpeed on 2 ranks, the plain loop and DDP each
    time their steps and the ratios come out (speed itself is for the benchmark, not a test)."""
    from bench import peers
    from conftest import REPO
    monkeypatch.setenv("DSGPT_CACHE", str(REPO / ".cache" / "dsgpt"))  # the built-in corpus the other tests prepare
    assert peers.main(["--pairs", "1", "--steps", "2", "--warmup", "1", "--no-record", "model.n_layer=1",
                       "model.n_embd=32", "model.n_head=2", "model.block_size=32"]) == 0
    out = capsys.readouterr().out
    assert "dsgpt vs HF Trainer + DeepSpeed" in out and "dsgpt (ZeRO 0) vs a plain PyTorch loop" in out
    assert "dsgpt (ZeRO 0) vs a plain DDP loop over gloo" in out
    assert out.count("ratio ") == 6


def test_peers_bench_in_bf16(capsys, monkeypatch):
    """bf16: DeepSpeed's bf16 on dsgpt's and the HF Trainer's side, autocast in the plain loop."""
    from bench import peers
    from conftest import REPO
    monkeypatch.setenv("DSGPT_CACHE", str(REPO / ".cache" / "dsgpt"))
    assert peers.main(["--pairs", "1", "--steps", "2", "--warmup", "1", "--no-record", "--precision", "bf16",
                       "--peers", "hf,plain", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                       "model.block_size=32"]) == 0
    out = capsys.readouterr().out
    assert "micro 8/rank, bf16" in out and "bf16=True" in out and "fp32 weights under bf16 autocast" in out
    assert out.count("ratio ") == 4


def test_throughput_matrix_cells():
    from bench.throughput import cell_overrides, parse_matrix
    cells = parse_matrix(["zero=0,3", "offload=off,on", "micro=4"])
    assert len(cells) == 4 and cells[0] == {"zero": "0", "offload": "off", "micro": "4"}
    assert cell_overrides({"zero": "0", "offload": "on"}) is None  # offload needs ZeRO >= 1
    overrides, label = cell_overrides({"zero": "3", "offload": "on", "ac": "on", "micro": "4"})
    assert overrides == ["deepspeed.config=ds_configs/zero3_offload.json", "deepspeed.zero_stage=3",
                         "model.activation_checkpointing=true", "train.micro_batch_size=4"]
    assert label == "zero=3 offload=on ac=on micro=4"
    assert parse_matrix([]) == [{}]


def test_throughput_scaling_axes():
    from bench.throughput import cell_overrides, parse_matrix
    cells = parse_matrix(["block=256,2048", "width=128,512"])
    assert len(cells) == 4
    overrides, label = cell_overrides({"block": "2048", "width": "512"})
    assert overrides == ["model.block_size=2048", "model.n_embd=512", "model.n_head=8"]
    assert label == "block=2048 width=512"
    with pytest.raises(SystemExit, match="multiples of 64"):
        parse_matrix(["width=100"])
    with pytest.raises(SystemExit, match="integers"):
        parse_matrix(["block=big"])


def test_throughput_bench_times_the_real_trainer(capsys, monkeypatch):
    from bench import throughput
    from conftest import REPO
    monkeypatch.setenv("DSGPT_CACHE", str(REPO / ".cache" / "dsgpt"))  # the built-in corpus the other tests prepare
    assert throughput.main(["--config", "configs/tiny.yaml", "--steps", "2", "--warmup", "1", "--log-interval", "2",
                            "--no-record", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                            "--matrix", "ac=off,on"]) == 0
    out = capsys.readouterr().out
    assert out.count("tokens/s") == 2 and "ac=on" in out and "MFU" in out


def test_sync_count_names_the_phase_and_both_call_sites():
    import traceback
    from pathlib import Path

    import deepspeed

    from bench.sync_count import REPO, call_site
    ds_engine = str(Path(deepspeed.__file__).parent / "runtime" / "engine.py")
    frame = traceback.FrameSummary
    stack = [frame(str(REPO / "dsgpt" / "train" / "trainer.py"), 80, "train", lookup_line=False),
             frame(str(REPO / "dsgpt" / "train" / "trainer.py"), 240, "train_step", lookup_line=False),
             frame(str(REPO / "dsgpt" / "train" / "step.py"), 45, "train_step", lookup_line=False),
             frame(ds_engine, 2100, "step", lookup_line=False)]
    assert call_site(stack) == ("step", "dsgpt/train/step.py:45 train_step", "deepspeed/runtime/engine.py:2100 step")
    stop = [stack[0], frame(str(REPO / "dsgpt" / "train" / "trainer.py"), 300, "stop_reason", lookup_line=False),
            frame(str(REPO / "dsgpt" / "dist.py"), 90, "all_reduce_max", lookup_line=False)]
    assert call_site(stop) == ("stop check", "dsgpt/dist.py:90 all_reduce_max", "-")


def test_sync_counter_counts_sync_warnings_and_passes_the_rest_on():
    import warnings

    from bench.sync_count import SYNC_WARNING, SyncCounter
    before = warnings.showwarning
    with pytest.warns(UserWarning, match="something else"):
        with SyncCounter() as counter:
            for _ in range(3):
                warnings.warn(f"Module: {SYNC_WARNING}", UserWarning)  # torch's wording, from one place
            warnings.warn("something else", UserWarning)
    assert sum(counter.counts.values()) == 3 and len(counter.counts) == 1
    assert warnings.showwarning is before


def test_sync_count_says_it_needs_a_gpu(monkeypatch, capsys):
    import torch

    from bench import sync_count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sync_count.main(["--config", "configs/gpt2-124m.yaml"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_matmul_peak_measures_each_mode(capsys):
    from bench import matmul_peak
    assert matmul_peak.main(["--n", "64", "--repeats", "2", "--modes", "fp32,tf32", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "fp32: " in out and "tf32: " in out and "TFLOP/s at n=64" in out
    assert matmul_peak.measure("fp32", 32, 1, on_gpu=False) > 0


def test_matmul_peak_refuses_an_unknown_mode(capsys):
    from bench import matmul_peak
    assert matmul_peak.main(["--modes", "fp8", "--no-record"]) == 2
    assert "--modes takes bf16, fp16, tf32, fp32 (got fp8)" in capsys.readouterr().err


def test_loss_chunks_bench_times_and_measures_each_variant(capsys):
    """A smoke run on a tiny shape: the whole loss, the chunks as dsgpt makes them and the same
    chunks recomputed, each with its time and a peak the profiler measured (nonzero)."""
    from bench import loss_chunks
    assert loss_chunks.main(["--preset", "tiny", "--block", "64", "--micro", "2", "--chunks", "48",
                             "--repeats", "1", "--no-record"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:30].strip(): line for line in lines[1:]}
    assert list(rows) == ["whole", "chunks of 48", "chunks of 48, recomputed"], lines
    for line in rows.values():
        peak = re.search(r"\d ms .* tokens/s  peak ([\d,.]+) MB$", line)
        assert peak and float(peak.group(1).replace(",", "")) > 0, line
    assert loss_chunks.main(["--chunks", "0", "--no-record"]) == 2
    assert "--chunks takes positive token counts" in capsys.readouterr().err
    assert loss_chunks.main(["--preset", "gpt2-2b", "--no-record"]) == 2
    assert "unknown --preset 'gpt2-2b': one of tiny, gpt2-124m" in capsys.readouterr().err


def test_mfu_cell_adds_the_share_of_the_measured_matmul_rate():
    from bench.throughput import mfu_cell
    assert mfu_cell(None, None) == "n/a"
    assert mfu_cell(0.25, None) == "25.0%"
    assert mfu_cell(0.25, (1000e12, 800e12)) == "25.0% (31.2% of measured)"


def test_gpu_suite_names_real_scripts_and_configs_that_load():
    """The GPU suite runs only where a GPU is lent: here its commands are checked to name scripts that
    exist and configs whose overrides load, so a typo does not wait for a GPU to show."""
    import re
    import shlex
    import subprocess

    from conftest import REPO
    from dsgpt.config import load_config
    from bench import throughput
    text = (REPO / "bench" / "gpu_suite.sh").read_text()
    data = shlex.split(re.search(r'^DATA="(.*)"$', text, re.M).group(1))
    text = text.replace("$TIMED", re.search(r'^TIMED="(.*)"$', text, re.M).group(1))
    commands = [shlex.split(c) for c in re.findall(r"^\s+\$PY ((?:bench|launch)/\S+\.py.*)$", text.replace("\\\n", " "), re.M)]
    assert len(commands) >= 6
    for cmd in commands:
        assert (REPO / cmd[0]).is_file(), cmd[0]
        if cmd[0] == "bench/throughput.py":
            throughput.parser().parse_args(cmd[1:])  # its flags, spelled right
        args = cmd[1:cmd.index("--matrix")] if "--matrix" in cmd else cmd[1:]  # matrix axes are not keys
        if "--config" in args:
            # host_ops.py's --variant "K=V K=V": each variant loads on top of the shared overrides.
            variants = [shlex.split(args[i + 1]) for i, a in enumerate(args) if a == "--variant"]
            args = [a for i, a in enumerate(args) if a != "--variant" and (i == 0 or args[i - 1] != "--variant")]
            args = [a for a in args if a != "$DATA"] + (data if "$DATA" in args else [])
            overrides = [a for a in args if "=" in a and not a.startswith("--")]
            for variant in variants or [[]]:
                load_config(str(REPO / args[args.index("--config") + 1]), overrides + variant)
    usage = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: bash bench/gpu_suite.sh smoke|bench|peers|mixed" in usage.stderr


def test_zero_memory_bench_runs_each_stage_on_a_tiny_shape(capsys):
    """A smoke run: one 2-rank launch per stage reports the bytes each rank holds; overrides may
    follow --stages."""
    from bench import zero_memory
    assert zero_memory.main(["--config", "configs/tiny.yaml", "--ranks", "2", "--steps", "1", "--no-record",
                             "--stages", "0", "3", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1] in "0123"]
    assert [r[0] for r in rows] == ["0", "3"]
    params = {r[0]: float(r[1]) for r in rows}
    # ZeRO-3 shards the weights (small ones stay whole on every rank: its persistence threshold)
    assert params["0"] / 2 <= params["3"] < params["0"]
    with pytest.raises(SystemExit):
        zero_memory.main(["--config", "configs/tiny.yaml", "--stages", "4"])


def test_generate_bench_runs_on_a_tiny_shape(capsys):
    from bench import generate
    assert generate.main(["--shapes", "tiny", "--batches", "1", "--new-tokens", "4", "--vocab", "256",
                          "--threads", "1", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "dsgpt, KV cache" in out and "transformers generate" in out


def test_crash_saves_bench_resumes_after_a_kill(capsys, monkeypatch):
    from bench import crash_saves
    from conftest import REPO
    monkeypatch.setenv("DSGPT_CACHE", str(REPO / ".cache" / "dsgpt"))  # the built-in corpus the other tests prepare
    assert crash_saves.main(["--trials", "1", "--no-record"]) == 0
    assert '"kills": 1' in capsys.readouterr().out


def test_host_ops_bench_counts_each_phase_of_a_step(capsys, tmp_path, monkeypatch):
    """A smoke run of two variants on a tiny shape: every phase dispatches operations, and DeepSpeed's
    bf16 ZeRO-1 optimizer (per-parameter gradient hooks and overflow checks) dispatches more than the
    fp32-weight ZeRO-0 path, whatever the machine."""
    from bench import common, host_ops
    monkeypatch.setattr(common, "append_row", functools.partial(common.append_row, path=tmp_path / "RESULTS.md"))
    assert host_ops.main(["--config", "configs/tiny.yaml", "--steps", "1", "--warmup", "1",
                          "--variant", "precision=bf16 deepspeed.zero_stage=1",
                          "--variant", "precision=bf16-mixed deepspeed.zero_stage=0",
                          "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16"]) == 0
    out = capsys.readouterr().out
    totals = [int(x.replace(",", "")) for x in re.findall(r": ([\d,]+) ops per step", out)]
    assert len(totals) == 2 and totals[0] > totals[1] > 0, out
    rows = table_rows((tmp_path / "RESULTS.md").read_text(), host_ops.SECTION)
    assert len(rows) == 2 and "precision=bf16-mixed deepspeed.zero_stage=0" in rows[1]


def test_host_ops_bench_refuses_compile():
    from bench import host_ops
    with pytest.raises(SystemExit, match="torch.compile"):
        host_ops.main(["--config", "configs/tiny.yaml", "--steps", "1", "--warmup", "0", "model.compile=true",
                       "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16"])


def test_peers_bench_in_bf16_mixed_against_the_plain_loop(capsys, monkeypatch):
    """bf16-mixed: dsgpt in the plain loop's own recipe (fp32 weights under autocast); no HF side."""
    from bench import peers
    from conftest import REPO
    monkeypatch.setenv("DSGPT_CACHE", str(REPO / ".cache" / "dsgpt"))
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32"]
    assert peers.main(["--pairs", "1", "--steps", "2", "--warmup", "1", "--no-record", "--precision", "bf16-mixed",
                       "--peers", "plain", *tiny]) == 0
    out = capsys.readouterr().out
    assert "micro 8/rank, bf16-mixed" in out and "fp32 weights under bf16 autocast" in out and out.count("ratio ") == 2
    assert peers.main(["--precision", "bf16-mixed", "--no-record", *tiny]) == 2  # the default peers include hf
    assert "--peers plain,ddp" in capsys.readouterr().err
