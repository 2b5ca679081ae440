"""fastgen.diffusion checked against the installed diffusers schedulers (max abs diff <= 1e-5)."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from fastgen.diffusion import (
    PREDICTION_TYPES,
    NoiseSchedule,
    consistency_output,
    consistency_scalings,
    convert,
    ddim_sde_step,
    ddim_step,
    ddim_timesteps,
    euler_flow_step,
    flow_sigmas,
    from_x0_eps,
    lcm_timesteps,
    multistep_consistency_sample,
    sample_ddim,
    sample_flow_euler,
    skip_grid,
    to_eps,
    to_x0,
    to_x0_eps,
)
from fastgen.errors import ConfigError, ModelLoadError

TOL = 1e-5
SHAPE = (2, 4, 8, 8)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
VP_CONFIGS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": SD_BETAS,
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "v_zero_snr": dict(SD_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True),
}


def maxdiff(a, b):
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def linear_model(seed=1):
    """A fixed random linear map of x over channels: a stand-in network."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(4, 4, generator=g) * 0.3 + torch.eye(4) * 0.5

    def fn(x, t=None):
        return torch.einsum("ij,bjhw->bihw", m, x)

    return fn


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", sorted(VP_CONFIGS))
def test_vp_alphas_match_ddim(name):
    ref = DDIMScheduler(**VP_CONFIGS[name])
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    assert sched.kind == "vp"
    assert sched.prediction_type == ref.config.prediction_type
    assert sched.alphas_cumprod.dtype == torch.float64 and sched.alphas_cumprod.shape == (1000,)
    assert maxdiff(sched.alphas_cumprod, ref.alphas_cumprod) <= 1e-7
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    alpha, sigma = sched.alpha_sigma(t)
    assert alpha.dtype == torch.float32 and alpha.shape == t.shape
    assert maxdiff(alpha, ref.alphas_cumprod[t] ** 0.5) <= TOL
    assert maxdiff(sigma, (1 - ref.alphas_cumprod[t]) ** 0.5) <= TOL
    a_final, s_final = sched.alpha_sigma(torch.tensor([-1, 10]))
    assert a_final[0].item() == 1.0 and s_final[0].item() == 0.0
    assert maxdiff(a_final[1], ref.alphas_cumprod[10] ** 0.5) <= TOL


def test_vp_add_noise_velocity_and_log_snr():
    ref = DDIMScheduler(**VP_CONFIGS["v_zero_snr"])
    sched = NoiseSchedule.from_scheduler_config(dict(ref.config))
    assert sched.prediction_type == "v_prediction"
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([37, 999])  # per-sample timesteps broadcast against [B, C, H, W]
    assert maxdiff(sched.add_noise(x0, eps, t), ref.add_noise(x0, eps, t)) <= TOL
    alpha, sigma = sched.alpha_sigma(t)
    assert sigma[1].item() == pytest.approx(1.0) and alpha[1].item() == pytest.approx(0.0, abs=1e-7)  # zero SNR
    v = from_x0_eps(x0, eps, alpha, sigma, "v_prediction")
    assert maxdiff(v, ref.get_velocity(x0, eps, t)) <= TOL
    lam = sched.log_snr(torch.tensor([-1, 5, 500]))
    acp = ref.alphas_cumprod.double()
    assert lam[0].item() == float("inf")
    assert maxdiff(lam[1:], torch.log(acp[[5, 500]] / (1 - acp[[5, 500]]))) <= TOL
    assert torch.equal(sched.model_timestep(t), t)


def test_flow_schedule_matches_flowmatch():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    assert (sched.kind, sched.prediction_type, sched.shift) == ("flow", "flow", 3.0)
    grid = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    assert maxdiff(sched.shifted_sigma(grid), ref.sigmas) <= TOL
    for n in (1, 4, 28):
        ref.set_timesteps(n)
        mine = flow_sigmas(n, shift=3.0)
        assert mine.shape == ref.sigmas.shape and mine[-1].item() == 0.0
        assert maxdiff(mine, ref.sigmas) <= TOL
        assert maxdiff(sched.model_timestep(mine[:-1]), ref.timesteps) <= 1e-3  # timesteps are sigma * 1000
    # forward process x_t = (1 - s) x0 + s eps, as scale_noise
    ref.set_timesteps(4)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ref.timesteps[1:2]
    s = ref.sigmas[1:2].expand(2)
    assert maxdiff(sched.add_noise(x0, eps, s), ref.scale_noise(x0, t, eps)) <= TOL
    a, sg = sched.alpha_sigma(s)
    assert maxdiff(a + sg, torch.ones(2)) <= TOL and maxdiff(sg, s) == 0.0
    assert maxdiff(sched.log_snr(torch.tensor([0.25])), torch.tensor([2 * torch.log(torch.tensor(3.0)).item()])) <= TOL


