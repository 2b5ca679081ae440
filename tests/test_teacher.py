"""Tests of fastgen.models (Teacher, PromptEmbeds, load_pipeline) on tiny random pipelines.

Every comparison is against the stock diffusers pipeline built from the same folder: its
``encode_prompt``, its network call conventions (SDXL time ids, Flux packing / ids /
timestep/1000) and its full sampling loop with ``output_type="latent"``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastgen.diffusion import to_x0_eps
from fastgen.errors import ModelLoadError, ResolutionError
from fastgen.models import PromptEmbeds, Teacher, load_pipeline, pack_latents, unpack_latents
from tiny_models import make_tiny_flux, make_tiny_pixart, make_tiny_sd, make_tiny_sd3, make_tiny_sdxl

SEQ = 16  # T5 max_sequence_length of the tiny Flux / SD3 / PixArt teachers
PROMPTS = ["a photo of a cat", "a blue car parked in the city at night"]

BUILDERS = {
    "sd": lambda f: make_tiny_sd(f, prediction_type="epsilon"),
    "sd_v": lambda f: make_tiny_sd(f, prediction_type="v_prediction"),
    "sdxl": make_tiny_sdxl,
    "flux": make_tiny_flux,
    "sd3": make_tiny_sd3,
    "pixart": make_tiny_pixart,
    "flux_dev": lambda f: make_tiny_flux(f, guidance_embeds=True),
}
EXPECTED = {  # family, kind, schedule kind, prediction type
    "sd": ("sd", "unet", "vp", "epsilon"),
    "sd_v": ("sd", "unet", "vp", "v_prediction"),
    "sdxl": ("sdxl", "unet", "vp", "epsilon"),
    "flux": ("flux", "dit", "flow", "flow"),
    "sd3": ("sd3", "dit", "flow", "flow"),
    "pixart": ("pixart", "dit", "vp", "epsilon"),
    "flux_dev": ("flux", "dit", "flow", "flow"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Lazily built tiny pipeline folders, one per name."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = BUILDERS[name](root / name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def teachers(folders):
    """Lazily loaded teachers (one per name, shared by the module's tests)."""
    cache: dict[str, Teacher] = {}

    def get(name: str) -> Teacher:
        if name not in cache:
            teacher = Teacher.from_pretrained(folders(name), max_sequence_length=SEQ)
            teacher.pipeline().set_progress_bar_config(disable=True)
            cache[name] = teacher
        return cache[name]

    return get


def _times(teacher: Teacher, batch: int = 2) -> torch.Tensor:
    """Distinct per-sample times in the schedule's convention."""
    if teacher.schedule.kind == "vp":
        return torch.tensor([801, 117, 450, 3][:batch])
    return torch.tensor([0.83, 0.21, 0.5, 0.05][:batch])


def _latents(teacher: Teacher, batch: int = 2) -> torch.Tensor:
    return torch.randn(teacher.latent_shape(batch, 16, 16))


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", list(BUILDERS))
def test_load_attributes_and_frozen(teachers, name):
    teacher = teachers(name)
    family, kind, schedule_kind, prediction = EXPECTED[name]
    assert (teacher.family, teacher.kind) == (family, kind)
    assert (teacher.schedule.kind, teacher.prediction_type) == (schedule_kind, prediction)
    assert teacher.vae_scale_factor == 2 and teacher.latent_channels == 4
    assert teacher.resolution_multiple == (2 if kind == "unet" else 4)
    expected_default = 128 * 2 if family == "flux" else 8 * 2
    assert teacher.default_resolution == expected_default
    assert teacher.latent_shape(3, 16, 32) == (3, 4, 8, 16)

    pipe = teacher.pipeline()
    net = pipe.unet if kind == "unet" else pipe.transformer
    assert teacher.net is net and teacher.vae is pipe.vae  # shared, not copied
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert modules and all(not p.requires_grad for m in modules for p in m.parameters())
    assert all(not m.training for m in modules)
    teacher.train()  # a parent calling .train() must not unfreeze dropout etc.
    assert not teacher.training and not net.training


def test_load_pipeline_returns_stock_pipeline(folders):
    pipe = load_pipeline(folders("sd"), dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux", "sd3", "pixart"])
def test_encode_prompt_matches_pipeline(teachers, name):
    teacher = teachers(name)
    pipe = teacher.pipeline()
    cond = teacher.encode_prompt(PROMPTS)
    uncond = teacher.encode_prompt([""] * len(PROMPTS))
    assert len(cond) == 2 and not cond.hidden.requires_grad

    def close(a, b):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-6

    if name == "sd":
        pe, npe = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        assert cond.hidden.shape == (2, 77, 32) and cond.pooled is None
        close(cond.hidden, pe)
        close(uncond.hidden, npe)
    elif name == "sdxl":
        pe, npe, ppe, nppe = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        assert cond.hidden.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
        close(cond.hidden, pe)
        close(cond.pooled, ppe)
        # force_zeros_for_empty_prompt: the pipeline's unconditional embedding is all zeros
        close(uncond.hidden, npe)
        close(uncond.pooled, nppe)
        assert uncond.hidden.abs().max() == 0 and cond.hidden.abs().max() > 0
    elif name == "flux":
        pe, ppe, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQ)
        assert cond.hidden.shape == (2, SEQ, 32) and cond.pooled.shape == (2, 32)
        close(cond.hidden, pe)
        close(cond.pooled, ppe)
        close(cond.extra["txt_ids"][0], text_ids)
        npe, nppe, _ = pipe.encode_prompt([""] * 2, max_sequence_length=SEQ)
        close(uncond.hidden, npe)
        close(uncond.pooled, nppe)
    elif name == "sd3":
        pe, npe, ppe, nppe = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=SEQ
        )
        assert cond.hidden.shape == (2, 77 + SEQ, 64) and cond.pooled.shape == (2, 64)
        close(cond.hidden, pe)
        close(cond.pooled, ppe)
        close(uncond.hidden, npe)
        close(uncond.pooled, nppe)
    elif name == "pixart":
        pe, mask, npe, nmask = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=True, negative_prompt="", clean_caption=False,
            max_sequence_length=SEQ,
        )
        assert cond.hidden.shape == (2, SEQ, 32) and cond.pooled is None
        close(cond.hidden, pe)
        assert torch.equal(cond.extra["attention_mask"], mask)
        close(uncond.hidden, npe)
        assert torch.equal(uncond.extra["attention_mask"], nmask)


