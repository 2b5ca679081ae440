"""LCD of flow-matching (Flux) teachers, against diffusers' own flow schedulers.

Independent references: ``FlowMatchEulerDiscreteScheduler.step`` for the teacher's solver step,
``FlowMatchLCMScheduler`` (``set_timesteps`` as FluxPipeline calls it, then ``step``) for the
student's multistep sampling, and a stock ``FluxPipeline`` loaded from the export.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen.diffusion import flow_skip_grid, flux_mu, pipeline_flow_sigmas
from fastgen.errors import ConfigError
from fastgen.models.teacher import pack_latents, unpack_latents
from fastgen.trainers.consistency import consistency_distillation_loss
from fastgen.trainers.lcd import LCD
from tiny_models import build_method, make_tiny_flux

PROMPTS = ["a photo of a cat", "a dog running on the beach", "a red car"]
RES = 32  # 16x16 latents through the tiny factor-2 VAE: 64 packed tokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcd-flow")
    return {"plain": make_tiny_flux(root / "flux"), "embedded": make_tiny_flux(root / "flux-g", guidance_embeds=True)}


def make(folder, **kw) -> LCD:
    kw.setdefault("resolution", RES)
    kw.setdefault("w_min", 1.0)
    kw.setdefault("w_max", 3.0)
    return build_method(LCD, teacher=str(folder), sections={"teacher": {"max_sequence_length": 16}}, **kw)


def test_grids_match_the_stock_schedulers():
    """The training grid holds every stock sampling schedule whose step count divides it, and the sampling
    sigmas are FlowMatchLCMScheduler's as FluxPipeline sets them (static and dynamic shifting)."""
    from diffusers import FlowMatchLCMScheduler

    from fastgen.diffusion import NoiseSchedule

    for cfg in ({"shift": 1.0}, {"shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}):
        sched = FlowMatchLCMScheduler(num_train_timesteps=1000, **cfg)
        schedule = NoiseSchedule.from_scheduler_config(sched.config)
        mu = flux_mu(64, dict(sched.config))
        grid = flow_skip_grid(48, schedule, mu)
        assert grid.shape == (48,) and bool((grid[1:] > grid[:-1]).all()) and abs(float(grid[-1]) - 1.0) < 1e-6
        for n in (1, 2, 3, 4, 8):
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
            ours = pipeline_flow_sigmas(n, schedule, mu)
            assert torch.equal(ours, sched.sigmas.float()), (cfg, n)
            on_grid = [(grid - s).abs().min().item() for s in ours[:-1]]
            assert max(on_grid) < 1e-6, (cfg, n)  # every sampling sigma is a training sigma


def test_student_starts_as_the_teacher_and_the_guidance_embedding_is_learnt(flux):
    m = make(flux["plain"])
    student = m.nets.student
    assert student.config.guidance_embeds and not m.teacher.net.config.guidance_embeds
    cond = m.teacher.encode_prompt(PROMPTS[:2])
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        want = m.teacher.forward(x, t, cond)
        for g in (1.0, 4.0):
            got = m.teacher.forward(x, t, cond, guidance_embed=torch.tensor([g, g]), net=student)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    loss = m.train_step({"pixels": torch.rand(2, 3, RES, RES) * 2 - 1, "caption": PROMPTS[:2]}, 0).losses["student"]
    loss.backward()
    assert student.time_text_embed.guidance_embedder.linear_2.weight.grad.abs().sum() > 0


def test_solver_step_is_flow_match_euler_with_guidance(flux):
    """x_end of the loss = FlowMatchEulerDiscreteScheduler.step from sigma_s to sigma_e on the teacher's CFG
    velocity (cond and uncond in one batched forward); pairs are neighbours on the grid, sigma_0 = 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = make(flux["plain"], num_ddim_timesteps=8)
    calls = []
    hook = m.teacher.net.register_forward_hook(lambda mod, a, kw_out: calls.append(1))
    z0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    w = torch.tensor([1.0, 2.0, 3.0])
    cond = m.teacher.encode_prompt(PROMPTS)
    try:
        res = consistency_distillation_loss(m.nets, z0, cond, torch.tensor([0, 3, 7]), noise, w)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert res["t_start"].tolist() == pytest.approx([0.125, 0.5, 1.0]) and res["t_end"].tolist() == pytest.approx([0.0, 0.375, 0.875])
    uncond = m.teacher.encode_prompt([""] * 3)
    sched = FlowMatchEulerDiscreteScheduler.from_config(m.teacher.pipeline().scheduler.config)
    with torch.no_grad():
        x_s = res["x_start"]
        torch.testing.assert_close(x_s, (1 - res["t_start"]).view(-1, 1, 1, 1) * z0 + res["t_start"].view(-1, 1, 1, 1) * noise)
        c, u = m.teacher.forward(x_s, res["t_start"], cond), m.teacher.forward(x_s, res["t_start"], uncond)
        v = u + (w + 1).view(-1, 1, 1, 1) * (c - u)
        for i in range(3):
            s, e = float(res["t_start"][i]), float(res["t_end"][i])
            sched.set_timesteps(sigmas=[s, e] if e > 0 else [s])
            ref = sched.step(pack_latents(v[i : i + 1]), sched.timesteps[0], pack_latents(x_s[i : i + 1])).prev_sample
            diff = (unpack_latents(ref, 16, 16) - res["x_end"][i : i + 1]).abs().max().item()
            assert diff <= 1e-5, (i, diff)


def test_guidance_distilled_teacher_runs_once_without_cfg(flux):
    """FLUX.1-dev's layout: the teacher reads w + 1 from its guidance embedding (no unconditional pass)."""
    m = make(flux["embedded"])
    sizes = []
    hook = m.teacher.net.register_forward_hook(lambda mod, a, kw_out: sizes.append(1))
    z0, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    cond = m.teacher.encode_prompt(PROMPTS[:2])
    w = torch.tensor([1.5, 2.5])
    try:
        res = consistency_distillation_loss(m.nets, z0, cond, torch.tensor([10, 40]), noise, w)
    finally:
        hook.remove()
    assert len(sizes) == 1
    with torch.no_grad():
        x0, eps = m.teacher.predict(res["x_start"], res["t_start"], cond, None, guidance=w + 1)
        e = res["t_end"].view(-1, 1, 1, 1)
        torch.testing.assert_close(res["x_end"], (1 - e) * x0 + e * eps, atol=1e-5, rtol=1e-5)


def test_sampling_is_flow_match_lcm_scheduler(flux):
    """The in-process student sampler = FlowMatchLCMScheduler's loop as FluxPipeline runs it (sigmas, x0 = x - sigma v,
    re-noise from torch's global generator seeded like the sampler), max abs diff <= 1e-5, at 1, 2 and 4 steps."""
    from diffusers import FlowMatchLCMScheduler

    m = make(flux["plain"])
    net = m.nets.student
    with torch.no_grad():  # a student that differs from the teacher, so the check is not vacuous
        net.time_text_embed.guidance_embedder.linear_2.weight.normal_(0, 0.02)
    cond = m.teacher.encode_prompt(PROMPTS[:2])
    sched = FlowMatchLCMScheduler.from_config(m.teacher.pipeline().scheduler.config)
    g = 2.5
    for steps in (1, 2, 4):
        gen = torch.Generator().manual_seed(7)
        x_T = torch.randn(m.teacher.latent_shape(2, RES, RES), generator=gen)
        latents = pack_latents(x_T)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=m.nets.mu)
        torch.manual_seed(7)
        with torch.no_grad():
            for t in sched.timesteps:
                v = m.teacher.forward(unpack_latents(latents, 16, 16), t / 1000, cond, guidance_embed=torch.full((2,), g), net=net)
                latents = sched.step(pack_latents(v), t, latents).prev_sample
        want = unpack_latents(latents, 16, 16)
        got = {}

        def grab(z, _got=got):
            _got["z"] = z
            return torch.zeros(z.shape[0], 3, RES, RES)

        decode, m.teacher.decode = m.teacher.decode, grab
        try:
            m.nets.sample(PROMPTS[:2], steps, torch.Generator().manual_seed(7), g, weights="online")
        finally:
            m.teacher.decode = decode
        diff = (got["z"] - want).abs().max().item()
        assert diff <= 1e-5, (steps, diff)


def test_export_loads_in_stock_flux_pipeline_and_reproduces_the_student(flux, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchLCMScheduler, FluxPipeline

    from fastgen.pipelines.writer import write_pipeline

    m = make(flux["plain"])
    with torch.no_grad():
        for p in m.nets.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = write_pipeline(m.export_plan(), tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    assert pipe.transformer.config.guidance_embeds
    for steps in (1, 2, 4):
        want = m.sample(PROMPTS[:2], steps, torch.Generator().manual_seed(3), guidance_scale=2.0)
        torch.manual_seed(3)
        got = pipe(PROMPTS[:2], num_inference_steps=steps, guidance_scale=2.0, height=RES, width=RES, max_sequence_length=16,
                   generator=torch.Generator().manual_seed(3), output_type="pt").images
        assert (got - want).abs().max().item() <= 1e-5, steps


def test_unsupported_combinations_are_clear_errors(flux):
    from fastgen.trainers.scott import SCott

    with pytest.raises(ConfigError, match="lora with a flow-matching"):
        make(flux["plain"], lora=True)
    with pytest.raises(ConfigError, match="SCott distils sd / sdxl"):
        build_method(SCott, teacher=str(flux["plain"]), resolution=RES)


@pytest.mark.parametrize("name", ["lcd-flux-digits", "lcd-flux-dev"])
def test_flow_recipes_parse_and_their_schedules_lie_on_the_grid(name):
    from pathlib import Path

    from fastgen.trainers.engine.run import load_run_config

    run_cfg, cls = load_run_config(Path(__file__).resolve().parents[1] / "fastgen" / "recipes" / f"{name}.yaml")
    assert cls is LCD and not run_cfg.lcd.lora
    n = run_cfg.lcd.num_ddim_timesteps
    assert all(n % steps == 0 for steps in (1, 2, 4)), "the 1/2/4-step schedules must lie on the training grid"
    assert run_cfg.lcd.w_min <= run_cfg.sample.guidance_scale - 1 <= run_cfg.lcd.w_max  # sampled inside the trained range
    if name == "lcd-flux-dev":
        assert run_cfg.teacher.resolution == 1024 and run_cfg.teacher.max_sequence_length == 512
