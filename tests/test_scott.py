"""SCott (fastgen.trainers.scott) on a tiny SD teacher: LCD as its special case, the stochastic teacher
solver against DDIMScheduler, the latent discriminator (its own group, never the LoRA student's adapters),
checkpoint state, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from fastgen.diffusion import NoiseSchedule, ddim_step, sde_teacher_move, substep_grid, to_x0_eps
from fastgen.errors import ConfigError, ModelLoadError
from fastgen.losses import discriminator_loss, generator_loss, r1_penalty
from fastgen.models.discriminator import LatentDiscriminator, feature_layer_names
from fastgen.trainers.lcd import LCD
from fastgen.trainers.method import get_method
from fastgen.trainers.scott import SCott, SCottConfig
from tiny_models import build_method, make_tiny_sd

RECIPES = Path(__file__).resolve().parents[1] / "fastgen" / "recipes"
PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three", "the digit zero written in green", "yellow digit five"]
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("scott") / "sd")


def make(teacher, cls=SCott, max_steps: int = 10, **kw):
    return build_method(cls, sections={"train": {"max_steps": max_steps}}, teacher=str(teacher), w_min=1.0, w_max=4.0, **kw)


def batch(m, n=4):
    r = m.nets.resolution
    return {"pixels": torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(3)) * 2 - 1, "caption": PROMPTS[:n]}


def grads_of(m, loss) -> list[torch.Tensor]:
    params = m.parameter_groups()["student"]
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]


def test_registered_and_recipes_parse():
    from fastgen.trainers.engine.run import load_run_config

    assert get_method("scott") is SCott
    for name in ("scott-digits", "scott-sd15"):
        cfg, cls = load_run_config(RECIPES / f"{name}.yaml")
        assert cls is SCott and 0.0 <= cfg.scott.eta <= 1.0 and cfg.scott.num_substeps >= 1
    sd15 = load_run_config(RECIPES / "scott-sd15.yaml")[0]
    assert sd15.scott.adv_loss == "hinge" and sd15.train.optimizers["discriminator"].learning_rate == 2.0e-5


# --------------------------------------------------------------------------- LCD as the special case


@pytest.mark.parametrize("lora", [False, True])
def test_eta0_one_substep_no_adversary_is_lcd_loss_and_gradient(teacher, lora):
    extra = dict(lora=True, lora_rank=2, lora_alpha=2.0) if lora else {}
    lcd = make(teacher, LCD, caption_dropout=0.25, **extra)
    scott = make(teacher, eta=0.0, num_substeps=1, adv_weight=0.0, caption_dropout=0.25, **extra)
    assert scott.disc is None and set(scott.parameter_groups()) == {"student"}
    a, b = lcd.checkpoint_state_dict(), scott.checkpoint_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same start
    data = batch(lcd)
    torch.manual_seed(7)
    out_l = lcd.train_step(data, 3)
    torch.manual_seed(7)
    out_s = scott.train_step(data, 3)
    loss_l, loss_s = out_l.losses["student"], out_s.losses["student"]
    assert abs(float(loss_l.detach()) - float(loss_s.detach())) <= 1e-6
    g_l, g_s = grads_of(lcd, loss_l), grads_of(scott, loss_s)
    assert max(float((x - y).abs().max()) for x, y in zip(g_l, g_s)) <= 1e-6
    assert max(float(g.abs().max()) for g in g_l) > 0  # not vacuous: the student gets a gradient

    # and the stochastic solver really changes the target (same seed): eta > 0, or more sub-steps
    for kw in (dict(eta=0.5, num_substeps=1), dict(eta=0.0, num_substeps=3)):
        other = make(teacher, adv_weight=0.0, caption_dropout=0.25, **kw, **extra)
        torch.manual_seed(7)
        assert abs(float(other.train_step(data, 3).losses["student"].detach()) - float(loss_l.detach())) > 1e-6


# --------------------------------------------------------------------------- the stochastic teacher solver


def _predictor(sched: NoiseSchedule):
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def eps_model(x, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, x) + (t.float() / 1000.0).view(-1, 1, 1, 1))

    def predict(x, t):
        a, s = sched.alpha_sigma(t)
        return to_x0_eps(eps_model(x, t), x, a, s, "epsilon")

    return eps_model, predict


@pytest.mark.parametrize("eta,substeps,t_from,t_to", [(0.3, 4, 500, 480), (1.0, 3, 259, 199), (0.7, 2, 39, 19), (0.0, 5, 919, 899)])
def test_substeps_match_ddim_scheduler_with_eta_applied_m_times(eta, substeps, t_from, t_to):
    ref = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    delta = (t_from - t_to) // substeps  # equal integer sub-steps: the scheduler's step is T // num_inference_steps
    ref.set_timesteps(1000 // delta)
    eps_model, predict = _predictor(sched)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    noises = [torch.randn(2, 4, 8, 8, generator=gen) for _ in range(substeps)]
    expected = x.clone()
    for j in range(substeps):
        u = t_from - j * delta
        out = eps_model(expected, torch.tensor([u, u]))
        expected = ref.step(out, u, expected, eta=eta, variance_noise=noises[j]).prev_sample
    t0, t1 = torch.tensor([t_from] * 2), torch.tensor([t_to] * 2)
    got = sde_teacher_move(predict, x, t0, t1, sched, substeps, eta, noises)
    assert float((got - expected).abs().max()) <= 1e-5
    if eta > 0:  # the noise enters
        assert float((got - sde_teacher_move(predict, x, t0, t1, sched, substeps, 0.0)).abs().max()) > 1e-3


def test_one_deterministic_substep_is_the_ddim_step_and_grid_is_per_sample():
    sched = NoiseSchedule.from_scheduler_config(DDIMScheduler(**SD_BETAS).config)
    _, predict = _predictor(sched)
    x = torch.randn(3, 4, 8, 8)
    t0, t1 = torch.tensor([999, 519, 19]), torch.tensor([979, 499, 0])
    x0, eps = predict(x, t0)
    a, s = sched.alpha_sigma(t1)
    assert torch.equal(sde_teacher_move(predict, x, t0, t1, sched, 1, 0.0), ddim_step(x0.float(), eps.float(), a, s))
    grid = substep_grid(t0, t1, 3)
    assert [g.tolist() for g in grid] == [[999, 519, 19], [992, 512, 13], [986, 506, 6], [979, 499, 0]]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_eta_outside_unit_interval_is_refused(bad):
    with pytest.raises(ConfigError, match=r"scott\.eta must be in \[0, 1\]"):
        SCottConfig(eta=bad)
    with pytest.raises(ConfigError, match=r"eta_end must be in \[0, 1\]"):
        SCottConfig(eta_schedule="linear", eta_end=bad)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        sde_teacher_move(lambda x, t: (x, x), torch.zeros(1, 4, 2, 2), torch.tensor([40]), torch.tensor([20]),
                         NoiseSchedule.from_scheduler_config(DDIMScheduler().config), 1, bad, [torch.zeros(1, 4, 2, 2)])


def test_substeps_below_one_are_refused():
    with pytest.raises(ConfigError, match=r"scott\.num_substeps must be >= 1"):
        SCottConfig(num_substeps=0)
    with pytest.raises(ConfigError, match="sub-steps must be >= 1"):
        substep_grid(torch.tensor([40]), torch.tensor([20]), 0)


def test_eta_schedule_linear_decays_over_training(teacher):
    m = make(teacher, max_steps=100, eta=0.6, eta_schedule="linear", eta_end=0.1, adv_weight=0.0)
    assert [round(m.eta_at(s), 6) for s in (0, 50, 100, 400)] == [0.6, 0.35, 0.1, 0.1]
    m = make(teacher, max_steps=100, eta=0.6, eta_schedule="linear", eta_end=0.0, eta_decay_steps=20, adv_weight=0.0)
    assert round(m.eta_at(10), 6) == 0.3 and m.eta_at(20) == 0.0
    assert make(teacher, eta=0.4, adv_weight=0.0).eta_at(9) == 0.4


# --------------------------------------------------------------------------- the discriminator


def test_unknown_discriminator_layer_lists_the_valid_ones(teacher):
    with pytest.raises(ConfigError, match=r"scott\.disc_layers: \['up_blocks\.0'\] is not a block of the teacher UNet; "
                                          r"valid layers: down_blocks\.0, down_blocks\.1, mid_block"):
        make(teacher, disc_layers=["down_blocks.1", "up_blocks.0"])


def test_adversarial_start_beyond_max_steps_is_refused(teacher):
    with pytest.raises(ConfigError, match=r"scott\.adv_start_step \(10\) is not below train\.max_steps \(10\)"):
        make(teacher, max_steps=10, adv_start_step=10)
    assert make(teacher, max_steps=10, adv_start_step=9).optimizers_to_step(9) == ["student", "discriminator"]


def test_discriminator_schedule_and_groups(teacher):
    m = make(teacher, adv_start_step=2, disc_update_every=2, max_steps=10)
    assert [m.optimizers_to_step(s) for s in range(5)] == [["student"]] * 2 + [["student", "discriminator"], ["student"],
                                                                               ["student", "discriminator"]]
    out = m.train_step(batch(m), 0)  # before the start: no adversarial term, no discriminator loss
    assert set(out.losses) == {"student"} and "g_loss" not in out.logs
    spec = m.optimizer_specs()["discriminator"]
    assert spec.optimizer == "adam" and tuple(spec.betas) == (0.0, 0.99)


@pytest.mark.parametrize("lora", [False, True])
def test_each_loss_reaches_only_its_group_and_the_backbone_is_a_copy(teacher, lora):
    extra = dict(lora=True, lora_rank=2, lora_alpha=2.0) if lora else {}
    m = make(teacher, eta=0.3, num_substeps=2, adv_weight=0.5, disc_lora_rank=2, r1_weight=1.0, **extra)
    disc, student = m.parameter_groups()["discriminator"], m.parameter_groups()["student"]
    # the backbone is a separate copy: no tensor shared with the teacher / LoRA student, none of the student's adapters
    student_ptrs = {p.data_ptr() for p in m.nets.teacher.net.parameters()} | {p.data_ptr() for p in student}
    assert not student_ptrs & {p.data_ptr() for p in m.disc.parameters()}
    names = [n for n, _ in m.disc.backbone.named_parameters() if "lora_" in n]
    assert names and all(".discriminator." in n for n in names) and not any(".default." in n for n in names)
    assert m.disc.backbone.up_blocks is not None and len(m.disc.backbone.up_blocks) == 0
    out = m.train_step(batch(m), 0)
    assert {"student", "discriminator"} == set(out.losses) and out.logs["r1"] >= 0
    for loss, own, other in ((out.losses["student"], student, disc), (out.losses["discriminator"], disc, student)):
        g_own = torch.autograd.grad(loss, own, retain_graph=True, allow_unused=True)
        assert any(g is not None and float(g.abs().max()) > 0 for g in g_own)
        if loss is out.losses["discriminator"]:  # the generated latents are detached for the discriminator's loss
            assert all(g is None for g in torch.autograd.grad(loss, other, retain_graph=True, allow_unused=True))
    # the adversarial term reaches the student through D (same seed, with and without it)
    plain = make(teacher, eta=0.3, num_substeps=2, adv_weight=0.0, **extra)
    torch.manual_seed(5)
    g_plain = grads_of(plain, plain.train_step(batch(plain), 0).losses["student"])
    torch.manual_seed(5)
    g_adv = grads_of(m, m.train_step(batch(m), 0).losses["student"])
    assert max(float((x - y).abs().max()) for x, y in zip(g_plain, g_adv)) > 1e-7


def test_discriminator_feature_taps_follow_the_layers(teacher):
    from fastgen.models.spec import TeacherConfig, load_teacher

    t = load_teacher(TeacherConfig(path=str(teacher)), "digits-sd", ("sd",), "test").teacher
    assert feature_layer_names(t.net) == ["down_blocks.0", "down_blocks.1", "mid_block"]
    d = LatentDiscriminator(t, ["down_blocks.0"], head_channels=8)
    assert d.backbone.mid_block is None and len(d.backbone.down_blocks) == 1 and len(d.heads) == 1
    x = torch.randn(3, 4, 8, 8)
    logits = d(x, torch.tensor([10, 500, 900]), t.encode_prompt(PROMPTS[:3]))
    assert logits.shape == (3,) and torch.isfinite(logits).all()


def test_checkpoint_roundtrip_includes_the_discriminator(teacher):
    m = make(teacher, adv_weight=0.5, disc_lora_rank=2)
    with torch.no_grad():
        for p in m.disc.trainable():
            p.add_(torch.randn_like(p) * 0.01)
    state = m.checkpoint_state_dict()
    disc_keys = [k for k in state if k.startswith("disc.")]
    assert disc_keys and any("lora_" in k for k in disc_keys)
    assert not any(k.startswith("disc.backbone.") and "lora_" not in k for k in disc_keys)  # the frozen copy is not saved
    fresh = make(teacher, adv_weight=0.5, disc_lora_rank=2)
    fresh.load_checkpoint_state_dict(state)
    again = fresh.checkpoint_state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    with pytest.raises(ModelLoadError, match="no discriminator"):
        make(teacher, adv_weight=0.5).load_checkpoint_state_dict({k: v for k, v in state.items() if not k.startswith("disc.")})
    with pytest.raises(ModelLoadError, match="disc_lora_rank"):
        make(teacher, adv_weight=0.5, disc_lora_rank=0).load_checkpoint_state_dict(state)


# --------------------------------------------------------------------------- the GAN losses


def test_adversarial_losses_and_r1():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(0.25 + 0.5)
    assert float(generator_loss(fake, "hinge")) == pytest.approx(1.5)
    sp = torch.nn.functional.softplus
    assert float(discriminator_loss(real, fake, "non-saturating")) == pytest.approx(float(sp(-real).mean() + sp(fake).mean()))
    assert float(generator_loss(fake, "non-saturating")) == pytest.approx(float(sp(-fake).mean()))
    with pytest.raises(ConfigError, match="hinge, non-saturating"):
        generator_loss(fake, "wasserstein")
    a = torch.randn(4, 3)
    x = torch.randn(5, 4, 3, requires_grad=True)
    r1 = r1_penalty((x * a).sum(dim=(1, 2)) ** 2 / 2, x)  # d/dx (<a,x>^2/2) = <a,x> a
    expected = ((x * a).sum(dim=(1, 2)) ** 2 * a.pow(2).sum()).mean()
    assert float(r1) == pytest.approx(float(expected), rel=1e-5)
    assert r1.requires_grad


def test_adversarial_timesteps_add_a_student_call_and_are_checked(teacher):
    with pytest.raises(ConfigError, match=r"adv_timesteps must be null or a non-empty list of timesteps in 0\.\.999"):
        make(teacher, adv_timesteps=[999, 1000])
    with pytest.raises(ConfigError, match="adv_timesteps"):
        make(teacher, adv_timesteps=[])
    grads = []
    for ts in (None, [999, 499]):
        m = make(teacher, adv_weight=0.5, adv_timesteps=ts)
        calls = []
        hook = m.nets.student.register_forward_hook(lambda *a: calls.append(1))
        torch.manual_seed(2)
        out = m.train_step(batch(m), 0)
        hook.remove()
        grads.append(grads_of(m, out.losses["student"]))
        assert len(calls) == (1 if ts is None else 2)  # the consistency rows, plus the sampler-timestep call
    assert max(float((x - y).abs().max()) for x, y in zip(*grads)) > 1e-7


def test_recipe_discriminator_spec_is_accepted_without_a_discriminator(teacher, tmp_path):
    from fastgen.trainers.engine.run import prepare_run

    recipe = RECIPES / "scott-digits.yaml"
    base = [f"teacher.path={teacher}", "train.log_with=none", "train.progress=false"]
    trainer, _ = prepare_run(recipe, [*base, f"output_dir={tmp_path / 'a'}", "scott.adv_weight=0"])
    assert set(trainer.groups) == {"student"}  # the recipe's train.optimizers.discriminator is ignored
    trainer, _ = prepare_run(recipe, [*base, f"output_dir={tmp_path / 'b'}"])
    assert set(trainer.groups) == {"student", "discriminator"}
    spec = trainer.specs["discriminator"]
    assert (spec.optimizer, spec.learning_rate, spec.betas, spec.max_grad_norm) == ("adam", 2.0e-4, (0.0, 0.99), 1.0)
    with pytest.raises(ConfigError, match="names optimizer 'discriminatr'.*did you mean 'discriminator'"):
        prepare_run(recipe, [*base, f"output_dir={tmp_path / 'c'}", "train.optimizers.discriminatr.learning_rate=0.1"])