def test_prompt_embeds_batch_ops(teachers):
    teacher = teachers("flux")
    a = teacher.encode_prompt(PROMPTS)
    b = teacher.encode_prompt([""])
    both = b.repeat(2).cat(a)
    assert len(both) == 4
    assert torch.equal(both.hidden[2:], a.hidden) and torch.equal(both.pooled[:2], b.pooled.expand(2, -1))
    assert both.extra["txt_ids"].shape == (4, SEQ, 3)
    assert torch.equal(both.index(3).hidden, a.hidden[1:2])
    assert torch.equal(both[[0, 2]].pooled, torch.cat([b.pooled, a.pooled[:1]]))
    assert torch.equal(a.repeat(2).hidden[1], a.hidden[0])  # [a0, a0, a1, a1]
    assert len(b.expand(5)) == 5 and a.expand(2) is a
    with pytest.raises(ValueError, match="3 samples"):
        a.expand(3)
    half = a.to(dtype=torch.float16)
    assert half.hidden.dtype == torch.float16 and half.extra["txt_ids"].dtype == torch.float16
    parts = both.chunk(2)
    assert torch.equal(parts[1].hidden, a.hidden)
    with pytest.raises(ValueError, match="pooled"):
        a.cat(PromptEmbeds(hidden=a.hidden, extra=dict(a.extra)))


def test_sdxl_time_ids_stored_when_resolution_given(teachers):
    teacher = teachers("sdxl")
    embeds = teacher.encode_prompt(PROMPTS, height=16, width=32)
    assert embeds.extra["time_ids"].tolist() == [[16, 32, 0, 0, 16, 32]] * 2
    # at the matching latent size, explicit time ids equal the derived ones
    x = torch.randn(2, 4, 8, 16)
    derived = teacher.forward(x, _times(teacher), teacher.encode_prompt(PROMPTS))
    explicit = teacher.forward(x, _times(teacher), embeds)
    assert (derived - explicit).abs().max().item() <= 1e-6


