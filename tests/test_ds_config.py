"""Resolving a ds_configs/*.json template against the run config into the DeepSpeed config used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsgpt.config import load_config
from dsgpt.ds_config import resolve_ds_config
from dsgpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((REPO / "ds_configs").glob("*.json"))


def cfg(*overrides: str):
    return load_config(None, list(overrides))


def resolve(*overrides: str, world: int = 1, on_gpu: bool = False) -> dict:
    return resolve_ds_config(cfg(*overrides), world, on_gpu)


def user_template(tmp_path: Path, conf: dict, name: str = "mine.json") -> str:
    base = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": 1}}
    path = tmp_path / name
    path.write_text(json.dumps({**base, **conf}))
    return str(path)


def refusal(*overrides: str, world: int = 1, on_gpu: bool = False) -> str:
    with pytest.raises(UserError) as info:
        resolve(*overrides, world=world, on_gpu=on_gpu)
    return str(info.value)


def leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


def test_the_templates_are_there():
    names = {p.name for p in TEMPLATES}
    assert {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero2_offload.json",
            "zero3_offload.json"} <= names


@pytest.mark.parametrize("on_gpu", [False, True])
@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_every_template_resolves_with_no_auto_left(path, on_gpu):
    template = json.loads(path.read_text())
    conf = resolve(f"deepspeed.config={path}", "train.micro_batch_size=3", "train.grad_accum_steps=2",
                   "model.n_embd=64", world=2, on_gpu=on_gpu)
    autos = [key for key, value in leaves(conf) if value == "auto"]
    assert autos == []
    assert conf["train_micro_batch_size_per_gpu"] == 3
    assert conf["gradient_accumulation_steps"] == 2
    assert conf["train_batch_size"] == 12
    assert conf["gradient_clipping"] == 1.0
    # With no deepspeed.zero_stage the template's stage stands.
    assert conf["zero_optimization"]["stage"] == template["zero_optimization"]["stage"]
    assert conf["bf16"] == {"enabled": False} and conf["fp16"] == {"enabled": False}
    # Whatever the template fixed explicitly comes through unchanged.
    assert conf["wall_clock_breakdown"] is template["wall_clock_breakdown"]
    # The template itself is not modified by resolving it.
    assert json.loads(path.read_text()) == template


def test_shipped_templates_pass_deepspeeds_own_config_check():
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    for path in TEMPLATES:
        conf = resolve(f"deepspeed.config={path}", "train.micro_batch_size=2", "train.grad_accum_steps=3")
        parsed = ds_config.DeepSpeedConfig(conf)
        assert parsed.train_batch_size == 6, path.name
        assert parsed.zero_optimization_stage == conf["zero_optimization"]["stage"], path.name


@pytest.mark.parametrize("micro, gas, world", [(1, 1, 1), (3, 5, 4), (8, 2, 2), (4, 1, 16)])
def test_train_batch_is_micro_times_gas_times_world(micro, gas, world):
    conf = resolve(f"train.micro_batch_size={micro}", f"train.grad_accum_steps={gas}", world=world)
    assert conf["train_batch_size"] == micro * gas * world
    assert conf["train_micro_batch_size_per_gpu"] == micro
    assert conf["gradient_accumulation_steps"] == gas


def test_gradient_clipping_comes_from_optim_grad_clip():
    assert resolve("optim.grad_clip=0.25")["gradient_clipping"] == 0.25
    assert resolve("optim.grad_clip=0")["gradient_clipping"] == 0.0


def test_steps_per_print():
    assert resolve()["steps_per_print"] == 10**9          # 0 = quiet
    assert resolve("deepspeed.steps_per_print=7")["steps_per_print"] == 7


@pytest.mark.parametrize("template, stage", [("zero1.json", 3), ("zero3.json", 0), ("zero2.json", 1),
                                             ("zero0.json", 2)])
def test_run_config_zero_stage_overrides_the_template(template, stage):
    conf = resolve(f"deepspeed.config=ds_configs/{template}", f"deepspeed.zero_stage={stage}")
    assert conf["zero_optimization"]["stage"] == stage


def test_zero_stage_defaults_to_0_without_a_zero_section(tmp_path):
    path = tmp_path / "bare.json"
    path.write_text(json.dumps({"train_batch_size": "auto"}))
    conf = resolve(f"deepspeed.config={path}")
    assert conf["zero_optimization"] == {"stage": 0}
    assert conf["train_micro_batch_size_per_gpu"] == 8 and conf["train_batch_size"] == 8


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed", "fp16"])
@pytest.mark.parametrize("template_bf16, template_fp16, template_autocast",
                         [("auto", "auto", None), (True, False, None), (False, True, None), (False, False, True)])
def test_precision_decides_whatever_the_template_says(tmp_path, precision, template_bf16, template_fp16,
                                                      template_autocast):
    template = {"bf16": {"enabled": template_bf16}, "fp16": {"enabled": template_fp16, "initial_scale_power": 12}}
    if template_autocast is not None:
        template["torch_autocast"] = {"enabled": template_autocast, "dtype": "float16"}
    conf = resolve(f"deepspeed.config={user_template(tmp_path, template)}", f"precision={precision}")
    assert conf["bf16"]["enabled"] is (precision == "bf16")
    assert conf["fp16"]["enabled"] is (precision == "fp16")
    if precision == "bf16-mixed":  # fp32 weights; bf16 autocast; every gradient reduced in fp32
        assert conf["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    else:
        assert conf.get("torch_autocast", {"enabled": False}) == {"enabled": False}
    if precision == "fp16":
        assert conf["fp16"]["initial_scale_power"] == 12   # the template's loss-scale settings stay
    else:
        assert conf["fp16"] == {"enabled": False}


def test_shipped_fp16_loss_scale_settings_survive():
    conf = resolve("precision=fp16", "deepspeed.config=ds_configs/zero2.json")
    assert conf["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                            "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    assert conf["bf16"] == {"enabled": False}


@pytest.mark.parametrize("width", [32, 64, 1024])
def test_bucket_sizes_scale_with_model_width_on_gpus(width):
    zero = resolve("deepspeed.config=ds_configs/zero3.json", f"model.n_embd={width}", on_gpu=True)["zero_optimization"]
    assert zero["reduce_bucket_size"] == width * width
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * width * width)
    assert zero["stage3_param_persistence_threshold"] == 10 * width


@pytest.mark.parametrize("width", [64, 1024, 2048])
def test_cpu_buckets_have_a_floor(width):
    """Over gloo a collective's fixed cost dominates small buckets: CPU ranks take at least 2M elements."""
    from dsgpt.ds_config import CPU_MIN_BUCKET
    zero = resolve("deepspeed.config=ds_configs/zero3.json", f"model.n_embd={width}")["zero_optimization"]
    assert zero["reduce_bucket_size"] == max(width * width, CPU_MIN_BUCKET)
    assert zero["stage3_prefetch_bucket_size"] == max(int(0.9 * width * width), CPU_MIN_BUCKET)
    assert zero["stage3_param_persistence_threshold"] == 10 * width


