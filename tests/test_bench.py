"""The benchmarks' results file: each benchmark appends to its own table, whatever order they run in."""

from __future__ import annotations

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


def test_throughput_bench_times_the_real_trainer(capsys, monkeypatch):
    from bench import throughput
    from conftest import REPO
    monkeypatch.setenv("DSGPT_CACHE", str(REPO / ".cache" / "dsgpt"))  # the built-in corpus the other tests prepare
    assert throughput.main(["--config", "configs/tiny.yaml", "--steps", "2", "--warmup", "1", "--no-record",
                            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "--matrix", "ac=off,on"]) == 0
    out = capsys.readouterr().out
    assert out.count("tokens/s") == 2 and "ac=on" in out and "MFU" in out