def test_flow_dynamic_shift_matches_flowmatch():
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched = NoiseSchedule.from_scheduler_config(dict(ref.config))
    assert sched.use_dynamic_shifting
    for mu in (0.5, 1.15):
        ref.set_timesteps(6, mu=mu)
        assert maxdiff(flow_sigmas(6, mu=mu, use_dynamic_shifting=True), ref.sigmas) <= TOL
        base = torch.linspace(1.0, 1 / 1000, 6, dtype=torch.float64)
        assert maxdiff(sched.shifted_sigma(base, mu=mu), ref.sigmas[:-1]) <= TOL
    with pytest.raises(ValueError, match="mu"):
        sched.shifted_sigma(torch.tensor([0.5]))


FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
)


def test_training_sigma_dynamic_shift_is_the_unshifted_training_grid():
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    assert sched.use_dynamic_shifting
    # the grid: exactly what the scheduler stores at __init__ (no shift applied there with dynamic shifting)
    assert torch.equal(sched.training_sigma_grid(), ref.sigmas)
    assert torch.equal(sched.training_sigma_grid(), ref.timesteps / 1000)
    u = 1.0 - torch.rand(200_000, generator=torch.Generator().manual_seed(0))  # U(0, 1]
    sigma = sched.training_sigma(u)
    assert sigma.shape == u.shape and sigma.dtype == torch.float32
    # indexed like the training scripts: timesteps[int(u * T)] / T (u = 1 clamps to the last entry)
    index = (u * 1000).long().clamp(max=999)
    assert torch.equal(sigma, ref.timesteps[index] / 1000)
    assert bool(torch.isin(sigma, ref.sigmas).all())  # every value lies on the training grid
    p_high = (sigma > 0.5).float().mean().item()
    assert abs(p_high - 0.5) <= 0.01
    # ... and it is not the resolution-shifted draw (1024 px -> 4096 tokens -> mu = max_shift = 1.15)
    shifted = sched.shifted_sigma(u, mu=1.15)
    p_shifted = (shifted > 0.5).float().mean().item()
    assert p_shifted > 0.7 and abs(p_high - p_shifted) > 0.2
    # the ends of U(0, 1]: u -> 0 is sigma = 1, u = 1 is sigma = 1/T
    ends = sched.training_sigma(torch.tensor([1e-9, 1.0]))
    assert ends.tolist() == [1.0, ref.sigmas[-1].item()]
    assert sched.training_sigma(torch.tensor([0.25], dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_sigma_static_shift_is_continuous(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    assert torch.equal(sched.training_sigma_grid(), ref.sigmas)
    u = 1.0 - torch.rand(10_000, generator=torch.Generator().manual_seed(1))
    sigma = sched.training_sigma(u)
    assert torch.equal(sigma, sched.shifted_sigma(u, None))
    if shift == 1.0:  # the shipped digits DiT: sigma == u bit for bit
        assert torch.equal(sigma, u)
    else:
        assert torch.equal(sigma, shift * u / (1 + (shift - 1) * u))
    with pytest.raises(ValueError, match="flow schedules only"):
        NoiseSchedule.from_scheduler_config(DDIMScheduler().config).training_sigma(u)


def test_flow_detected_without_class_name_and_pretrained(tmp_path):
    sched = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000, "shift": 2.0})
    assert (sched.kind, sched.shift) == ("flow", 2.0)
    assert maxdiff(sched.shifted_sigma(torch.tensor([0.5])), torch.tensor([2 * 0.5 / 1.5])) <= TOL
    ref = DDIMScheduler(**SD_BETAS, prediction_type="v_prediction")
    ref.save_pretrained(tmp_path / "pipe" / "scheduler")
    loaded = NoiseSchedule.from_pretrained(tmp_path / "pipe")
    assert loaded.prediction_type == "v_prediction"
    assert maxdiff(loaded.alphas_cumprod, ref.alphas_cumprod) <= 1e-7
    (tmp_path / "flat").mkdir()
    flat_config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    (tmp_path / "flat" / "scheduler_config.json").write_text(json.dumps(flat_config))
    assert NoiseSchedule.from_pretrained(tmp_path / "flat").shift == 3.0
    with pytest.raises(ModelLoadError, match="scheduler_config.json"):
        NoiseSchedule.from_pretrained(tmp_path / "missing")


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError) as err:
        NoiseSchedule.from_scheduler_config({"beta_schedule": "cosine_weird", "beta_start": 0.0001})
    msg = str(err.value)
    assert "cosine_weird" in msg and all(s in msg for s in ("linear", "scaled_linear", "squaredcos_cap_v2"))
    with pytest.raises(ConfigError) as err:
        NoiseSchedule.from_scheduler_config({"beta_start": 0.0001, "prediction_type": "x0_weird"})
    assert "x0_weird" in str(err.value) and "v_prediction" in str(err.value)
    with pytest.raises(ConfigError, match="trailing"):
        ddim_timesteps(4, timestep_spacing="sideways")
    with pytest.raises(ConfigError, match="epsilon"):
        to_x0(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "noise")


