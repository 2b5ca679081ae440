"""Score distillation (DMD, fastgen.trainers.score_distill) and DisBack (fastgen.trainers.disback) on a tiny SD
teacher: the generator loss's gradient, separation of the generator's and the fake score's gradients, the path
schedule (every node in reverse, ending at the teacher), DisBack with no path = DMD, node checks, bad input."""

from __future__ import annotations

import pytest
import torch

from fastgen.errors import ConfigError, ModelLoadError
from fastgen.trainers.disback import DisBack, DisBackConfig
from fastgen.trainers.method import get_method
from fastgen.trainers.score_distill import DMD
from tiny_models import build_method, make_tiny_sd

PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three", "the digit zero written in green", "yellow digit five"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("dmd") / "sd")


def make(cls, teacher, max_steps: int = 40, **kw):
    sections = {"data": {"source": "prompts", "num_samples": 16}, "train": {"max_steps": max_steps}}
    return build_method(cls, sections=sections, teacher=str(teacher), **kw)


def run(m, steps: int, start: int = 0, lr: float = 1e-3) -> None:
    """Train iterations ``start .. steps - 1`` the way the Trainer does (each loss into its own group, then the hooks)."""
    groups = m.parameter_groups()
    opts = {k: torch.optim.Adam(v, lr=lr) for k, v in groups.items()}
    for step in range(start, steps):
        out = m.train_step({"caption": PROMPTS}, step)
        for name in m.optimizers_to_step(step):
            torch.autograd.backward(out.losses[name], inputs=groups[name])
            opts[name].step()
            opts[name].zero_grad()
            m.after_optimizer_step(name, step)


def test_registered():
    assert get_method("dmd") is DMD and get_method("disback") is DisBack


def test_generator_loss_gradient_is_the_normalised_score_difference(teacher):
    m = make(DMD, teacher, guidance_scale=2.0)
    embeds = m.teacher.encode_prompt(PROMPTS[:2])
    z = torch.randn(m.teacher.latent_shape(2, 16, 16), generator=torch.Generator().manual_seed(0))
    x = m.generate(z, embeds).detach().requires_grad_(True)
    torch.manual_seed(3)
    out = m.generator_loss(x, embeds)
    (grad_x,) = torch.autograd.grad(out["loss"], x)
    torch.manual_seed(3)  # the same t and noise
    t = m.draw_t(2, x.device, 0.02, 0.98)
    x_t = m.teacher.schedule.add_noise(x.detach(), torch.randn_like(x), t)
    real = m.teacher.predict(x_t, t, embeds, m.teacher.encode_prompt([""]), guidance=2.0)[0]
    fake = m.score_x0(m.fake, x_t, t, embeds, 1.0)
    want = (fake - real) / (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad_x * x.numel(), want, atol=1e-5)
    assert torch.equal(out["t"], t)


def test_generator_and_fake_gradients_stay_in_their_groups(teacher):
    m = make(DMD, teacher, fake_updates_per_generator_update=2)
    torch.manual_seed(0)
    out = m.train_step({"caption": PROMPTS}, 0)
    assert set(out.losses) == {"generator", "fake_score"}
    gen, fake = m.parameter_groups()["generator"], m.parameter_groups()["fake_score"]
    g_on_fake = torch.autograd.grad(out.losses["generator"], fake, allow_unused=True, retain_graph=True)
    f_on_gen = torch.autograd.grad(out.losses["fake_score"], gen, allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().max()) == 0 for g in g_on_fake)
    assert all(g is None or float(g.abs().max()) == 0 for g in f_on_gen)
    assert any(g is not None and float(g.abs().max()) > 0 for g in torch.autograd.grad(out.losses["generator"], gen, allow_unused=True))
    assert m.optimizers_to_step(1) == ["fake_score"] and m.optimizers_to_step(2) == ["generator", "fake_score"]
    assert set(m.train_step({"caption": PROMPTS}, 1).losses) == {"fake_score"}


