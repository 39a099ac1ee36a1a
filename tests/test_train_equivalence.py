"""Equivalences that must hold however the work is split: ZeRO stages, gradient accumulation,
data-parallel ranks, precision. Real DeepSpeed engines, 2 CPU ranks over gloo."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PY, child_env, launch, losses, run_jobs, tiny_overrides

STAGES = (0, 1, 2, 3)


def rel_close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def build_cpu_adam() -> None:
    """JIT-build DeepSpeed's CPU Adam in one process before the ranks need it. Built inside a
    2-rank launch, one rank compiles while the other busy-waits in a collective on the same 2
    cores, and a one-minute build took over fifteen."""
    code = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
    proc = subprocess.run([PY, "-c", code], env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_rank(corpus, tmp_path_factory):
    """One launch of 2 ranks that trains every configuration this module compares."""
    build_cpu_adam()
    work = tmp_path_factory.mktemp("two-rank")
    out = work / "runs"
    jobs = [{"name": f"fp32_z{z}", "config": None,
             "overrides": tiny_overrides(corpus, out, f"fp32_z{z}", f"deepspeed.zero_stage={z}")}
            for z in STAGES]
    # Tiny shapes for bf16: its matmuls are emulated on CPU and slow.
    bf16 = ("precision=bf16", "model.n_embd=32", "model.block_size=16", "train.micro_batch_size=2",
            "train.max_steps=3", "train.eval_interval=3")
    jobs += [{"name": f"bf16_z{z}", "config": None,
              "overrides": tiny_overrides(corpus, out, f"bf16_z{z}", f"deepspeed.zero_stage={z}", *bf16)}
             for z in STAGES]
    jobs.append({"name": "offload_z2", "config": None, "overrides": tiny_overrides(
        corpus, out, "offload_z2", "deepspeed.config=ds_configs/zero2_offload.json", "deepspeed.zero_stage=2",
        "train.max_steps=3")})
    jobs.append({"name": "dp2_micro4", "config": None, "overrides": tiny_overrides(
        corpus, out, "dp2_micro4", "train.micro_batch_size=4")})
    return run_jobs(jobs, ranks=2, work=work)


@pytest.fixture(scope="module")
def one_rank(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("one-rank")
    out = work / "runs"
    jobs = [
        {"name": "micro8_gas1", "config": None,
         "overrides": tiny_overrides(corpus, out, "micro8_gas1", "train.micro_batch_size=8")},
        {"name": "micro4_gas2", "config": None,
         "overrides": tiny_overrides(corpus, out, "micro4_gas2", "train.micro_batch_size=4",
                                     "train.grad_accum_steps=2")},
    ]
    return run_jobs(jobs, ranks=1, work=work)


def test_zero_stages_give_the_same_losses(two_rank):
    reference = losses(two_rank["fp32_z0"][0])
    assert len(reference) == 10 and reference[-1] < reference[0]
    for z in STAGES:
        for rank_summary in two_rank[f"fp32_z{z}"]:
            facts = rank_summary["engine"]
            assert facts["zero_stage"] == z and facts["param_dtype"] == "float32"
            assert facts["world_size"] == 2 and facts["train_batch_size"] == 8
            assert rel_close(losses(rank_summary), reference, 1e-5), (z, losses(rank_summary), reference)


def test_optimizer_state_is_partitioned_from_zero1(two_rank):
    full = two_rank["fp32_z0"][0]["engine"]["optimizer_state_bytes"]
    assert full > 0
    for z in (1, 2, 3):
        for rank_summary in two_rank[f"fp32_z{z}"]:
            share = rank_summary["engine"]["optimizer_state_bytes"] / full
            assert 0.4 <= share <= 0.6, (z, share)


def test_bf16_trains_under_every_stage(two_rank):
    for z in STAGES:
        for rank_summary in two_rank[f"bf16_z{z}"]:
            facts = rank_summary["engine"]
            assert facts["bf16"] and facts["param_dtype"] == "bfloat16" and facts["zero_stage"] == z
            steps = losses(rank_summary)
            assert len(steps) == 3 and all(0 < v < 20 for v in steps)


def test_zero2_offload_uses_cpu_adam(two_rank):
    for rank_summary in two_rank["offload_z2"]:
        facts = rank_summary["engine"]
        assert facts["offload_optimizer"] and facts["optimizer"] == "DeepSpeedCPUAdam"
        assert facts["zero_stage"] == 2 and len(losses(rank_summary)) == 3


def test_gradient_accumulation_matches_a_bigger_micro_batch(one_rank):
    a, b = losses(one_rank["micro8_gas1"][0]), losses(one_rank["micro4_gas2"][0])
    assert one_rank["micro4_gas2"][0]["engine"]["gradient_accumulation_steps"] == 2
    assert rel_close(a, b, 1e-5), (a, b)


def test_two_ranks_match_one_rank_with_the_whole_batch(one_rank, two_rank):
    a, b = losses(one_rank["micro8_gas1"][0]), losses(two_rank["dp2_micro4"][0])
    assert rel_close(a, b, 1e-5), (a, b)


def test_masked_uneven_labels_weigh_every_token_the_same(tmp_path):
    out = tmp_path / "masked.json"
    launch("tests/workers/masked_gas.py", [str(out)])
    result = json.loads(out.read_text())
    assert rel_close(result["m2g2"]["losses"], result["m4g1"]["losses"], 1e-5), result
    assert rel_close(result["m2g2"]["weights_head"], result["m4g1"]["weights_head"], 1e-4)