# ---------------------------------------------------------------- DDIM


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [50, 4])
@pytest.mark.parametrize("offset", [0, 1])
def test_ddim_timesteps(spacing, n, offset):
    ref = DDIMScheduler(steps_offset=offset, timestep_spacing=spacing)
    ref.set_timesteps(n)
    mine = ddim_timesteps(n, 1000, steps_offset=offset, timestep_spacing=spacing)
    assert mine.dtype == torch.long and torch.equal(mine, ref.timesteps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("alpha_one", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches(prediction_type, alpha_one, spacing):
    ref = DDIMScheduler(
        **SD_BETAS, prediction_type=prediction_type, set_alpha_to_one=alpha_one, clip_sample=False,
        steps_offset=1, timestep_spacing=spacing,
    )
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    n = 4
    ref.set_timesteps(n)
    for t in ref.timesteps:  # every step, the final one included
        x, out = torch.randn(SHAPE), torch.randn(SHAPE)
        expected = ref.step(out, t, x).prev_sample
        prev = int(t) - 1000 // n
        if prev < 0:
            prev = -1 if alpha_one else 0
        a, s = sched.alpha_sigma(torch.full((2,), int(t)))
        a_to, s_to = sched.alpha_sigma(torch.full((2,), prev))
        x0, eps = to_x0_eps(out, x, a, s, prediction_type)
        assert maxdiff(ddim_step(x0, eps, a_to, s_to), expected) <= TOL


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_sde_step_matches(eta):
    ref = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    ref.set_timesteps(10)
    for t in ref.timesteps[[0, 5, 9]]:
        x, out, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        prev = max(int(t) - 100, 0)
        a, s = sched.alpha_sigma(torch.tensor([int(t)] * 2))
        a_to, s_to = sched.alpha_sigma(torch.tensor([prev] * 2))
        x0, eps = to_x0_eps(out, x, a, s, "epsilon")
        got = ddim_sde_step(x0, eps, a, s, a_to, s_to, eta, noise)
        assert maxdiff(got, expected) <= TOL
        if int(t) >= 100:  # the noise really enters (the last step to abar_0 has zero variance)
            assert maxdiff(got, ddim_step(x0, eps, a_to, s_to)) > 1e-3


@pytest.mark.parametrize("alpha_one", [True, False])
def test_sample_ddim_matches_loop(alpha_one):
    model = linear_model()
    ref = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=alpha_one, timestep_spacing="trailing")
    ref.set_timesteps(4)
    x_T = torch.randn(SHAPE)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(model(x), t, x).prev_sample
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    seen = []

    def model_fn(x_t, t):
        seen.append(t)
        return model(x_t)

    got = sample_ddim(model_fn, x_T, sched, ref.timesteps, final_alpha_one=alpha_one)
    assert maxdiff(got, x) <= TOL
    assert [int(t[0]) for t in seen] == ref.timesteps.tolist() and seen[0].shape == (2,)


def denoiser_model(alphas_cumprod, seed=1):
    """A stand-in epsilon/v network that keeps the DDIM chain of O(1) size: ``sqrt(1 - abar_t) * M x`` with ``M``
    close to the identity (the optimal epsilon of unit-variance data is ``sqrt(1 - abar_t) * x``). Long chains
    of :func:`linear_model` grow to |x| ~ 50, where float32 rounding alone exceeds 1e-5."""
    g = torch.Generator().manual_seed(seed)
    m = torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g)

    def fn(x, t):
        t = int(torch.as_tensor(t).flatten()[0])  # one timestep for the whole batch
        return (1 - alphas_cumprod[t]).sqrt() * torch.einsum("ij,bjhw->bihw", m, x)

    return fn