def test_fake_score_as_lora_on_the_teacher(teacher):
    m = make(DMD, teacher, fake_lora_rank=2)
    assert m.fake is m.teacher.net
    names = {n for n, p in m.fake.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    run(m, 2)
    assert any(float(p.detach().abs().max()) > 0 for n, p in m.fake.named_parameters() if "lora_B" in n)  # the adapters trained
    state = m.checkpoint_state_dict()
    assert all("lora_" in k for k in state if k.startswith("fake."))


def test_disback_without_a_path_is_dmd(teacher):
    a = make(DMD, teacher, fake_updates_per_generator_update=2)
    b = make(DisBack, teacher, fake_updates_per_generator_update=2, path_nodes=0)
    for m in (a, b):
        torch.manual_seed(7)
        run(m, 4)
    sa, sb = a.checkpoint_state_dict(), b.checkpoint_state_dict()
    assert sa.keys() == sb.keys()
    assert max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa) == 0.0
    assert b.reloads == [(0, 0)]  # the teacher from the start


def test_path_is_recorded_and_visited_in_reverse_ending_at_the_teacher(teacher, tmp_path):
    m = make(DisBack, teacher, max_steps=30, path_nodes=3, degradation_steps=6, interval=3, fake_updates_per_generator_update=2,
             path_dir=str(tmp_path / "path"))
    gen0 = {k: v.clone() for k, v in m.generator.state_dict().items()}
    run(m, 6)
    assert sorted(p.name for p in (tmp_path / "path").iterdir()) == ["node-001.safetensors", "node-002.safetensors", "node-003.safetensors"]
    assert all(torch.equal(v, m.generator.state_dict()[k]) for k, v in gen0.items())  # G0 frozen in stage 1
    from safetensors.torch import load_file

    node3 = load_file(str(tmp_path / "path" / "node-003.safetensors"))
    assert all(torch.equal(node3[k], v) for k, v in m.fake.state_dict().items())  # the fake starts stage 2 at s'_N
    run(m, 30, start=6)
    assert m.reloads == [(6, 2), (12, 1), (18, 0)]  # s'_2, s'_1, then the teacher to the end
    assert m.real_score() is None


def test_node_checks(teacher, tmp_path):
    path = tmp_path / "path"
    m = make(DisBack, teacher, max_steps=30, path_nodes=2, degradation_steps=2, interval=2, fake_updates_per_generator_update=1,
             path_dir=str(path))
    run(m, 2)
    m.load_node(1)  # a recorded node loads with every key
    (path / "node-001.safetensors").rename(path / "moved.safetensors")
    with pytest.raises(ModelLoadError, match="node 1 is missing"):
        m.load_node(1)
    (path / "node-001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="corrupt"):
        m.load_node(1)
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(3, 3)}, str(path / "node-001.safetensors"))
    with pytest.raises(ModelLoadError, match="not a score network"):
        m.load_node(1)


def test_bad_schedules_are_refused(teacher):
    with pytest.raises(ConfigError, match="multiple of disback.path_nodes"):
        DisBackConfig(path_nodes=3, degradation_steps=10)
    with pytest.raises(ConfigError, match="full score networks"):
        DisBackConfig(path_nodes=2, degradation_steps=4, fake_lora_rank=4)
    with pytest.raises(ConfigError, match="interval.*more than stage 2 has"):
        make(DisBack, teacher, max_steps=20, path_nodes=2, degradation_steps=4, interval=50, fake_updates_per_generator_update=1)
    with pytest.raises(ConfigError, match="no stage-2 iteration"):
        make(DisBack, teacher, max_steps=4, path_nodes=2, degradation_steps=4, interval=1)
    with pytest.raises(ConfigError, match="refused"):
        build_method(DMD, sections={"data": {"source": "digits"}}, teacher=str(teacher)).train_dataset()


def test_generator_ema_follows_generator_steps_only_and_samples_and_round_trips(teacher):
    m = make(DMD, teacher, fake_updates_per_generator_update=2, ema_decay=0.5)
    shadow0 = {k: v.clone() for k, v in m.ema.shadow.items()}
    run(m, 2)  # iteration 0 steps the generator (EMA moves), iteration 1 only the fake score
    moved = {k for k in shadow0 if not torch.equal(shadow0[k], m.ema.shadow[k])}
    assert moved, "the EMA did not follow the generator step"
    after_gen = {k: v.clone() for k, v in m.ema.shadow.items()}
    m.after_optimizer_step("fake_score", 1)
    assert all(torch.equal(after_gen[k], m.ema.shadow[k]) for k in after_gen)
    # samples and export use the EMA, not the online generator
    net = m.sampling_network()
    name = next(iter(moved))
    assert torch.equal(dict(net.named_parameters())[name], m.ema.shadow[name])
    assert not torch.equal(dict(m.generator.named_parameters())[name], m.ema.shadow[name])
    assert m.export_readout()[2]["weights_label"] == "EMA (decay 0.5)"
    state = m.checkpoint_state_dict()
    assert {k.split(".")[0] for k in state} == {"generator", "fake", "ema"}
    n = make(DMD, teacher, fake_updates_per_generator_update=2, ema_decay=0.5)
    n.load_checkpoint_state_dict(state)
    assert all(torch.equal(n.ema.shadow[k], m.ema.shadow[k]) for k in m.ema.shadow)
    with pytest.raises(ModelLoadError, match="no EMA.*dmd.ema_decay: 0"):
        n.load_checkpoint_state_dict({k: v for k, v in state.items() if not k.startswith("ema.")})
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        make(DMD, teacher, ema_decay=1.0)


