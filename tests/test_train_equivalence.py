"""Equivalences that must hold however the work is split: ZeRO stages, gradient accumulation,
data-parallel ranks, precision. Real DeepSpeed engines, 2 CPU ranks over gloo.

Losses alone cannot catch a gradient off by a constant factor (x world size, x GAS): AdamW
normalises it away. So every equivalence also compares the gradient norms, and a deliberately
mis-scaled run proves that comparison fails when it should."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PY, child_env, grad_norms, launch, losses, run_jobs, tiny_overrides

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
    # fp32 weights, the forward under bf16 autocast: the fp32 runs' shape, so their losses compare.
    jobs += [{"name": f"mixed_z{z}", "config": None,
              "overrides": tiny_overrides(corpus, out, f"mixed_z{z}", f"deepspeed.zero_stage={z}", "precision=bf16-mixed")}
             for z in STAGES]
    jobs.append({"name": "offload_z2", "config": None, "overrides": tiny_overrides(
        corpus, out, "offload_z2", "deepspeed.config=ds_configs/zero2_offload.json", "deepspeed.zero_stage=2",
        "train.max_steps=3")})
    jobs.append({"name": "dp2_micro4", "config": None, "overrides": tiny_overrides(
        corpus, out, "dp2_micro4", "train.micro_batch_size=4")})
    # The loss over 24 tokens' logits at a time (uneven chunks of a 128-token micro-batch).
    jobs += [{"name": f"chunked_z{z}", "config": None, "overrides": tiny_overrides(
        corpus, out, f"chunked_z{z}", f"deepspeed.zero_stage={z}", "model.loss_chunk_tokens=24")} for z in (0, 3)]
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
        # The mutation: micro8_gas1 with every gradient doubled and the loss left alone.
        {"name": "micro8_grad_x2", "config": None, "grad_scale": 2.0,
         "overrides": tiny_overrides(corpus, out, "micro8_grad_x2", "train.micro_batch_size=8")},
        # micro8_gas1 with dropout: the training losses must differ from the first step on.
        {"name": "micro8_dropout", "config": None,
         "overrides": tiny_overrides(corpus, out, "micro8_dropout", "train.micro_batch_size=8", "model.dropout=0.2")},
    ]
    return run_jobs(jobs, ranks=1, work=work)


def same_training(a: dict, b: dict, tol: float = 1e-5) -> bool:
    """The same losses and the same gradient norms (before clipping) at every step."""
    return rel_close(losses(a), losses(b), tol) and rel_close(grad_norms(a), grad_norms(b), tol)


def test_zero_stages_give_the_same_losses_and_gradients(two_rank):
    reference = two_rank["fp32_z0"][0]
    assert len(losses(reference)) == 10 and losses(reference)[-1] < losses(reference)[0]
    assert len(grad_norms(reference)) == 10 and all(g > 0 for g in grad_norms(reference))
    for z in STAGES:
        for rank_summary in two_rank[f"fp32_z{z}"]:
            facts = rank_summary["engine"]
            assert facts["zero_stage"] == z and facts["param_dtype"] == "float32"
            assert facts["world_size"] == 2 and facts["train_batch_size"] == 8
            assert same_training(rank_summary, reference), (z, grad_norms(rank_summary), grad_norms(reference))


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


def test_bf16_mixed_keeps_fp32_weights_and_trains_like_fp32_under_every_stage(two_rank):
    fp32 = two_rank["fp32_z0"][0]
    mixed = two_rank["mixed_z0"][0]
    assert losses(mixed) != losses(fp32)  # the autocast really ran: bf16 matmuls round differently
    for z in STAGES:
        for rank_summary in two_rank[f"mixed_z{z}"]:
            facts = rank_summary["engine"]
            assert facts["zero_stage"] == z and facts["param_dtype"] == "float32", facts
            assert facts["autocast"] == "bfloat16" and not facts["bf16"] and not facts["fp16"]
            if z == 0:  # DeepSpeed hands the raw optimizer the fp32 gradients: dsgpt's own clip and skip
                assert facts["optimizer"] == "GuardedAdamW" and facts["wrapper"] == "GuardedAdamW"
            # bf16's 8-bit mantissa in the matmuls: within 2% of fp32 over 10 steps; the stages agree closer.
            assert rel_close(losses(rank_summary), losses(fp32), 2e-2), (z, losses(rank_summary), losses(fp32))
            assert rel_close(losses(rank_summary), losses(mixed), 2e-3), (z, losses(rank_summary), losses(mixed))
            assert rel_close(grad_norms(rank_summary), grad_norms(fp32), 5e-2), z


def test_zero2_offload_uses_cpu_adam(two_rank):
    for rank_summary in two_rank["offload_z2"]:
        facts = rank_summary["engine"]
        assert facts["offload_optimizer"] and facts["optimizer"] == "DeepSpeedCPUAdam"
        assert facts["zero_stage"] == 2 and len(losses(rank_summary)) == 3


def test_gradient_accumulation_matches_a_bigger_micro_batch(one_rank):
    a, b = one_rank["micro8_gas1"][0], one_rank["micro4_gas2"][0]
    assert b["engine"]["gradient_accumulation_steps"] == 2
    assert same_training(a, b), (grad_norms(a), grad_norms(b))


def test_two_ranks_match_one_rank_with_the_whole_batch(one_rank, two_rank):
    a, b = one_rank["micro8_gas1"][0], two_rank["dp2_micro4"][0]
    assert same_training(a, b), (grad_norms(a), grad_norms(b))


def test_a_gradient_off_by_a_constant_factor_is_caught(one_rank):
    right, wrong = one_rank["micro8_gas1"][0], one_rank["micro8_grad_x2"][0]
    assert losses(wrong)[0] == losses(right)[0]  # the bug does not show in the first loss
    assert grad_norms(wrong)[0] == pytest.approx(2 * grad_norms(right)[0], rel=1e-5)
    assert not same_training(wrong, right)


def test_dropout_is_active(one_rank):
    # Same seed, same batches: without dropout the two runs agree to rounding (1e-5, as above).
    plain, dropped = one_rank["micro8_gas1"][0], one_rank["micro8_dropout"][0]
    assert losses(dropped)[0] != losses(plain)[0]  # masks applied in the very first forward
    assert max(abs(a - b) / b for a, b in zip(losses(dropped), losses(plain))) > 1e-3


def test_masked_uneven_labels_weigh_every_token_the_same(tmp_path):
    out = tmp_path / "masked.json"
    launch("tests/workers/masked_gas.py", [str(out)])
    result = json.loads(out.read_text())
    assert rel_close(result["m2g2"]["losses"], result["m4g1"]["losses"], 1e-5), result
    assert rel_close(result["m2g2"]["weights_head"], result["m4g1"]["weights_head"], 1e-4)


@pytest.mark.parametrize("stage", [0, 3])
def test_chunked_loss_trains_the_same(two_rank, stage):
    """Under ZeRO-3 the output layer is gathered for every chunk and again in backward."""
    chunked, whole = two_rank[f"chunked_z{stage}"][0], two_rank[f"fp32_z{stage}"][0]
    assert chunked["engine"]["zero_stage"] == stage
    assert same_training(chunked, whole, tol=1e-5), (losses(chunked), losses(whole))