def _ddim_reference(model, x_T, ref, n):
    """A plain DDIMScheduler sampling loop: the ground truth for sample_ddim."""
    ref.set_timesteps(n)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [50, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sample_ddim_matches_scheduler_every_spacing(spacing, n, prediction_type):
    """DDIMScheduler.step goes from t to t - T // n (not to the next listed timestep): with "linspace" the two differ
    by up to one timestep at 50 steps, and with "trailing" at 3 steps (999 -> 666 -> 333, listed 999, 666, 332)."""
    ref = DDIMScheduler(
        **SD_BETAS, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing=spacing,
    )
    model = denoiser_model(ref.alphas_cumprod, seed=4)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    expected = _ddim_reference(model, x_T, ref, n)
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    seen = []

    def model_fn(x_t, t):
        seen.append(int(t[0]))
        return model(x_t, t)

    got = sample_ddim(model_fn, x_T, sched, ref.timesteps)
    assert maxdiff(got, expected) <= TOL
    assert seen == ref.timesteps.tolist()  # the network is evaluated at the listed timesteps
    # the same timesteps built by fastgen (an int: timesteps from the spacing and the offset)
    got_n = sample_ddim(model, x_T, sched, n, timestep_spacing=spacing, steps_offset=1)
    assert maxdiff(got_n, expected) <= TOL


def test_sample_ddim_partial_timesteps_keep_the_step_of_the_full_schedule():
    """img2img-style: a tail of the timesteps with the step size of the full n-step schedule."""
    ref = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, timestep_spacing="linspace")
    model = denoiser_model(ref.alphas_cumprod, seed=5)
    ref.set_timesteps(50)
    tail = ref.timesteps[20:]
    x_T = torch.randn(SHAPE)
    x = x_T.clone()
    for t in tail:
        x = ref.step(model(x, t), t, x).prev_sample
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    got = sample_ddim(model, x_T, sched, tail, num_inference_steps=50)
    assert maxdiff(got, x) <= TOL
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample_ddim(model, x_T, sched, tail, num_inference_steps=0)


# ---------------------------------------------------------------- flow


def test_flow_euler_matches_flowmatch():
    model = linear_model(2)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(4)
    x_T = torch.randn(SHAPE)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(model(x), t, x).prev_sample
    sigmas = flow_sigmas(4, shift=3.0)
    # one step
    v = model(x_T)
    assert maxdiff(euler_flow_step(x_T, v, sigmas[0], sigmas[1]), x_T + (ref.sigmas[1] - ref.sigmas[0]) * v) <= TOL
    assert maxdiff(sample_flow_euler(lambda x_t, s: model(x_t), x_T, sigmas), x) <= TOL
    # DDIM on a flow schedule is the same Euler ODE step
    sched = NoiseSchedule.from_scheduler_config(ref.config)
    assert maxdiff(sample_ddim(lambda x_t, s: model(x_t), x_T, sched, sigmas[:-1]), x) <= TOL


# ---------------------------------------------------------------- conversions


def _pairs(kind):
    B = SHAPE[0]
    if kind == "flow":
        sigma = torch.tensor([0.3, 0.8])
        return 1 - sigma, sigma
    lam = torch.tensor([-1.2, 2.0])  # log-SNR, alpha^2 + sigma^2 = 1
    return torch.sigmoid(lam).sqrt()[:B], torch.sigmoid(-lam).sqrt()[:B]


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_round_trips(prediction_type):
    alpha, sigma = _pairs("flow" if prediction_type == "flow" else "vp")
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    out = from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    rx0, reps = to_x0_eps(out, x_t, alpha, sigma, prediction_type)
    assert maxdiff(rx0, x0) <= TOL and maxdiff(reps, eps) <= TOL
    assert maxdiff(to_x0(out, x_t, alpha, sigma, prediction_type), x0) <= TOL
    assert maxdiff(to_eps(out, x_t, alpha, sigma, prediction_type), eps) <= TOL
    # raw output -> (x0, eps) -> raw output
    raw = torch.randn(SHAPE)
    rx0, reps = to_x0_eps(raw, x_t, alpha, sigma, prediction_type)
    assert maxdiff(from_x0_eps(rx0, reps, alpha, sigma, prediction_type), raw) <= TOL
    others = ("epsilon", "sample", "flow") if prediction_type == "flow" else ("epsilon", "v_prediction", "sample")
    for other in others:
        o = convert(out, x_t, alpha, sigma, prediction_type, other)
        assert maxdiff(o, from_x0_eps(x0, eps, alpha, sigma, other)) <= TOL
        assert maxdiff(convert(o, x_t, alpha, sigma, other, prediction_type), out) <= TOL