# --------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_encode_decode(teachers, name):
    teacher = teachers(name)
    vae = teacher.vae
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = teacher.encode(pixels)
    assert latents.shape == (2, 4, 8, 8)
    shift = vae.config.shift_factor or 0.0
    if name == "flux":
        assert shift != 0.0  # the tiny Flux VAE exercises the shift
    mean = vae.encode(pixels).latent_dist.mean
    assert (latents - (mean - shift) * vae.config.scaling_factor).abs().max().item() <= 1e-6

    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    s1, s2 = teacher.encode(pixels, sample=True, generator=gen()), teacher.encode(pixels, sample=True, generator=gen())
    assert torch.equal(s1, s2) and not torch.allclose(s1, latents)

    images = teacher.decode(latents)
    assert images.shape == pixels.shape
    assert images.min() >= -1 and images.max() <= 1
    expected = vae.decode(latents / vae.config.scaling_factor + shift).sample.clamp(-1, 1)
    assert (images - expected).abs().max().item() <= 1e-6

    # decode is differentiable w.r.t. the latents although the VAE is frozen
    z = latents.clone().requires_grad_(True)
    teacher.decode(z, clamp=False).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


# --------------------------------------------------------------------------- network


class _CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


@pytest.mark.parametrize("name", ["sd", "sd_v", "sdxl", "flux", "sd3", "pixart"])
def test_predict_cfg_is_one_batched_forward(teachers, name):
    teacher = teachers(name)
    x = _latents(teacher)
    t = _times(teacher)
    cond = teacher.encode_prompt(PROMPTS)
    uncond = teacher.encode_prompt([""])  # one unconditional embedding shared by the batch

    counter = _CallCounter(teacher.net)
    try:
        x0, eps = teacher.predict(x, t, cond, uncond, guidance=3.0)
        assert counter.calls == 1
        out_c = teacher.forward(x, t, cond)
        out_u = teacher.forward(x, t, uncond.repeat(2))
        assert counter.calls == 3
    finally:
        counter.handle.remove()
    out = out_u + 3.0 * (out_c - out_u)
    alpha, sigma = teacher.schedule.alpha_sigma(t)
    x0_ref, eps_ref = to_x0_eps(out, x, alpha, sigma, teacher.prediction_type)
    assert x0.shape == eps.shape == x.shape
    # batch-4 vs batch-2 kernels round differently; eps-to-x0 divides by alpha (~0.2 at t=801),
    # so the bound is relative to the magnitude of the values
    tol = 1e-5 * max(1.0, x0_ref.abs().max().item(), eps_ref.abs().max().item())
    assert (x0 - x0_ref).abs().max().item() <= tol
    assert (eps - eps_ref).abs().max().item() <= tol
    # guidance actually changes the prediction
    assert (out_c - out).abs().max() > 1e-4

    # guidance 1 (or no uncond) is the plain conditional prediction
    x0_1, _ = teacher.predict(x, t, cond, uncond, guidance=1.0)
    x0_c, _ = to_x0_eps(out_c, x, alpha, sigma, teacher.prediction_type)
    assert (x0_1 - x0_c).abs().max().item() <= tol


