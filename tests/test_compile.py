"""`model.compile: true` (DeepSpeed's engine.compile: torch.compile of the model in place, inductor)
trains as the eager model does, under ZeRO 1 and under ZeRO-3, whose parameter hooks split the
graph at each layer, and with bf16-mixed's autocast under ZeRO 0, with the loss whole and in chunks
(an autograd.Function that makes its gradients in forward). 2 CPU ranks over gloo."""

from __future__ import annotations

import pytest

from conftest import losses, run_jobs, tiny_overrides


def rel_close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(abs(x), abs(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("compile")
    jobs = [{"name": f"{kind}_{case}", "overrides": tiny_overrides(
        corpus, work / "runs", f"{kind}_{case}", "train.max_steps=6", "train.eval_interval=6",
        f"deepspeed.zero_stage={CASES[case][0]}", f"precision={CASES[case][1]}", *CASES[case][2:],
        *(["model.compile=true"] if kind == "compiled" else []))} for case in CASES for kind in ("eager", "compiled")]
    return run_jobs(jobs, ranks=2, work=work / "jobs")


# name: (ZeRO stage, precision, overrides...)
CASES = {"z1": (1, "fp32"), "z3": (3, "fp32"), "mixed_z0": (0, "bf16-mixed"),
         "mixed_z0_chunked_loss": (0, "bf16-mixed", "model.loss_chunk_tokens=40")}


@pytest.mark.parametrize("case", CASES)
def test_compiled_model_trains_like_the_eager_one(runs, case):
    stage = CASES[case][0]
    compiled, eager = runs[f"compiled_{case}"][0], runs[f"eager_{case}"][0]
    assert "error" not in compiled, compiled
    assert compiled["engine"]["zero_stage"] == stage
    assert compiled["engine"]["compiled"] and not eager["engine"]["compiled"]
    assert rel_close(losses(compiled), losses(eager), 1e-4), (losses(compiled), losses(eager))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
