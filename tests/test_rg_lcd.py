"""RG-LCD (fastgen.trainers.rg_lcd) on a tiny SD teacher with the digits reward (direct and LRM modes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastgen.config import config_from_dict
from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.trainers.method import get_method
from fastgen.trainers.rg_lcd import RGLCD, RGLCDConfig
from tiny_models import make_tiny_sd

RECIPES = Path(__file__).resolve().parents[1] / "fastgen" / "recipes"
PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three", "the digit zero written in green",
           "yellow digit five"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("rg") / "sd")


def make(teacher, **kw) -> RGLCD:
    kw.setdefault("mode", "direct")
    return RGLCD(RGLCDConfig(teacher=str(teacher), w_min=1.0, w_max=4.0, **kw))


def batch(m, n=4):
    r = m.resolution
    return {"pixels": torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(3)) * 2 - 1, "caption": PROMPTS[:n]}


def _step(m, b, seed=0):
    torch.manual_seed(seed)
    return m.train_step(b, 0)


def test_registered_and_recipes_parse():
    from fastgen.trainers.run import load_run_config

    assert get_method("rg-lcd") is RGLCD
    for name in ("rg-lcd-digits-direct", "rg-lcd-digits-lrm", "rg-lcd-sd21-hps"):
        cfg, cls = load_run_config(RECIPES / f"{name}.yaml")
        assert cls is RGLCD and cfg.rg_lcd.mode in ("direct", "lrm")
    assert load_run_config(RECIPES / "rg-lcd-sd21-hps.yaml")[0].rg_lcd.reward["name"] == "hpsv2"
    with pytest.raises(ConfigError, match="lrm_path"):
        RGLCDConfig(mode="lrm")
    with pytest.raises(ConfigError, match="'direct' or 'lrm'"):
        RGLCDConfig(mode="pixels")


def test_direct_loss_is_lcd_minus_beta_reward_and_its_gradient_reaches_the_student(teacher):
    m0, m1 = make(teacher, reward_scale=0.0), make(teacher, reward_scale=2.0)
    b = batch(m0)
    out0, out1 = _step(m0, b), _step(m1, b)
    assert out0.logs["lcd_loss"] == pytest.approx(out1.logs["lcd_loss"], rel=1e-5)  # same randomness, same LCD term
    assert out1.logs["loss"] == pytest.approx(out1.logs["lcd_loss"] - 2.0 * out1.logs["reward"], rel=1e-5, abs=1e-6)
    assert out1.logs["reward"] <= 0  # log-probabilities
    g = []
    for m, out in ((m0, out0), (m1, out1)):
        params = m.parameter_groups()["student"]
        grads = torch.autograd.grad(out.losses["student"], params, allow_unused=True)
        g.append(torch.cat([x.flatten() for x in grads if x is not None]))
    assert not torch.allclose(g[0], g[1])  # the reward term changes the student's gradient
    assert set(m1.parameter_groups()) == {"student"} and m1.optimizers_to_step(0) == ["student"]


def test_prompt_list_shorter_than_the_batch_is_an_error(teacher):
    m = make(teacher)
    b = batch(m)
    b["caption"] = PROMPTS[:2]
    with pytest.raises(DataError, match="one caption per image|one prompt per image"):
        m.train_step(b, 0)
    with pytest.raises(DataError, match="captions as text"):
        m.train_step({"pixels": b["pixels"]}, 0)


def test_missing_reward_checkpoint_names_the_file(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("HPS_ROOT", str(tmp_path))
    with pytest.raises(ModelLoadError, match="HPS_v2.1_compressed.pt"):
        make(teacher, reward={"name": "hpsv2", "checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(ConfigError, match="unknown reward model 'nope'"):
        make(teacher, reward="nope")


def test_export_records_the_reward(teacher, tmp_path):
    import json

    m = make(teacher, reward_scale=0.5)
    m.export(tmp_path / "out")
    info = json.loads((tmp_path / "out" / "fastgen_export.json").read_text())
    assert info["method"] == "rg-lcd-direct" and info["reward"]["reward"] == "digits" and info["reward_scale"] == 0.5
    assert (tmp_path / "out" / "model_index.json").is_file()