def test_predict_per_sample_guidance_and_gradients(teachers):
    teacher = teachers("sd")
    x = _latents(teacher)
    t = _times(teacher)
    cond, uncond = teacher.encode_prompt(PROMPTS), teacher.encode_prompt([""])
    x0_w, _ = teacher.predict(x, t, cond, uncond, guidance=torch.tensor([1.0, 4.0]))
    x0_1, _ = teacher.predict(x[:1], t[:1], cond.index(0), uncond, guidance=1.0)
    x0_4, _ = teacher.predict(x[1:], t[1:], cond.index(1), uncond, guidance=4.0)
    assert (x0_w - torch.cat([x0_1, x0_4])).abs().max().item() <= 1e-5

    xg = x.clone().requires_grad_(True)
    teacher.predict(xg, t, cond, uncond, guidance=2.0)[0].square().mean().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_forward_matches_stock_network_call(teachers, name):
    """The network call the stock pipeline makes, reproduced with its own helpers."""
    teacher = teachers(name)
    pipe = teacher.pipeline()
    x = _latents(teacher)
    t = _times(teacher)
    ours = teacher.forward(x, t, teacher.encode_prompt(PROMPTS))
    if name == "sd":
        pe, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        ref = pipe.unet(x, t, encoder_hidden_states=pe, return_dict=False)[0]
    elif name == "sdxl":
        pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids(
            (16, 16), (0, 0), (16, 16), dtype=pe.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).repeat(2, 1)
        ref = pipe.unet(
            x, t, encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            return_dict=False,
        )[0]
    else:
        pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQ)
        packed = pipe._pack_latents(x, 2, 4, 8, 8)
        assert torch.equal(packed, pack_latents(x)) and torch.equal(unpack_latents(packed, 8, 8), x)
        img_ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", x.dtype)
        timestep = (t * 1000).to(x.dtype)  # scheduler timesteps are sigma * 1000
        tokens = pipe.transformer(
            hidden_states=packed, timestep=timestep / 1000, guidance=None, pooled_projections=pooled,
            encoder_hidden_states=pe, txt_ids=text_ids, img_ids=img_ids, return_dict=False,
        )[0]
        ref = pipe._unpack_latents(tokens, 16, 16, pipe.vae_scale_factor)
    assert ours.shape == ref.shape == x.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_v_prediction_x0_by_hand(teachers):
    teacher = teachers("sd_v")
    x = _latents(teacher)
    t = _times(teacher)
    cond = teacher.encode_prompt(PROMPTS)
    v = teacher.forward(x, t, cond)
    acp = teacher.pipeline().scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    x0, eps = teacher.predict(x, t, cond)
    assert (x0 - (alpha * x - sigma * v)).abs().max().item() <= 1e-5
    assert (eps - (sigma * x + alpha * v)).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- sampling loops


@pytest.mark.parametrize("name", ["sd", "sd_v"])
def test_ddim_loop_matches_stock_pipeline(teachers, name):
    teacher = teachers(name)
    pipe = teacher.pipeline()
    noise = torch.randn(1, 4, 8, 8)
    prompt, w = PROMPTS[0], 3.0
    stock = pipe(
        prompt, height=16, width=16, num_inference_steps=2, guidance_scale=w, latents=noise.clone(),
        output_type="latent",
    ).images

    sched = pipe.scheduler
    sched.set_timesteps(2)
    step = sched.config.num_train_timesteps // 2
    cond, uncond = teacher.encode_prompt([prompt]), teacher.encode_prompt([""])
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x0, eps = teacher.predict(x, t, cond, uncond, guidance=w)
        prev = int(t) - step
        abar = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        x = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    assert (x - stock).abs().max().item() <= 1e-4


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_flow_euler_loop_matches_stock_flux(teachers, w):
    """Flux's stock pipeline does true CFG only with a negative prompt and true_cfg_scale > 1."""
    teacher = teachers("flux")
    pipe = teacher.pipeline()
    noise = torch.randn(1, 4, 8, 8)
    prompt = PROMPTS[1]
    kwargs = dict(negative_prompt="", true_cfg_scale=w) if w != 1.0 else {}
    stock = pipe(
        prompt, height=16, width=16, num_inference_steps=2, latents=pack_latents(noise),
        output_type="latent", max_sequence_length=SEQ, **kwargs,
    ).images
    stock = unpack_latents(stock, 8, 8)

    sigmas = pipe.scheduler.sigmas  # the schedule the stock call used, ending in 0
    assert len(sigmas) == 3
    cond = teacher.encode_prompt([prompt])
    uncond = teacher.encode_prompt([""]) if w != 1.0 else None
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0, eps = teacher.predict(x, s, cond, uncond, guidance=w)
        x = (1 - s_next) * x0 + s_next * eps
    assert (x - stock).abs().max().item() <= 1e-4


