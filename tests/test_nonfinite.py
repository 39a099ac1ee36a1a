"""A run driven to NaN (an absurd learning rate) skips or stops as configured, all ranks agree,
and `latest` still names a checkpoint with finite weights."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_jobs, tiny_overrides
from dsgpt.runs import load_model, read_pointer


@pytest.fixture(scope="module")
def blown_up(corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("nonfinite")
    out = work / "runs"
    common = ("optim.lr=1e30", "optim.warmup_steps=0", "optim.schedule=constant", "train.max_steps=8",
              "train.save_interval=1", "train.eval_interval=100", "train.max_nonfinite_steps=3")
    jobs = [
        # ZeRO 1: DeepSpeed's optimizer detects the non-finite gradient norm and skips the update.
        {"name": "skip_z1", "overrides": tiny_overrides(corpus, out, "skip_z1", *common, "deepspeed.zero_stage=1",
                                                        "train.on_nonfinite=skip")},
        # ZeRO 0 in fp32: dsgpt's own guarded AdamW does the same.
        {"name": "stop_z0", "overrides": tiny_overrides(corpus, out, "stop_z0", *common, "deepspeed.zero_stage=0",
                                                        "train.on_nonfinite=stop")},
        # ZeRO 0 again, but read back only at log steps: GuardedAdamW skips on the device at once,
        # the run learns of it (and gives up) at the next read-back.
        {"name": "late_z0", "overrides": tiny_overrides(corpus, out, "late_z0", *common, "deepspeed.zero_stage=0",
                                                        "train.on_nonfinite=skip", "train.save_interval=100",
                                                        "train.log_interval=4")},
        # A healthy ZeRO 0 run: its steps read nothing back; the trainer reads them at log steps.
        {"name": "reads_z0", "count_reads": True,
         "overrides": tiny_overrides(corpus, out, "reads_z0", "train.log_interval=5", "train.eval_interval=100",
                                     "train.sample_interval=0")},
    ]
    return run_jobs(jobs, ranks=2, work=work), out


def check_latest_is_finite(run_dir):
    tag = read_pointer(run_dir / "checkpoints")
    model, _, loaded = load_model(run_dir)
    assert loaded == tag
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return int(tag.removeprefix("step"))


def test_skip_mode_skips_then_gives_up(blown_up):
    results, out = blown_up
    for summary in results["skip_z1"]:  # both ranks tell the same story
        assert summary["stop_reason"] == "nonfinite"
        assert list(summary["losses"]) == ["1"]  # only step 1 had a finite loss
        assert summary["last_step"] == 5  # steps 2-4 skipped (3 allowed in a row), step 5 gave up
    logged = [json.loads(x) for x in (out / "skip_z1" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if e.get("train/skipped")] == [2, 3, 4, 5]
    # Skipped steps left the weights alone, so the checkpoints written while skipping hold
    # the finite weights of step 1; the last one written is `latest`.
    assert check_latest_is_finite(out / "skip_z1") == 4


def test_stop_mode_stops_at_the_first_nonfinite_step(blown_up):
    results, out = blown_up
    for summary in results["stop_z0"]:
        assert summary["stop_reason"] == "nonfinite" and summary["last_step"] == 2
        assert summary["engine"]["optimizer"] == "GuardedAdamW"
    assert check_latest_is_finite(out / "stop_z0") == 1


def test_a_device_side_skip_is_read_back_at_the_next_log_step(blown_up):
    results, out = blown_up
    for summary in results["late_z0"]:
        assert summary["stop_reason"] == "nonfinite"
        assert list(summary["losses"]) == ["1"]
        # Steps 2-5 skipped on the device (the 4th in a row is one too many), read back at step 4
        # and at step 8, the next log step, where the run stops.
        assert summary["last_step"] == 8
    logged = [json.loads(x) for x in (out / "late_z0" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if e.get("train/skipped")] == [2, 3, 4, 5, 6, 7, 8]
    assert not (out / "late_z0" / "checkpoints").exists() or not list((out / "late_z0" / "checkpoints").iterdir())


def test_steps_read_nothing_back_until_a_log_step(blown_up):
    """On a GPU every read of a device value waits for the device; a step makes none, and the
    trainer reads the dispatched steps back together at log steps (and at the last step)."""
    results, _ = blown_up
    for summary in results["reads_z0"]:
        assert summary["stop_reason"] == "max_steps" and summary["engine"]["optimizer"] == "GuardedAdamW"
        assert summary["step_reads"] == {str(s): [] for s in range(1, 11)}
        assert summary["read_back_at"] == [5, 10]
        assert list(summary["losses"]) == [str(s) for s in range(1, 11)]  # every step's loss, read late
        assert list(summary["grad_norms"]) == ["5", "10"]
        # The per-step stop check agrees on host values over the gloo host group: on a GPU, the
        # default (NCCL) group would copy them to the device and read them back every step.
        assert summary["stop_collectives"] == ["host group, cpu"] * 10


def test_guarded_adamw_skips_on_the_device():
    """A non-finite gradient leaves weights, moments and step count alone, decided on the device;
    a finite one updates as torch's AdamW does."""
    from dsgpt.train.engine import GuardedAdamW
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    opt = GuardedAdamW(model.parameters(), clip=0.0, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(3, 8)

    def step(poison=False):
        for m, o in ((model, opt), (reference, ref_opt)):
            m(x).pow(2).sum().backward()
        if poison:
            model.weight.grad[0, 0] = float("nan")
        opt.step()
        if not poison:
            ref_opt.step()
        for o in (opt, ref_opt):
            o.zero_grad()

    step()
    assert opt.skipped.item() == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    step(poison=True)
    assert opt.skipped.item() == 1.0 and opt.overflow is False  # DeepSpeed reads no flag
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    assert opt.state[model.weight]["step"].item() == 1.0
    assert not torch.isfinite(opt._global_grad_norm)
    step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # the skip left no trace


def test_guarded_adamw_loads_a_state_saved_unfused():
    """A checkpoint of torch's unfused AdamW (how ZeRO-0 runs on CPU saved it before) loads, and the
    step after it can still skip on the device."""
    from dsgpt.train.engine import GuardedAdamW
    model = torch.nn.Linear(4, 2)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    plain.step()
    opt = GuardedAdamW(model.parameters(), clip=1.0, lr=1e-3)
    opt.load_state_dict(plain.state_dict())
    assert all(g["fused"] for g in opt.param_groups)
    model.weight.grad.fill_(float("inf"))
    opt.step()
    assert opt.skipped.item() == 1.0 and opt.state[model.weight]["step"].item() == 1.0


# ---- fp16: an overflow skip is routine, a non-finite loss is not --------------------------------

@pytest.mark.parametrize("loss,applied,precision,outcome", [
    (2.5, True, "fp16", "ok"),
    (2.5, False, "fp16", "overflow"),  # dynamic loss scaling skipped the update and lowered the scale
    (float("inf"), False, "fp16", "nonfinite"),
    (float("nan"), True, "fp16", "nonfinite"),
    (2.5, False, "bf16", "nonfinite"),  # no loss scaling: a skipped update means inf/NaN gradients
    (2.5, False, "fp32", "nonfinite"),
    (float("nan"), False, "fp32", "nonfinite"),
])
def test_step_outcome(loss, applied, precision, outcome):
    from dsgpt.train.step import step_outcome
    assert step_outcome(loss, applied, precision) == outcome


def test_overflow_skips_neither_stop_nor_count_as_nonfinite(monkeypatch):
    """Run.train_step's bookkeeping for an fp16 overflow, with the engine's answers scripted."""
    from types import SimpleNamespace

    from dsgpt.model import GPTConfig
    from dsgpt.train import step as step_module
    from dsgpt.train.step_metrics import StepMetrics
    from dsgpt.train import trainer
    from dsgpt.train.trainer import Run, RunState
    logged = []
    run = Run.__new__(Run)  # only the parts train_step touches
    run.cfg = SimpleNamespace(precision="fp16", tf32=False)
    run.t = SimpleNamespace(micro_batch_size=1, grad_accum_steps=1, log_interval=1000, max_steps=10,
                            on_nonfinite="stop", max_nonfinite_steps=0)
    run.cfg.train = run.t
    run.ctx = SimpleNamespace(rank=0, world_size=1, is_main=False, device_type="cpu")
    run.state, run.device = RunState(), "cpu"
    run.tokens_per_step, run.last_saved = 8, 0
    run.loader = SimpleNamespace(get=lambda step: None)
    run.engine = SimpleNamespace(get_lr=lambda: [1e-3], was_step_applied=lambda: False)
    run.log = SimpleNamespace(log=lambda step, scalars: logged.append((step, scalars)))
    run.metrics = StepMetrics(run.log, run.cfg, run.ctx, GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8,
                                                                    vocab_size=16), 8, 1, print)
    run.unread = step_module.UnreadSteps()
    monkeypatch.setattr(trainer, "dispatch_step", lambda *a: step_module.PendingStep(
        loss_sum=torch.tensor(24.0, dtype=torch.float64), tokens=8.0, skipped=None))
    for step in (1, 2):
        run.train_step(step)
        assert run.unread.due(busy=False)  # DeepSpeed skipped it on the host: read at once
        assert not run.settle(step)  # counts as done: no give-up
    assert run.state.skipped_steps == 0 and run.state.overflow_skips == 2
    assert logged == [(1, {"train/overflow_skips": 1}), (2, {"train/overflow_skips": 2})]
    assert run.metrics.losses == {1: 3.0, 2: 3.0}


def test_loss_scale_at_its_floor_is_a_clear_message(monkeypatch):
    from types import SimpleNamespace

    from dsgpt.errors import UserError
    from dsgpt.train import trainer
    from dsgpt.train.trainer import Run, RunState

    def overflowing(*args):
        raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")

    run = Run.__new__(Run)
    run.t = SimpleNamespace(micro_batch_size=1, grad_accum_steps=1)
    run.ctx = SimpleNamespace(rank=0, world_size=1)
    run.state, run.device, run.last_saved = RunState(), "cpu", 40
    run.loader = SimpleNamespace(get=lambda step: None)
    run.engine = SimpleNamespace(get_lr=lambda: [1e-3], optimizer=SimpleNamespace(min_loss_scale=1))
    monkeypatch.setattr(trainer, "dispatch_step", overflowing)
    with pytest.raises(UserError) as err:
        run.train_step(41)
    msg = str(err.value)
    assert "step 41" in msg and "floor (1)" in msg and "step 40" in msg and "precision=bf16" in msg
