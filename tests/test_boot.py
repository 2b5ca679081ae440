"""BOOT (fastgen.trainers.boot) on tiny teachers: the signal-space DDIM step against diffusers' schedulers
(eps, v and flow teachers), the lambda-uniform grid, the loss (stop-gradient target, boundary term, batched
calls), data-freeness, the one-step export scheduler, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from fastgen.diffusion import NoiseSchedule, to_x0
from fastgen.diffusion.signal import point_from_signal, signal_coefficient, signal_ddim_step, signal_from_point, signal_grid
from fastgen.errors import ConfigError, ModelLoadError
from fastgen.pipelines.one_step import one_step_scheduler
from fastgen.pipelines.writer import ExportError
from fastgen.trainers.boot import BOOT, BOOTConfig
from fastgen.trainers.method import get_method
from tiny_models import build_method, make_tiny_flux, make_tiny_sd

RECIPES = Path(__file__).resolve().parents[1] / "fastgen" / "recipes"
PROMPTS = ["a red handwritten digit seven", "a blue handwritten digit three", "the digit zero written in green", "yellow digit five"]
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("boot") / "sd")


@pytest.fixture(scope="module")
def flux_teacher(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("boot") / "flux")


def make(teacher, **kw):
    sections = {"data": {"source": "prompts", "num_samples": 16}, **kw.pop("sections", {})}
    return build_method(BOOT, sections=sections, teacher=str(teacher), **kw)


def test_registered_and_recipes_parse():
    from fastgen.trainers.engine.run import load_run_config

    assert get_method("boot") is BOOT
    for name in ("boot-digits", "boot-sd15"):
        cfg, cls = load_run_config(RECIPES / f"{name}.yaml")
        assert cls is BOOT and cfg.data.source == "prompts" and cfg.sample.steps == 1
    assert load_run_config(RECIPES / "boot-sd15.yaml")[0].data.prompts.endswith(".txt")
    # a recipe without a data section is data-free by default
    assert load_run_config("boot")[0].data.source == "prompts"


# --------------------------------------------------------------------------- the signal-space step


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_signal_ddim_step_is_ddim_scheduler_step_in_signal_coordinates(prediction_type):
    config = dict(SD_BETAS, prediction_type=prediction_type, set_alpha_to_one=True, steps_offset=1)
    sched = DDIMScheduler(**config)
    schedule = NoiseSchedule.from_scheduler_config(sched.config)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        t = int(t)
        s = t - 1000 // 50  # DDIM's previous timestep (-19 at the last step: the final alpha, 1)
        eps = torch.randn(2, 4, 8, 8, generator=g)  # the trajectory's fixed starting noise
        y_t = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)  # the network's output at (x_t, t)
        (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(torch.tensor([t, t])), schedule.alpha_sigma(torch.tensor([s, s]))
        x_t = point_from_signal(y_t, eps, a_t, s_t)
        x_s = sched.step(out, t, x_t).prev_sample
        want = signal_from_point(x_s, eps, a_s, s_s)
        got = signal_ddim_step(y_t, to_x0(out, x_t, a_t, s_t, prediction_type), signal_coefficient(a_t, s_t, a_s, s_s))
        # float32 round-off grows with the value (|want| reaches ~8 here): 1e-5 absolute plus 1e-5 relative
        worst = max(worst, float(((got - want).abs() / (1.0 + want.abs())).max()))
    assert worst <= 1e-5, worst


def test_signal_step_of_a_flow_teacher_is_flow_match_euler_in_signal_coordinates():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    schedule = NoiseSchedule.from_scheduler_config(sched.config)
    assert schedule.kind == "flow"
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        sig_t, sig_s = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        eps, y_t, v = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        (a_t, s_t), (a_s, s_s) = (schedule.alpha_sigma(torch.tensor([x, x], dtype=torch.float64)) for x in (sig_t, sig_s))
        x_t = point_from_signal(y_t, eps, a_t.float(), s_t.float())
        sched._step_index = i  # the scheduler's own position for timestep t
        x_s = sched.step(v, t, x_t).prev_sample
        want = signal_from_point(x_s, eps, a_s.float(), s_s.float())
        got = signal_ddim_step(y_t, to_x0(v, x_t, a_t.float(), s_t.float(), "flow"), signal_coefficient(a_t, s_t, a_s, s_s))
        worst = max(worst, float((got - want).abs().max()))
    assert sched.sigmas[0] == 1.0 and sched.sigmas[-1] == 0.0  # both ends (alpha_t = 0, sigma_s = 0) are covered
    assert worst <= 1e-5, worst


def test_signal_coefficient_limits():
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    assert float(signal_coefficient(zero, one, torch.tensor([0.5]), torch.tensor([0.5]))) == 1.0  # flow sigma_t = 1
    assert float(signal_coefficient(torch.tensor([0.5]), torch.tensor([0.5]), one, zero)) == 1.0  # clean end
    a = torch.tensor([0.6])
    assert float(signal_coefficient(a, (1 - a**2).sqrt(), a, (1 - a**2).sqrt())) == pytest.approx(0.0, abs=1e-7)


def test_grid_is_lambda_uniform_distinct_and_ends_at_the_boundary():
    schedule = NoiseSchedule.from_scheduler_config(DDIMScheduler(**SD_BETAS).config)
    grid = signal_grid(schedule, 32)
    assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 33 and bool((grid[1:] > grid[:-1]).all())
    a, s = schedule.alpha_sigma(grid)
    coef = signal_coefficient(a[1:], s[1:], a[:-1], s[:-1])
    top = coef[10:]  # away from t = 0, where one timestep spans more log-SNR than an interval
    assert float(top.max() - top.min()) < 0.03 and 0.15 < float(top.mean()) < 0.2
    assert signal_grid(schedule, 8, t_max=500)[-1] == 500
    with pytest.raises(ConfigError, match="distinct timesteps"):
        signal_grid(schedule, 1200)
    flow = NoiseSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler().config)
    fgrid = signal_grid(flow, 8)
    assert float(fgrid[0]) == 0.0 and float(fgrid[-1]) == 1.0 and bool((fgrid[1:] > fgrid[:-1]).all())


# --------------------------------------------------------------------------- the loss


def test_loss_matches_its_definition_and_only_the_s_branch_has_gradient(teacher):
    m = make(teacher, num_intervals=8, delta=2, boundary="x0", boundary_weight=0.5, guidance_scale=2.0)
    embeds = m.teacher.encode_prompt(PROMPTS)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(m.teacher.latent_shape(4, 16, 16), generator=g)
    index = torch.tensor([2, 5, 8, 3])
    out = m.boot_loss(eps, embeds, index)
    assert out["target"].grad_fn is None and out["y_s"].requires_grad

    sched, grid = m.teacher.schedule, m.grid
    t, s, top = grid[index], grid[index - 2], grid[-1].expand(4)
    assert torch.equal(out["t"], t) and torch.equal(out["s"], s)
    uncond = m.teacher.encode_prompt([""])
    with torch.no_grad():
        y_t = m.teacher.forward(eps, t, embeds, net=m.student)
        a_t, s_t = sched.alpha_sigma(t)
        a_s, s_s = sched.alpha_sigma(s)
        x_t = a_t.view(-1, 1, 1, 1) * y_t + s_t.view(-1, 1, 1, 1) * eps
        f = m.teacher.predict(x_t, t, embeds, uncond, guidance=2.0)[0]
        c = 1 - (s_s.double() * a_t.double()) / (a_s.double() * s_t.double())
        target = y_t + c.float().view(-1, 1, 1, 1) * (f - y_t)
        y_s = m.teacher.forward(eps, s, embeds, net=m.student)
        bs = ((y_s - target).pow(2).mean((1, 2, 3)) / c.float().clamp(min=0.02) ** 2).mean()
        bc = (m.teacher.forward(eps, top, embeds, net=m.student) - m.teacher.predict(eps, top, embeds, uncond, guidance=2.0)[0]).pow(2).mean()
    assert float(out["loss_bs"].detach()) == pytest.approx(float(bs), rel=1e-4)
    assert float(out["loss_bc"].detach()) == pytest.approx(float(bc), rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(float(bs + 0.5 * bc), rel=1e-4)
    grads = torch.autograd.grad(out["loss"], m.parameter_groups()["student"], allow_unused=True)
    assert any(gr is not None and float(gr.abs().sum()) > 0 for gr in grads)
    assert not any(p.requires_grad for p in m.teacher.net.parameters())


def test_start_boundary_reads_the_trajectory_from_x_T_equal_eps(teacher):
    m = make(teacher, num_intervals=8, delta=1, boundary="start", guidance_scale=2.0)
    sched, grid = m.teacher.schedule, m.grid
    eps = torch.randn(m.teacher.latent_shape(2, 16, 16), generator=torch.Generator().manual_seed(4))
    a_T, s_T = sched.alpha_sigma(grid[-1:])
    start = m.start_signal(eps)
    assert torch.allclose(a_T * start + s_T * eps, eps, atol=1e-6)  # its point at T is the pure noise itself
    embeds = m.teacher.encode_prompt(PROMPTS[:2])
    out = m.boot_loss(eps, embeds, torch.tensor([8, 8]))  # both rows start at T: teacher-only targets
    uncond = m.teacher.encode_prompt([""])
    with torch.no_grad():
        f = m.teacher.predict(eps, grid[-1].expand(2), embeds, uncond, guidance=2.0)[0]
        c = m.coefficient(grid[-1].expand(2), grid[-2].expand(2))
        want = start + c.view(-1, 1, 1, 1) * (f - start)
        y_s = m.teacher.forward(eps, grid[-2].expand(2), embeds, net=m.student)
        bc = ((y_s - want).pow(2).mean((1, 2, 3)) / c.clamp(min=0.02) ** 2).mean()
    assert torch.allclose(out["target"], want, atol=1e-5) and torch.equal(out["s"], grid[-2].expand(2))
    assert float(out["loss_bc"].detach()) == pytest.approx(float(bc), rel=1e-4)
    assert float(out["loss_bs"].detach()) == pytest.approx(float(bc), rel=1e-4)  # the same rows, the same residual


def test_one_step_costs_two_student_calls_and_one_teacher_call(teacher):
    m = make(teacher, num_intervals=8, guidance_scale=3.0)
    calls = {"student": [], "teacher": []}
    hooks = [m.student.register_forward_hook(lambda mod, a, k, o: calls["student"].append(a[0].shape[0]), with_kwargs=True),
             m.teacher.net.register_forward_hook(lambda mod, a, k, o: calls["teacher"].append(a[0].shape[0]), with_kwargs=True)]
    try:
        m.train_step({"caption": PROMPTS, "index": torch.arange(4)}, 0)
    finally:
        for h in hooks:
            h.remove()
    # student: y_t (no grad, B), then s and T together (2B); teacher: [uncond; cond] x [x_t; eps] in one call (4B)
    assert calls == {"student": [4, 8], "teacher": [16]}


def test_training_is_data_free_and_moves_the_student_toward_its_targets(teacher):
    m = make(teacher, num_intervals=4, sections={"train": {"max_steps": 30}})
    ds = m.train_dataset()
    assert set(ds[0]) == {"caption", "index"}  # prompts only: no pixels, no latents
    encodes = []
    hook = m.teacher.vae.encoder.register_forward_hook(lambda *a: encodes.append(1))
    orig_encode = m.teacher.encode
    m.teacher.encode = lambda *a, **k: encodes.append(1) or orig_encode(*a, **k)
    opt = torch.optim.Adam(m.parameter_groups()["student"], lr=1e-2)
    losses = []
    try:
        for step in range(30):
            torch.manual_seed(0)  # the same noise and grid rows every step: the student must fit them
            out = m.train_step({"caption": [ds[i]["caption"] for i in range(4)]}, step)
            opt.zero_grad()
            out.losses["student"].backward()
            opt.step()
            losses.append(out.logs["loss"])
    finally:
        hook.remove()
        m.teacher.encode = orig_encode
    assert encodes == []
    assert losses[-1] < 0.85 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))


def test_sample_is_one_step_and_reproducible(teacher):
    m = make(teacher, num_intervals=4)
    a = m.sample(PROMPTS[:2], 1, torch.Generator().manual_seed(0))
    b = m.sample(PROMPTS[:2], 1, torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    with pytest.raises(ConfigError, match="exactly one step"):
        m.sample(PROMPTS[:2], 2, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="one-step generator"):
        make(teacher, sections={"sample": {"steps": 4}})


def test_checkpoint_round_trip_with_ema(teacher):
    m = make(teacher, num_intervals=4, ema_decay=0.5)
    with torch.no_grad():
        next(m.student.parameters()).add_(0.25)
    m.after_optimizer_step("student", 0)
    state = m.checkpoint_state_dict()
    assert {k.split(".")[0] for k in state} == {"student", "ema"}
    n = make(teacher, num_intervals=4, ema_decay=0.5)
    n.load_checkpoint_state_dict(state)
    assert torch.equal(next(n.student.parameters()), next(m.student.parameters()))
    assert torch.equal(next(iter(n.ema.shadow.values())), next(iter(m.ema.shadow.values())))
    with pytest.raises(ModelLoadError, match="no EMA"):
        n.load_checkpoint_state_dict({k: v for k, v in state.items() if k.startswith("student.")})
    with pytest.raises(ModelLoadError, match="does not fit"):
        n.load_checkpoint_state_dict({"student.nope": torch.zeros(1)})


# --------------------------------------------------------------------------- flow teachers


def test_flow_teacher_trains_and_its_export_is_refused_clearly(flux_teacher):
    m = make(flux_teacher, num_intervals=6, guidance_scale=2.0)
    assert m.teacher.schedule.kind == "flow" and float(m.grid[0]) == 0.0 and float(m.grid[-1]) == 1.0
    out = m.train_step({"caption": PROMPTS[:2]}, 0)
    loss = out.losses["student"]
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.student.parameters())
    assert m.sample(PROMPTS[:1], 1, torch.Generator().manual_seed(0)).shape[0] == 1
    with pytest.raises(ExportError, match="not supported yet"):
        m.export_plan()


def test_v_prediction_teacher_trains(tmp_path):
    m = make(make_tiny_sd(tmp_path / "sd-v", prediction_type="v_prediction"), num_intervals=6, boundary="start")
    assert m.teacher.prediction_type == "v_prediction"
    out = m.train_step({"caption": PROMPTS[:2]}, 0)
    assert torch.isfinite(out.losses["student"]) and out.logs["loss/bc"] > 0


# --------------------------------------------------------------------------- export scheduler


@pytest.mark.parametrize("timestep,prediction_type", [(0, "sample"), (999, "epsilon")])
def test_one_step_scheduler_returns_the_networks_x0(timestep, prediction_type):
    config = dict(DDIMScheduler(**SD_BETAS, set_alpha_to_one=False, steps_offset=1).config)
    sched = one_step_scheduler(config, timestep, prediction_type)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [timestep] and sched.init_noise_sigma == 1.0
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    schedule = NoiseSchedule.from_scheduler_config(sched.config)
    a, s = schedule.alpha_sigma(torch.tensor([timestep] * 2))
    assert torch.allclose(sched.step(out, timestep, x).prev_sample, to_x0(out, x, a, s, prediction_type), atol=1e-5)
    with pytest.raises(ExportError, match="timestep 0 or 999"):
        one_step_scheduler(config, 500, "sample")


# --------------------------------------------------------------------------- bad input


def test_delta_outside_the_grid_is_refused():
    for delta in (0, 9):
        with pytest.raises(ConfigError, match="outside the grid"):
            BOOTConfig(num_intervals=8, delta=delta)
    with pytest.raises(ConfigError, match="guidance_scale"):
        BOOTConfig(guidance_scale=0.5)
    with pytest.raises(ConfigError, match="boundary must be"):
        BOOTConfig(boundary="end")


def test_an_image_data_set_is_refused(teacher, tmp_path):
    m = make(teacher, sections={"data": {"source": "digits"}})
    with pytest.raises(ConfigError, match="data-free.*refused"):
        m.train_dataset()


def test_a_teacher_without_an_x0_estimate_at_the_boundary_is_refused(teacher, tmp_path):
    folder = tmp_path / "zero-snr"
    shutil.copytree(teacher, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "rescale_betas_zero_snr": True}))
    with pytest.raises(ConfigError, match="no x0-estimate.*t_max"):
        make(folder)
    m = make(folder, t_max=990)  # below the zero-SNR end the epsilon teacher's x0-estimate exists
    assert int(m.grid[-1]) == 990
    v_folder = tmp_path / "zero-snr-v"
    shutil.copytree(folder, v_folder)
    (v_folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "rescale_betas_zero_snr": True,
                                                                              "prediction_type": "v_prediction"}))
    assert int(make(v_folder).grid[-1]) == 999  # v-prediction gives x0 = alpha x - sigma v even at alpha = 0