def test_flow_prediction_definition():
    sigma = torch.tensor([0.25, 0.9])
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    x_t = (1 - sigma).view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    u = eps - x0
    assert maxdiff(from_x0_eps(x0, eps, 1 - sigma, sigma, "flow"), u) == 0.0
    assert maxdiff(to_x0(u, x_t, 1 - sigma, sigma, "flow"), x0) <= TOL
    assert maxdiff(to_eps(u, x_t, 1 - sigma, sigma, "flow"), eps) <= TOL


# ---------------------------------------------------------------- consistency


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_timesteps(n):
    ref = LCMScheduler()
    ref.set_timesteps(n)
    mine = lcm_timesteps(n)
    assert mine.dtype == torch.long and torch.equal(mine, ref.timesteps)
    ref.set_timesteps(n, original_inference_steps=25, strength=0.6)
    assert torch.equal(lcm_timesteps(n, original_inference_steps=25, strength=0.6), ref.timesteps)


def test_skip_grid_is_lcm_distillation_grid():
    grid = skip_grid(1000, 50)
    assert grid[0].item() == 19 and grid[-1].item() == 999 and bool((grid.diff() == 20).all())
    ref = LCMScheduler()
    ref.set_timesteps(50)
    assert torch.equal(grid.flip(0), ref.timesteps)


def test_consistency_scalings_match():
    ref = LCMScheduler()
    ts = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = consistency_scalings(ts)
    for i, t in enumerate(ts):
        r_skip, r_out = ref.get_scalings_for_boundary_condition_discrete(t)
        assert abs(c_skip[i].item() - float(r_skip)) <= TOL and abs(c_out[i].item() - float(r_out)) <= TOL
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    x, x0 = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 999])
    f = consistency_output(x, x0, t)
    assert maxdiff(f[0], x[0]) <= TOL
    assert maxdiff(f[1], c_skip[-1] * x[1] + c_out[-1] * x0[1]) <= TOL


@pytest.mark.parametrize("n", [1, 4])
def test_multistep_consistency_matches_lcm(n):
    model = linear_model(3)  # an epsilon-prediction network
    ref = LCMScheduler()
    ref.set_timesteps(n)
    x_T = torch.randn(SHAPE)
    gen = torch.Generator().manual_seed(123)
    x = x_T.clone()
    for t in ref.timesteps:
        x, denoised = ref.step(model(x), t, x, generator=gen, return_dict=False)
    sched = NoiseSchedule.from_scheduler_config(ref.config)

    def denoise_fn(x_t, t):
        a, s = sched.alpha_sigma(t)
        return consistency_output(x_t, to_x0(model(x_t), x_t, a, s, "epsilon"), t)

    got = multistep_consistency_sample(
        denoise_fn, x_T, sched, lcm_timesteps(n), generator=torch.Generator().manual_seed(123)
    )
    assert maxdiff(got, denoised) <= TOL
    if n > 1:  # a different seed changes the result, so the noise really is drawn from the generator
        other = multistep_consistency_sample(
            denoise_fn, x_T, sched, lcm_timesteps(n), generator=torch.Generator().manual_seed(7)
        )
        assert maxdiff(other, denoised) > 1e-3


def test_multistep_consistency_noise_fn():
    sched = NoiseSchedule.from_scheduler_config(LCMScheduler().config)
    x_T = torch.randn(SHAPE)
    ts = torch.tensor([999, 499])
    got = multistep_consistency_sample(lambda x, t: 0.5 * x, x_T, sched, ts, noise_fn=torch.zeros_like)
    a, _ = sched.alpha_sigma(torch.tensor(499))
    assert maxdiff(got, 0.5 * (a * 0.5 * x_T)) <= TOL
