"""The run config: defaults, YAML + dotted overrides and their precedence, and the errors users see."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsgpt.config import Config, closest_key, load_config, parse_overrides, save_config
from dsgpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def error_of(path=None, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# --- defaults, YAML, overrides ------------------------------------------------------------------

def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.run.name == "tiny"
    assert cfg.optim.lr == 6e-4
    assert cfg.optim.schedule == "cosine"
    assert cfg.train.max_steps == 200
    assert cfg.train.micro_batch_size == 8
    assert cfg.model.n_layer is None
    assert cfg.precision == "fp32"
    assert cfg.deepspeed.config == "ds_configs/zero1.json"
    assert cfg.deepspeed.zero_stage is None


def test_precedence_overrides_beat_yaml_beat_defaults(tmp_path):
    path = write(tmp_path / "exp.yaml", """
train:
  max_steps: 77          # also overridden below
  micro_batch_size: 3    # only here
optim:
  lr: 1.0e-3
""")
    cfg = load_config(path, ["train.max_steps=55", "optim.weight_decay=0.0"])
    assert cfg.train.max_steps == 55          # override > YAML (> default 200)
    assert cfg.train.micro_batch_size == 3    # YAML > default 8
    assert cfg.train.grad_accum_steps == 1    # default
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.weight_decay == 0.0      # override > default 0.1
    assert cfg.optim.min_lr == 6e-5           # untouched siblings keep their defaults


def test_yaml_written_3e_minus_4_is_a_float(tmp_path):
    # YAML 1.1 reads "3e-4" (no dot) as a string; the float field must still get a number.
    cfg = load_config(write(tmp_path / "a.yaml", "optim:\n  lr: 3e-4\n"))
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)


def test_override_values_are_parsed_like_yaml():
    tree = parse_overrides(["optim.lr=3e-4", "train.resume=auto", "model.n_layer=null",
                            "model.bias=true", "model.activation_checkpointing=false",
                            "train.max_steps=12", "run.name=a=b"])
    assert tree == {
        "optim": {"lr": 3e-4},
        "train": {"resume": "auto", "max_steps": 12},
        "model": {"n_layer": None, "bias": True, "activation_checkpointing": False},
        "run": {"name": "a=b"},   # only the first '=' splits
    }
    assert isinstance(tree["optim"]["lr"], float)
    assert isinstance(tree["train"]["max_steps"], int)

    cfg = load_config(None, ["optim.lr=3e-4", "train.resume=auto", "model.n_layer=null",
                             "model.bias=false", "train.max_minutes=1.5"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.resume == "auto"
    assert cfg.model.n_layer is None
    assert cfg.model.bias is False
    assert cfg.train.max_minutes == 1.5


def test_override_can_null_a_value_the_yaml_set(tmp_path):
    path = write(tmp_path / "x.yaml", "model:\n  n_layer: 6\n")
    assert load_config(path).model.n_layer == 6
    assert load_config(path, ["model.n_layer=null"]).model.n_layer is None


def test_numeric_run_name_is_a_name():
    # YAML reads `42` as an int; a run name of digits is still a valid name.
    assert load_config(None, ["run.name=42"]).run.name == "42"


def test_run_name_defaults_to_the_yaml_stem(tmp_path):
    path = write(tmp_path / "my_experiment.yaml", "train:\n  max_steps: 5\n")
    assert load_config(path).run.name == "my_experiment"
    # An explicit name in the YAML wins over the stem, an override over both.
    named = write(tmp_path / "other.yaml", "run:\n  name: chosen\n")
    assert load_config(named).run.name == "chosen"
    assert load_config(named, ["run.name=cli"]).run.name == "cli"
    assert load_config(path, ["run.name=cli"]).run.name == "cli"


def test_empty_run_section_still_takes_the_stem(tmp_path):
    # `run:` with everything under it commented out reads as None; it used to crash with an
    # AttributeError instead of loading.
    path = write(tmp_path / "stem.yaml", "run:\n  # name: x\ntrain:\n  max_steps: 5\n")
    cfg = load_config(path)
    assert cfg.run.name == "stem"
    assert cfg.train.max_steps == 5


def test_empty_yaml_file_is_the_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "empty.yaml", ""))
    assert cfg == Config(run={"name": "empty"})


def test_save_config_round_trip(tmp_path):
    cfg = load_config(None, ["run.name=exp1", "optim.lr=3e-4", "optim.min_lr=3e-5",
                             "model.n_embd=64", "train.max_minutes=2.5", "train.init_from=runs/base",
                             "optim.schedule=step", "precision=bf16", "deepspeed.zero_stage=2"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    loaded = load_config(str(path))
    assert loaded == cfg
    assert loaded.run.name == "exp1"   # the saved name, not the file's stem "config"
    assert loaded.optim.lr == 3e-4 and loaded.model.n_embd == 64 and loaded.model.n_layer is None


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key, hint", [
    ("train.max_step=5", "train.max_step", "train.max_steps"),
    ("optim.learning_rate=1e-3", "optim.learning_rate", "optim.lr"),
    ("train.lr=1e-3", "train.lr", "optim.lr"),
    ("train.warmup_steps=10", "train.warmup_steps", "optim.warmup_steps"),
    ("model.n_layers=2", "model.n_layers", "model.n_layer"),
    ("model.n_embed=64", "model.n_embed", "model.n_embd"),
    ("train.batch_size=4", "train.batch_size", "train.micro_batch_size"),
    ("deepspeed.stage=2", "deepspeed.stage", "deepspeed.zero_stage"),
    ("optimizer.lr=1e-3", "optimizer", "optim"),
    ("precison=bf16", "precison", "precision"),
])
def test_unknown_key_names_the_key_and_the_closest_valid_one(override, key, hint):
    msg = error_of(overrides=[override])
    assert f"unknown key '{key}' (did you mean '{hint}'?)" in msg


def test_closest_key_without_a_plausible_match():
    assert closest_key("zzz.qqq") is None
    msg = error_of(overrides=["zzz.qqq=1"])
    assert "unknown key 'zzz'" in msg and "did you mean" not in msg


def test_unknown_key_in_the_yaml_file_names_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  max_step: 5\n")
    msg = error_of(path)
    assert str(path) in msg
    assert "unknown key 'train.max_step'" in msg and "'train.max_steps'" in msg


def test_wrong_type_names_key_and_value():
    msg = error_of(overrides=["train.max_steps=abc"])
    assert "'train.max_steps' = 'abc'" in msg
    assert "integer" in msg


@pytest.mark.parametrize("override, key, allowed", [
    ("optim.schedule=cosin", "optim.schedule", ["cosine", "linear", "step", "exponential", "constant"]),
    ("precision=fp8", "precision", ["fp32", "bf16", "bf16-mixed", "fp16"]),
    ("train.on_nonfinite=ignore", "train.on_nonfinite", ["skip", "stop"]),
])
def test_invalid_literal_lists_the_allowed_values(override, key, allowed):
    msg = error_of(overrides=[override])
    value = override.partition("=")[2]
    assert f"'{key}' = '{value}'" in msg
    for choice in allowed:
        assert f"'{choice}'" in msg


def test_every_problem_is_reported_at_once():
    msg = error_of(overrides=["train.max_step=5", "optim.schedule=cosin", "precision=fp8",
                              "train.max_steps=abc", "train.micro_batch_size=0",
                              "train.grad_accum_steps=0"])
    assert "6 problem(s)" in msg
    for part in ["unknown key 'train.max_step'", "'optim.schedule' = 'cosin'", "'precision' = 'fp8'",
                 "'train.max_steps' = 'abc'", "'train.micro_batch_size' = 0",
                 "'train.grad_accum_steps' = 0"]:
        assert part in msg
    assert len(re.findall(r"^  - ", msg, flags=re.M)) == 6


@pytest.mark.parametrize("key", ["max_steps", "micro_batch_size", "grad_accum_steps", "eval_interval",
                                 "eval_batches", "log_interval", "save_interval", "keep_last"])
def test_positive_train_counts(key):
    msg = error_of(overrides=[f"train.{key}=0"])
    assert f"'train.{key}' = 0" in msg
    assert "greater than or equal to 1" in msg
    assert getattr(load_config(None, [f"train.{key}=1"]).train, key) == 1


def test_micro_batch_size_zero_is_refused():
    msg = error_of(overrides=["train.micro_batch_size=0"])
    assert "'train.micro_batch_size' = 0" in msg and "1 problem(s)" in msg


def test_step_schedule_needs_a_positive_step_size():
    # step_size=0 used to pass validation and divide by zero in the schedule.
    assert "'optim.step_size' = 0" in error_of(overrides=["optim.step_size=0"])
    assert "'optim.warmup_steps' = -1" in error_of(overrides=["optim.warmup_steps=-1"])


def test_exponential_to_a_zero_floor_is_refused():
    # (min_lr / lr) ** (1 / decay) is 0 when min_lr is 0: the lr would drop to 0 one step in.
    msg = error_of(overrides=["optim.schedule=exponential", "optim.min_lr=0"])
    assert "optim.min_lr" in msg and "optim.exp_gamma" in msg
    cfg = load_config(None, ["optim.schedule=exponential", "optim.min_lr=0", "optim.exp_gamma=0.9"])
    assert cfg.optim.exp_gamma == 0.9


def test_override_without_equals_sign():
    msg = error_of(overrides=["train.max_steps"])
    assert "'train.max_steps'" in msg and "key=value" in msg


def test_override_inside_a_value_that_is_not_a_section():
    with pytest.raises(UserError, match="inside 'train', which is not a section"):
        parse_overrides(["train=5", "train.max_steps=3"])
    msg = error_of(overrides=["train=5"])
    assert "'train' = 5" in msg


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = error_of(str(missing))
    assert str(missing) in msg and "does not exist" in msg


def test_invalid_yaml(tmp_path):
    path = write(tmp_path / "broken.yaml", "train: [1, 2\n  max_steps: 5\n")
    msg = error_of(path)
    assert path in msg and "not valid YAML" in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    msg = error_of(path)
    assert path in msg and "mapping" in msg and "list" in msg


def test_non_finite_numbers_and_unknown_zero_stages_are_refused():
    from dsgpt.config import load_config
    from dsgpt.errors import UserError
    with pytest.raises(UserError) as err:
        load_config(None, ["optim.lr=nan", "deepspeed.zero_stage=4"])
    assert "optim.lr" in str(err.value) and "deepspeed.zero_stage" in str(err.value)