def test_guidance_distilled_flux_matches_stock(teachers):
    """guidance_embeds=True: predict's guidance (no uncond) feeds the guidance embedding."""
    teacher = teachers("flux_dev")
    assert teacher.guidance_embeds
    pipe = teacher.pipeline()
    noise = torch.randn(1, 4, 8, 8)
    prompt, w = PROMPTS[0], 5.0
    stock = pipe(
        prompt, height=16, width=16, num_inference_steps=2, guidance_scale=w, latents=pack_latents(noise),
        output_type="latent", max_sequence_length=SEQ,
    ).images
    cond = teacher.encode_prompt([prompt])
    x = noise
    sigmas = pipe.scheduler.sigmas
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0, eps = teacher.predict(x, s, cond, guidance=w)
        x = (1 - s_next) * x0 + s_next * eps
    assert (x - unpack_latents(stock, 8, 8)).abs().max().item() <= 1e-4
    t = torch.tensor([0.7])
    assert (teacher.forward(noise, t, cond, guidance_embed=1.0) - teacher.forward(noise, t, cond)).abs().max() > 1e-4


def test_lcm_pipeline_loads_as_sd_family(folders, tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    sd = load_pipeline(folders("sd"))
    lcm = LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        scheduler=LCMScheduler.from_config(sd.scheduler.config), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    lcm.save_pretrained(tmp_path / "lcm", safe_serialization=True)
    teacher = Teacher.from_pretrained(tmp_path / "lcm")
    assert (teacher.family, teacher.pipeline_class) == ("sd", "LatentConsistencyModelPipeline")
    x = torch.randn(1, 4, 8, 8)
    x0, _ = teacher.predict(x, torch.tensor([499]), teacher.encode_prompt(["a cat"]))
    assert x0.shape == x.shape and torch.isfinite(x0).all()


# --------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        Teacher.from_pretrained(tmp_path / "nope")
    msg = str(err.value)
    assert "does not exist" in msg and "model_index.json" in msg and "save_pretrained" in msg


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder") as err:
        load_pipeline(tmp_path)
    assert "model_index.json" in str(err.value)


@pytest.fixture
def sd_copy(folders, tmp_path):
    dst = tmp_path / "sd_copy"
    shutil.copytree(folders("sd"), dst)
    return dst


def test_missing_component_folder_fails_before_loading(sd_copy, monkeypatch):
    import diffusers

    def boom(*args, **kwargs):  # the check must happen before diffusers is asked to load anything
        raise AssertionError("DiffusionPipeline.from_pretrained was called")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", boom)
    shutil.rmtree(sd_copy / "unet")
    with pytest.raises(ModelLoadError) as err:
        Teacher.from_pretrained(sd_copy)
    msg = str(err.value)
    assert "'unet/'" in msg and "UNet2DConditionModel" in msg
    assert "config.json" in msg and "diffusion_pytorch_model.safetensors" in msg


def test_component_without_weights(sd_copy):
    for f in (sd_copy / "vae").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError) as err:
        Teacher.from_pretrained(sd_copy)
    msg = str(err.value)
    assert "vae" in msg and "no weights" in msg and "diffusion_pytorch_model.safetensors" in msg


@pytest.mark.parametrize("class_name", ["KandinskyPipeline", "MyMadeUpPipeline"])
def test_unsupported_pipeline_class(sd_copy, class_name):
    index_file = sd_copy / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = class_name
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        Teacher.from_pretrained(sd_copy)
    msg = str(err.value)
    assert class_name in msg and "not supported" in msg
    for supported in (
        "StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline", "StableDiffusion3Pipeline",
        "PixArtAlphaPipeline", "PixArtSigmaPipeline", "LatentConsistencyModelPipeline",
    ):
        assert supported in msg


def test_check_resolution(teachers):
    flux = teachers("flux")
    assert flux.resolution_multiple == 4  # VAE factor 2 x 2 for packing
    flux.check_resolution(32, 16)
    with pytest.raises(ResolutionError) as err:
        flux.check_resolution(30, 32)
    msg = str(err.value)
    assert "height 30" in msg and "28 or 32" in msg and "multiple of 4" in msg
    assert "width" not in msg.split("height 30")[1].split(".")[0]  # width 32 is fine
    with pytest.raises(ResolutionError):
        flux.latent_shape(1, 16, 18)
    with pytest.raises(ResolutionError):
        flux.encode(torch.zeros(1, 3, 18, 16))

    sd = teachers("sd")
    sd.check_resolution(18, 30)  # factor 2 only
    with pytest.raises(ResolutionError, match="16 or 18"):
        sd.check_resolution(17, 16)
