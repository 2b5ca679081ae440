"""Tests of fastgen.config: YAML recipes, overrides, type coercion and error messages."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from fastgen.config import (
    config_from_dict,
    config_keys,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)
from fastgen.errors import ConfigError


class Precision(Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class Optim:
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclass
class EMA:
    decay: float = 0.999
    start_step: int = 0


@dataclass
class Stage:
    steps: int = 1
    lr_scale: float = 1.0


@dataclass
class Recipe:
    model: str = "teacher"
    steps: int = 1000
    batch_size: int = 8
    use_ema: bool = False
    resolution: tuple[int, ...] = (512,)
    timesteps: list[int] = field(default_factory=lambda: [999, 499])
    schedule: Literal["linear", "cosine"] = "linear"
    precision: Precision = Precision.FP32
    output: Optional[Path] = None
    seed: Optional[int] = None
    loss_weights: dict[str, float] = field(default_factory=lambda: {"mse": 1.0})
    optim: Optim = field(default_factory=lambda: Optim(learning_rate=5e-5))
    ema: Optional[EMA] = None
    stages: list[Stage] = field(default_factory=list)


def test_defaults_without_recipe():
    cfg = load_config(Recipe)
    assert cfg == Recipe()
    # Nested default from default_factory keeps its non-class-default value.
    assert cfg.optim.learning_rate == 5e-5


def test_overrides_coerce_types_including_nested_and_lists():
    cfg = load_config(
        Recipe,
        overrides=[
            "optim.learning_rate=1e-4",  # YAML reads "1e-4" as a string: must become float
            "steps=2_000",
            "use_ema=true",
            "resolution=[256, 512]",
            "timesteps=[999, 749, 499]",
            "schedule=cosine",
            "precision=bf16",
            "output=runs/a",
            "seed=null",
            "optim.betas=[0.5, 0.99]",
            "loss_weights.lpips=2",
            "ema.decay=0.99",
            "model=0.10",  # str field: keep the text as typed, not the float 0.1
            "stages=[{steps: 2}, {steps: 4, lr_scale: 0.5}]",
        ],
    )
    assert cfg.optim.learning_rate == 1e-4 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.optim.weight_decay == 0.0  # untouched sibling keeps its default
    assert cfg.steps == 2000
    assert cfg.use_ema is True
    assert cfg.resolution == (256, 512)
    assert cfg.timesteps == [999, 749, 499]
    assert cfg.schedule == "cosine"
    assert cfg.precision is Precision.BF16
    assert cfg.output == Path("runs/a")
    assert cfg.seed is None
    assert cfg.optim.betas == (0.5, 0.99)
    assert cfg.loss_weights == {"mse": 1.0, "lpips": 2.0}
    assert cfg.ema == EMA(decay=0.99, start_step=0)
    assert cfg.model == "0.10"
    assert cfg.stages == [Stage(steps=2, lr_scale=1.0), Stage(steps=4, lr_scale=0.5)]


def test_recipe_then_overrides_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "method: lcd\n"
        "steps: 10\n"
        "optim:\n  learning_rate: 3.0e-5\n  weight_decay: 0.01\n"
        "ema.decay: 0.9\n"  # dotted keys are accepted in YAML too
    )
    cfg = load_config(Recipe, recipe, ["steps=20"], base={"batch_size": 4, "steps": 5}, ignore_keys=("method",))
    assert cfg.steps == 20  # override > recipe > base
    assert cfg.batch_size == 4
    assert cfg.optim.learning_rate == pytest.approx(3e-5)
    assert cfg.optim.weight_decay == 0.01
    assert cfg.ema is not None and cfg.ema.decay == 0.9


def test_method_key_is_unknown_unless_ignored(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lcd\nsteps: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'method'"):
        load_config(Recipe, recipe)
    assert load_config(Recipe, recipe, ignore_keys=("method",)).steps == 3


def test_unknown_override_key_suggests_closest():
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, overrides=["optim.lerning_rate=1e-3"])
    msg = str(err.value)
    assert "unknown config key 'optim.lerning_rate'" in msg
    assert "override 'optim.lerning_rate=1e-3'" in msg
    assert "did you mean 'optim.learning_rate'?" in msg


def test_unknown_nested_yaml_key_names_file_and_suggestion(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, recipe)
    msg = str(err.value)
    assert "'optim.lerning_rate'" in msg and str(recipe) in msg
    assert "did you mean 'optim.learning_rate'?" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, overrides=["zzzz=1"])
    msg = str(err.value)
    assert "did you mean" not in msg
    assert "optim.learning_rate" in msg and "batch_size" in msg


def test_type_errors_name_key_type_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, overrides=["steps=many"])
    msg = str(err.value)
    assert "'steps'" in msg and "int" in msg and "'many'" in msg

    with pytest.raises(ConfigError, match=r"'timesteps\[1\]'.*int.*'x'"):
        load_config(Recipe, overrides=["timesteps=[1, x]"])
    with pytest.raises(ConfigError, match="'schedule'.*'linear', 'cosine'"):
        load_config(Recipe, overrides=["schedule=step"])
    with pytest.raises(ConfigError, match="'use_ema'.*bool"):
        load_config(Recipe, overrides=["use_ema=maybe"])
    with pytest.raises(ConfigError, match="'steps'.*int"):
        load_config(Recipe, overrides=["steps=1.5"])
    with pytest.raises(ConfigError, match="'optim.betas'.*exactly 2 items"):
        load_config(Recipe, overrides=["optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match="'steps'.*no sub-key 'x'"):
        load_config(Recipe, overrides=["steps.x=1"])
    with pytest.raises(ConfigError, match="'optim'"):
        load_config(Recipe, overrides=["optim=3"])


def test_override_without_equals_explains_form():
    with pytest.raises(ConfigError, match=r"no '='.*key=value"):
        load_config(Recipe, overrides=["optim.learning_rate"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])


def test_parse_overrides_nests_and_parses_values():
    assert parse_overrides(["optim.lr=1e-4", "steps=10", "a.b.c=[1, 2]", "name=x=y"]) == {
        "optim": {"lr": "1e-4"},
        "steps": 10,
        "a": {"b": {"c": [1, 2]}},
        "name": "x=y",
    }
    with pytest.raises(ConfigError, match="sub-key of 'steps'"):
        parse_overrides(["steps=1", "steps.x=2"])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        Recipe,
        overrides=["resolution=[256, 384]", "ema.decay=0.5", "output=out/x", "precision=bf16",
                   "stages=[{steps: 3}]"],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml", header={"method": "lcd"})
    data = yaml.safe_load(path.read_text())
    assert list(data)[0] == "method"
    assert data["resolution"] == [256, 384]  # tuples become lists
    assert data["precision"] == "bf16" and data["output"] == "out/x"
    assert load_config(Recipe, path, ignore_keys=("method",)) == cfg
    # No temp files left next to the saved config.
    assert sorted(os.listdir(path.parent)) == ["config.yaml"]


def test_config_dict_round_trip_and_validation():
    cfg = Recipe(steps=7, optim=Optim(learning_rate=0.25), ema=EMA(decay=0.1))
    d = config_to_dict(cfg)
    assert d["optim"] == {"learning_rate": 0.25, "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert config_from_dict(Recipe, d) == cfg
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        config_from_dict(Recipe, {"batchsize": 2})


@dataclass
class Required:
    name: str
    count: int = 1


def test_missing_required_key_and_keys_listing(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required config key 'name'.*name=<str>"):
        load_config(Required)
    assert load_config(Required, overrides=["name=x"]) == Required(name="x")
    assert config_keys(Recipe)[:2] == ["model", "steps"]
    assert "ema.start_step" in config_keys(Recipe)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Recipe, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Recipe, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Recipe, lst)


def test_dotted_override_into_a_mapping_of_dataclasses():
    """``train.optimizers.<group>.<field>=v`` on the command line builds or updates that group's OptimizerSpec
    (a recipe's own values for the group are kept) and names a misspelt field."""
    from fastgen.trainers.engine.trainer import TrainConfig

    cfg = load_config(TrainConfig, None, base={"optimizers": {"student": {"learning_rate": 0.1}}},
                      overrides=["optimizers.student.fused=true", "optimizers.disc.betas=[0.0,0.99]"])
    assert cfg.optimizers["student"].fused is True and cfg.optimizers["student"].learning_rate == 0.1
    assert cfg.optimizers["disc"].betas == (0.0, 0.99)
    with pytest.raises(ConfigError, match="did you mean 'optimizers.student.fused'"):
        load_config(TrainConfig, None, overrides=["optimizers.student.fusd=true"])