def test_a_path_node_in_the_real_slot_is_guided_like_the_teacher(teacher):
    """CFG applies to whatever holds the real-score slot: a node with the teacher's weights gives the teacher's target."""
    m = make(DisBack, teacher, path_nodes=0, guidance_scale=3.0)
    node = __import__("copy").deepcopy(m.teacher.net)
    embeds = m.teacher.encode_prompt(PROMPTS[:2])
    x_t = torch.randn(m.teacher.latent_shape(2, 16, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 700])
    want = m.score_x0(None, x_t, t, embeds, 3.0)
    assert torch.allclose(m.score_x0(node, x_t, t, embeds, 3.0), want, atol=1e-5)
    assert not torch.allclose(m.score_x0(node, x_t, t, embeds, 1.0), want, atol=1e-3)  # guidance did something


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_v_and_flow_teachers_train_both_methods(kind, tmp_path):
    """DMD and DisBack on a v-prediction SD and a flow (Flux) teacher: the generator reads the last timestep
    (flow: sigma 1), both groups learn, the fake score's target is the teacher's prediction type."""
    from tiny_models import make_tiny_flux

    folder = make_tiny_flux(tmp_path / "flux") if kind == "flow" else make_tiny_sd(tmp_path / "sd-v", prediction_type="v_prediction")
    for cls, kw in ((DMD, {}), (DisBack, {"path_nodes": 1, "degradation_steps": 2, "interval": 1, "path_dir": str(tmp_path / "p")})):
        m = make(cls, folder, max_steps=6, fake_updates_per_generator_update=1, guidance_scale=2.0, **kw)
        assert m.teacher.schedule.kind == ("flow" if kind == "flow" else "vp") and m.gen_t == (1.0 if kind == "flow" else 999)
        gen0 = [p.detach().clone() for p in m.generator.parameters()]
        fake0 = [p.detach().clone() for p in m.fake.parameters()]
        run(m, 4)
        assert any(not torch.equal(a, b) for a, b in zip(gen0, m.generator.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(fake0, m.fake.parameters()))
        images = m.sample(PROMPTS[:2], 1, torch.Generator().manual_seed(0))
        assert torch.isfinite(images).all() and images.shape[:2] == (2, 3)
    if kind == "v_prediction":
        plan = m.export_plan()
        assert plan is not None
    else:
        from fastgen.pipelines.writer import ExportError

        with pytest.raises(ExportError, match="not supported yet"):
            m.export_plan()


def test_recipes_parse_and_their_schedules_fit():
    import dataclasses
    from pathlib import Path

    from fastgen.trainers.engine.run import load_run_config

    recipes = Path(__file__).resolve().parents[1] / "fastgen" / "recipes"
    dmd, cls = load_run_config(recipes / "dmd-digits.yaml")
    assert cls is DMD and dmd.data.source == "prompts" and dmd.sample.steps == 1
    disback, cls = load_run_config(recipes / "disback-digits.yaml")
    assert cls is DisBack
    # the digits pair differs only in the method's own section (stage 1 on top) and the iterations stage 1 takes
    cfg = disback.disback
    assert disback.train.max_steps - cfg.degradation_steps == dmd.train.max_steps
    assert {k: getattr(cfg, k) for k in vars(dmd.dmd)} == vars(dmd.dmd)
    assert disback.train == dataclasses.replace(dmd.train, max_steps=disback.train.max_steps)
    for name in ("disback-digits", "disback-sdxl"):
        run_cfg, _ = load_run_config(recipes / f"{name}.yaml")
        c, steps = run_cfg.disback, run_cfg.train.max_steps
        updates = (steps - c.degradation_steps) // c.fake_updates_per_generator_update
        assert c.interval * c.path_nodes <= updates, name  # the path reaches the teacher
