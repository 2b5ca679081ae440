"""RG-LCD (fastgen.trainers.rg_lcd) on a tiny SD teacher with the digits reward (direct and LRM modes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastgen.config import config_from_dict
from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.trainers.method import get_method
from fastgen.trainers.rg_lcd import RGLCD, RGLCDConfig
from fastgen.trainers.engine.trainer import TrainConfig, Trainer
from fastgen.workflows.export import export_method
from tiny_models import build_method, make_tiny_sd

RECIPES = Path(__file__).resolve().parents[1] / "fastgen" / "recipes"
PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three", "the digit zero written in green",
           "yellow digit five"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("rg") / "sd")


def make(teacher, **kw) -> RGLCD:
    kw.setdefault("mode", "direct")
    return build_method(RGLCD, teacher=str(teacher), w_min=1.0, w_max=4.0, **kw)


def batch(m, n=4):
    r = m.nets.resolution
    return {"pixels": torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(3)) * 2 - 1, "caption": PROMPTS[:n]}


def _step(m, b, seed=0):
    torch.manual_seed(seed)
    return m.train_step(b, 0)


def test_registered_and_recipes_parse():
    from fastgen.trainers.engine.run import load_run_config

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


def test_direct_mode_on_a_flow_teacher(tmp_path):
    """RG-LCD composes LCD, so a flow-matching (Flux) teacher trains with the reward on the decoded x - sigma v."""
    from tiny_models import make_tiny_flux

    folder = make_tiny_flux(tmp_path / "flux")
    m0, m1 = (build_method(RGLCD, teacher=str(folder), resolution=32, w_min=1.0, w_max=3.0, mode="direct", reward_scale=r,
                           sections={"teacher": {"max_sequence_length": 16}}) for r in (0.0, 2.0))
    assert m1.nets.flow
    b = batch(m0, 2)
    out0, out1 = _step(m0, b), _step(m1, b)
    assert out0.logs["lcd_loss"] == pytest.approx(out1.logs["lcd_loss"], rel=1e-5)
    assert out1.logs["loss"] == pytest.approx(out1.logs["lcd_loss"] - 2.0 * out1.logs["reward"], rel=1e-5, abs=1e-6)
    out1.losses["student"].backward()
    assert m1.nets.student.time_text_embed.guidance_embedder.linear_2.weight.grad.abs().sum() > 0


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
    export_method(m, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "fastgen_export.json").read_text())
    assert info["method"] == "rg-lcd-direct" and info["reward"]["reward"] == "digits" and info["reward_scale"] == 0.5
    assert (tmp_path / "out" / "model_index.json").is_file()


# --------------------------------------------------------------------------- LRM mode


def _tiny_lrm(teacher, folder, size=None, channels=4):
    from transformers import CLIPTokenizer

    from fastgen.rewards.latent_proxy import LatentRewardModel, LRMConfig

    m = make(teacher)
    size = size or m.nets.resolution // m.teacher.vae_scale_factor
    tok = CLIPTokenizer.from_pretrained(str(Path(teacher) / "tokenizer"))
    cfg = LRMConfig(latent_channels=channels, latent_size=size, width=16, depth=1, embed_dim=16, text_width=16,
                    text_layers=1, text_heads=2, text_max_length=16)
    LatentRewardModel(cfg, tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lrm_folder(teacher, tmp_path_factory):
    return _tiny_lrm(teacher, tmp_path_factory.mktemp("lrm") / "lrm")


def test_lrm_mode_student_and_lrm_losses_reach_only_their_own_groups(teacher, lrm_folder):
    m = make(teacher, mode="lrm", lrm_path=str(lrm_folder), reward_scale=1.0, lrm_batch_size=3, lrm_update_every=2)
    groups = m.parameter_groups()
    assert set(groups) == {"student", "lrm"} and groups["lrm"]
    assert m.optimizers_to_step(0) == ["student", "lrm"] and m.optimizers_to_step(1) == ["student"]
    out = _step(m, batch(m))
    assert {"lrm_loss", "lrm_agreement", "expert_reward"} <= set(out.logs) and 0 <= out.logs["lrm_agreement"] <= 1
    assert out.logs["loss"] == pytest.approx(out.logs["lcd_loss"] - out.logs["reward"], rel=1e-5, abs=1e-6)
    # the student loss reaches the student only (the trainer back-propagates into each group's parameters)
    g_lrm = torch.autograd.grad(out.losses["student"], groups["lrm"], allow_unused=True, retain_graph=True)
    g_stu = torch.autograd.grad(out.losses["student"], groups["student"], allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_stu)
    # the alignment loss reaches the LRM only (its candidates are detached)
    a_stu = torch.autograd.grad(out.losses["lrm"], groups["student"], allow_unused=True, retain_graph=True)
    a_lrm = torch.autograd.grad(out.losses["lrm"], groups["lrm"], allow_unused=True)
    assert all(g is None for g in a_stu) and any(g is not None and g.abs().sum() > 0 for g in a_lrm)
    out1 = m.train_step(batch(m), 1)
    assert set(out1.losses) == {"student"}
    assert len(g_lrm) == len(groups["lrm"])


def test_lrm_checkpoint_roundtrip(teacher, lrm_folder):
    m = make(teacher, mode="lrm", lrm_path=str(lrm_folder))
    with torch.no_grad():
        for p in m.lrm.parameters():
            p.add_(0.01)
    state = m.checkpoint_state_dict()
    assert any(k.startswith("lrm.") for k in state)
    m2 = make(teacher, mode="lrm", lrm_path=str(lrm_folder))
    m2.load_checkpoint_state_dict(state)
    for (k, a), b in zip(m.lrm.state_dict().items(), m2.lrm.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ModelLoadError, match="no latent reward model"):
        m2.load_checkpoint_state_dict({k: v for k, v in state.items() if not k.startswith("lrm.")})


@pytest.mark.parametrize("size,channels", [(16, 4), (None, 8)])
def test_lrm_that_does_not_match_the_teachers_latents_is_refused(teacher, tmp_path, size, channels):
    folder = _tiny_lrm(teacher, tmp_path / "bad", size=size, channels=channels)
    with pytest.raises(ConfigError, match=r"\[4, "):
        make(teacher, mode="lrm", lrm_path=str(folder))


def test_missing_lrm_outside_the_digits_world_is_an_error(teacher, tmp_path):
    with pytest.raises(ModelLoadError, match="lrm pretrain"):
        make(teacher, mode="lrm", lrm_path=str(tmp_path / "none"))


def test_caption_dropout_is_applied(teacher):
    """rg_lcd.caption_dropout trains rows on the empty prompt (the student's and target's conditioning),
    while the reward still reads the real prompt."""
    seen = []
    m = make(teacher, caption_dropout=1.0)
    real_f = m.nets.f

    def recording_f(net, x, t, embeds, w):
        seen.append(embeds.hidden.detach().clone())
        return real_f(net, x, t, embeds, w)

    m.nets.f = recording_f
    b = batch(m, 2)
    _step(m, b)
    empty = m.nets.uncond(torch.device("cpu")).hidden[0]
    assert seen and all(torch.equal(h[i], empty) for h in seen for i in range(2))
    seen.clear()
    plain = make(teacher, caption_dropout=0.0)
    real_plain = plain.nets.f
    plain.nets.f = lambda net, x, t, embeds, w: (seen.append(embeds.hidden.detach().clone()), real_plain(net, x, t, embeds, w))[1]
    _step(plain, b)
    assert not torch.equal(seen[0][0], empty)


def test_trainer_backward_keeps_each_loss_in_its_own_group(teacher, lrm_folder, tmp_path):
    """Through the trainer's backward: the reward term never leaves a gradient on the LRM, the alignment
    loss never on the student (each group's .grad equals the gradient of its own loss alone)."""
    m = make(teacher, mode="lrm", lrm_path=str(lrm_folder), reward_scale=1.0, lrm_batch_size=3)
    trainer = Trainer(m, TrainConfig(max_steps=1, batch_size=4, log_with="none", progress=False), tmp_path / "run")
    out = _step(m, batch(m))
    groups = trainer.groups
    expect_stu = torch.autograd.grad(out.losses["student"], groups["student"], allow_unused=True, retain_graph=True)
    expect_lrm = torch.autograd.grad(out.losses["lrm"], groups["lrm"], allow_unused=True, retain_graph=True)
    # the student's loss does depend on the LRM (through the reward): only the trainer's routing keeps it out
    leak = torch.autograd.grad(out.losses["student"], groups["lrm"], allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in leak)
    trainer._backward(out.losses, ["student", "lrm"], 1.0)
    for p, g in zip(groups["student"], expect_stu):
        assert (p.grad is None and g is None) or torch.allclose(p.grad, g, atol=1e-7)
    for p, g in zip(groups["lrm"], expect_lrm):
        assert (p.grad is None and g is None) or torch.allclose(p.grad, g, atol=1e-7)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["lrm"])