@pytest.mark.parametrize("preset, width", [("tiny", 128), ("gpt2-124m", 768), ("gpt2-1.5b", 1600)])
def test_bucket_sizes_from_the_preset_width(preset, width):
    zero = resolve("deepspeed.config=ds_configs/zero2.json", f"model.preset={preset}", on_gpu=True)["zero_optimization"]
    assert zero["reduce_bucket_size"] == width * width


def test_explicit_bucket_sizes_are_kept(tmp_path):
    path = user_template(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345,
                                                          "overlap_comm": True}})
    zero = resolve(f"deepspeed.config={path}", "model.n_embd=64")["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345
    assert zero["overlap_comm"] is True


@pytest.mark.parametrize("on_gpu", [False, True])
def test_overlap_comm_and_pin_memory_follow_the_device(on_gpu):
    zero = resolve("deepspeed.config=ds_configs/zero3_offload.json", on_gpu=on_gpu)["zero_optimization"]
    assert zero["overlap_comm"] is on_gpu
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": on_gpu}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": on_gpu}
    zero2 = resolve("deepspeed.config=ds_configs/zero2_offload.json", on_gpu=on_gpu)["zero_optimization"]
    assert zero2["overlap_comm"] is on_gpu
    assert zero2["offload_optimizer"]["pin_memory"] is on_gpu


def test_disagreeing_explicit_values_are_all_reported_in_one_error(tmp_path):
    path = user_template(tmp_path, {"train_batch_size": 99, "gradient_accumulation_steps": 3,
                                    "gradient_clipping": 0.5})
    msg = refusal(f"deepspeed.config={path}", "train.micro_batch_size=2", "train.grad_accum_steps=1",
                  world=2)
    assert "3 problem(s)" in msg
    assert "train_batch_size is 99 in the template" in msg and "gives 4" in msg
    assert "gradient_accumulation_steps is 3 in the template" in msg and "gives 1" in msg
    assert "gradient_clipping is 0.5 in the template" in msg and "gives 1.0" in msg
    assert str(path) in msg and '"auto"' in msg


def test_agreeing_explicit_values_are_accepted(tmp_path):
    path = user_template(tmp_path, {"train_batch_size": 8, "gradient_accumulation_steps": 2,
                                    "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1})
    conf = resolve(f"deepspeed.config={path}", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                   world=2)
    assert conf["train_batch_size"] == 8
    assert conf["gradient_accumulation_steps"] == 2
    assert conf["gradient_clipping"] == 1


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_sections_are_refused(tmp_path, section):
    path = user_template(tmp_path, {section: {"type": "AdamW", "params": {"lr": 1e-3}}})
    msg = refusal(f"deepspeed.config={path}")
    assert f"'{section}' section" in msg
    assert "`optim` keys" in msg and f"remove '{section}'" in msg


def test_missing_template_path():
    msg = refusal("deepspeed.config=ds_configs/zero9.json")
    assert "'ds_configs/zero9.json'" in msg and "does not exist" in msg and "zero3.json" in msg


def test_invalid_json_template(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"train_batch_size": "auto",}')
    msg = refusal(f"deepspeed.config={path}")
    assert str(path) in msg and "not valid JSON" in msg


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_param_needs_stage_3(stage):
    # Stage 2 with offload_param used to pass: the check read `stage < 2`.
    msg = refusal("deepspeed.config=ds_configs/zero3_offload.json", f"deepspeed.zero_stage={stage}")
    assert "offload_param needs ZeRO stage 3" in msg
    assert ("offload_optimizer needs ZeRO stage 1" in msg) is (stage == 0)


def test_a_shipped_config_takes_another_template_whole():
    # The shipped configs leave deepspeed.zero_stage unset, so choosing a template is enough.
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(str(tiny), ["deepspeed.config=ds_configs/zero3_offload.json"])
    zero = resolve_ds_config(cfg, 2, False)["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"


def test_an_overriding_stage_is_named_in_the_offload_message():
    msg = refusal("deepspeed.config=ds_configs/zero3_offload.json", "deepspeed.zero_stage=1")
    assert "deepspeed.zero_stage=1 in the run config overrides the template's stage 3" in msg
    assert "set deepspeed.zero_stage=3" in msg


def test_offload_param_with_stage_3_is_fine():
    conf = resolve("deepspeed.config=ds_configs/zero3_offload.json", "deepspeed.zero_stage=3")
    assert conf["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_offload_optimizer_needs_stage_1_or_more():
    msg = refusal("deepspeed.config=ds_configs/zero2_offload.json", "deepspeed.zero_stage=0")
    assert "offload_optimizer needs ZeRO stage 1 or more" in msg and "1 problem(s)" in msg
    conf = resolve("deepspeed.config=ds_configs/zero2_offload.json", "deepspeed.zero_stage=1")
    assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_invalid_stage_is_reported(tmp_path):
    # In the run config the stage is refused on load; in a template, when it is resolved.
    from dsgpt.config import load_config
    with pytest.raises(UserError, match="deepspeed.zero_stage"):
        load_config(None, ["deepspeed.zero_stage=5"])
    msg = refusal(f"deepspeed.config={user_template(tmp_path, {'zero_optimization': {'stage': 5}})}")
    assert "zero_optimization.stage is 5" in msg


def test_non_integer_template_stage_is_a_user_error(tmp_path):
    # Comparing "auto" < 3 used to raise a bare TypeError.
    path = user_template(tmp_path, {"zero_optimization": {"stage": "auto",
                                                          "offload_param": {"device": "cpu"}}})
    msg = refusal(f"deepspeed.config={path}")
    assert "zero_optimization.stage is 'auto'" in msg


def test_auto_without_a_rule_is_reported(tmp_path):
    path = user_template(tmp_path, {"zero_optimization": {"stage": 3, "sub_group_size": "auto"},
                                    "activation_checkpointing": {"number_checkpoints": "auto"}})
    msg = refusal(f"deepspeed.config={path}")
    assert "zero_optimization.sub_group_size is \"auto\"" in msg
    assert "activation_checkpointing.number_checkpoints is \"auto\"" in msg
    assert "2 problem(s)" in msg


def test_several_kinds_of_problem_in_one_error(tmp_path):
    path = user_template(tmp_path, {"train_batch_size": 99, "optimizer": {"type": "Adam"},
                                    "zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}})
    msg = refusal(f"deepspeed.config={path}")
    assert "3 problem(s)" in msg
    assert "train_batch_size is 99" in msg and "'optimizer' section" in msg and "offload_param" in msg
