"""LCD (fastgen.trainers.lcd) on tiny random SD / SD-v / SDXL pipelines.

Independent references: diffusers' own ``get_guidance_scale_embedding`` and ``LCMScheduler.step``
(consistency function for eps and v teachers), the teacher's raw network output combined by hand
(CFG convention and DDIM solver step), and a freshly loaded copy of the teacher (LoRA mode).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from fastgen.config import config_from_dict
from fastgen.diffusion import consistency_output, ddim_step, lcm_timesteps, to_x0_eps
from fastgen.errors import ConfigError, ModelLoadError, ResolutionError
from fastgen.models import Teacher
from fastgen.evaluation.training import TrainingEvaluator
from fastgen.losses import consistency_loss as lcd_loss
from fastgen.models.denoisers import guidance_embedding
from fastgen.models.teacher import PromptEmbeds
from fastgen.models.teacher import drop_captions
from fastgen.trainers.consistency import ConsistencyStudent, consistency_distillation_loss
from fastgen.trainers.lcd import LCD, LCDConfig
from fastgen.trainers.method import METHODS, get_method
from tiny_models import build_method, make_tiny_sd, make_tiny_sdxl

PROMPTS = [
    "a photo of a cat",
    "a blue car parked in the city at night",
    "a dog running on the beach",
    "an astronaut riding a horse on the moon",
]
SMALL_LORA = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
RECIPES = Path(__file__).resolve().parents[1] / "fastgen" / "recipes"
TRAIN_KEYS = {
    "max_steps", "batch_size", "learning_rate", "lr_scheduler", "warmup_steps", "max_grad_norm",
    "checkpoint_every", "sample_every", "eval_every", "seed", "mixed_precision",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcd-tiny")
    builders = {
        "sd": lambda f: make_tiny_sd(f, prediction_type="epsilon"),
        "sd_v": lambda f: make_tiny_sd(f, prediction_type="v_prediction"),
        "sdxl": make_tiny_sdxl,
    }
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = builders[name](root / name)
        return cache[name]

    return get


def make(folders, name: str = "sd", **kw) -> LCD:
    return build_method(LCD, teacher=str(folders(name)), **kw)


def pixel_batch(method: LCD, n: int = 2) -> dict:
    r = method.nets.resolution
    return {"pixels": torch.rand(n, 3, r, r) * 2 - 1, "caption": PROMPTS[:n]}


class CallLog:
    """Forward hook recording the batch size of every call of a module."""

    def __init__(self, module: torch.nn.Module):
        self.sizes: list[int] = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.sizes.append(int(args[0].shape[0])))

    def close(self):
        self.handle.remove()


# --------------------------------------------------------------------------- pure pieces


def test_registered_and_guidance_embedding_matches_diffusers():
    from diffusers import StableDiffusionPipeline

    assert get_method("lcd") is LCD and METHODS["lcd"] is LCD
    w = torch.tensor([0.0, 1.5, 7.5, 14.0])
    for dim in (256, 7):
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), ref, atol=1e-6, rtol=0)


def test_loss_kinds():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    assert lcd_loss(a, b, "l2").item() == pytest.approx(0.25)
    c = 0.001
    assert lcd_loss(a, b, "huber", c).item() == pytest.approx((0.25 + c * c) ** 0.5 - c, rel=1e-6)
    with pytest.raises(ConfigError):
        lcd_loss(a, b, "l1")


def test_config_validation():
    with pytest.raises(ConfigError, match="w_min"):
        LCDConfig(w_min=10, w_max=5)
    with pytest.raises(ConfigError, match="ema_decay"):
        LCDConfig(ema_decay=1.0)
    with pytest.raises(ConfigError):
        config_from_dict(LCDConfig, {"loss": "l1"})


# --------------------------------------------------------------------------- full mode


def test_full_student_starts_as_teacher(folders):
    m = make(folders, "sd")
    teacher = m.teacher
    proj = m.nets.student.time_embedding.cond_proj
    assert proj.weight.shape == (proj.weight.shape[0], 256) and torch.count_nonzero(proj.weight) == 0
    assert m.nets.student is not teacher.net and m.nets.target is not m.nets.student
    assert m.nets.student.config.time_cond_proj_dim == 256 and teacher.net.config.time_cond_proj_dim is None
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 999])
    cond = teacher.encode_prompt(PROMPTS[:3])
    w_emb = guidance_embedding(torch.tensor([2.0, 7.0, 13.0]), 256)
    with torch.no_grad():
        ref = teacher.forward(x, t, cond)
        for net in (m.nets.student, m.nets.target):
            with_w = PromptEmbeds(hidden=cond.hidden, extra={"timestep_cond": w_emb})
            assert torch.equal(m.teacher.forward(x, t, with_w, net=net), ref)


def test_train_step_one_batched_teacher_forward_and_cfg_convention(folders):
    m = make(folders, "sd")
    teacher_calls = CallLog(m.teacher.net)
    student_calls = CallLog(m.nets.student)
    target_calls = CallLog(m.nets.target)
    try:
        out = m.train_step(pixel_batch(m, 3), step=0)
    finally:
        for log in (teacher_calls, student_calls, target_calls):
            log.close()
    loss = out.losses["student"]
    assert set(out.losses) == {"student"} and torch.isfinite(loss) and loss.requires_grad
    assert teacher_calls.sizes == [6], "teacher must run cond+uncond as ONE batched forward"
    assert student_calls.sizes == [3] and target_calls.sizes == [3]
    loss.backward()
    assert m.nets.student.time_embedding.cond_proj.weight.grad is not None
    assert all(p.grad is None for p in m.nets.target.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())

    # explicit randomness: skip grid ends, LCM-form CFG (x_c + w (x_c - x_u)) and the DDIM step
    z0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    w = torch.tensor([5.0, 9.0])
    cond = m.teacher.encode_prompt(PROMPTS[:2])
    res = consistency_distillation_loss(m.nets, z0, cond, torch.tensor([0, 49]), noise, w)
    assert res["t_start"].tolist() == [19, 999] and res["t_end"].tolist() == [0, 979]
    sched = m.teacher.schedule
    with torch.no_grad():
        x_s = res["x_start"]
        a, s = sched.alpha_sigma(res["t_start"])
        torch.testing.assert_close(x_s, a.view(-1, 1, 1, 1) * z0 + s.view(-1, 1, 1, 1) * noise)
        c = m.teacher.forward(x_s, res["t_start"], cond)
        u = m.teacher.forward(x_s, res["t_start"], m.teacher.encode_prompt(["", ""]))
        guided = c + w.view(-1, 1, 1, 1) * (c - u)
        x0, eps = to_x0_eps(guided, x_s, a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1), "epsilon")
        ae, se = sched.alpha_sigma(res["t_end"])
        x_end = ddim_step(x0, eps, ae, se)
    torch.testing.assert_close(res["x_end"], x_end, atol=1e-5, rtol=1e-5)


def test_consistency_function_matches_lcm_scheduler_eps_and_v(folders):
    """At step 0 the student is the teacher, so f(x, t) must equal LCMScheduler.step(...).denoised."""
    from diffusers import LCMScheduler

    for name, kind in (("sd", "epsilon"), ("sd_v", "v_prediction")):
        m = make(folders, name)
        assert m.teacher.prediction_type == kind
        sched = LCMScheduler.from_config(m.teacher.pipeline().scheduler.config)
        sched.set_timesteps(4)
        assert sched.timesteps.tolist() == lcm_timesteps(4).tolist()
        cond = m.teacher.encode_prompt(PROMPTS[:2])
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            for t in sched.timesteps:
                out = m.teacher.forward(x, t, cond)  # raw eps or v
                ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(0)).denoised
                tb = torch.full((2,), int(t))
                f = m.nets.f(m.nets.student, x, tb, cond, torch.tensor([3.0, 3.0]))
                torch.testing.assert_close(f, ref, atol=2e-5, rtol=1e-4)
                if kind == "v_prediction":  # x0 = alpha x - sigma v, by hand
                    a, s = m.teacher.schedule.alpha_sigma(tb)
                    x0 = a.view(-1, 1, 1, 1) * x - s.view(-1, 1, 1, 1) * out
                    torch.testing.assert_close(f, consistency_output(x, x0, tb), atol=1e-5, rtol=1e-5)
        if name == "sd_v":
            step = m.train_step(pixel_batch(m, 2), 0)
            assert torch.isfinite(step.losses["student"])


def test_a_few_adamw_steps_reduce_the_loss_on_a_fixed_batch(folders):
    m = make(folders, "sd", loss="l2")
    batch = pixel_batch(m, 4)
    latents, cond = m.nets.encode_batch(batch)
    gen = torch.Generator().manual_seed(1)
    index = torch.randint(0, 50, (4,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    w = torch.tensor([5.0, 8.0, 11.0, 14.0])

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(consistency_distillation_loss(m.nets, latents, cond, index, noise, w)["loss"])

    opt = torch.optim.AdamW(m.parameter_groups()["student"], lr=1e-3, weight_decay=0.0)
    before = fixed_loss()
    for step in range(30):
        loss = consistency_distillation_loss(m.nets, latents, cond, index, noise, w)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step("student", step)
    after = fixed_loss()
    assert after < 0.3 * before, (before, after)  # measured: 0.04-0.07 of the start over 4 seeds


def test_ema_target_update_and_checkpoint_roundtrip(folders):
    m = make(folders, "sd", ema_decay=0.9)
    p_s = m.nets.student.conv_in.weight
    p_t = m.nets.target.conv_in.weight
    with torch.no_grad():
        p_s.add_(1.0)
    old_t = p_t.detach().clone()
    m.after_optimizer_step("student", 0)
    torch.testing.assert_close(p_t, 0.9 * old_t + 0.1 * p_s.detach())

    state = m.checkpoint_state_dict()
    assert any(k.startswith("student.") for k in state) and any(k.startswith("target.") for k in state)
    fresh = make(folders, "sd", ema_decay=0.9)
    fresh.load_checkpoint_state_dict(state)
    assert torch.equal(fresh.nets.student.conv_in.weight, p_s) and torch.equal(fresh.nets.target.conv_in.weight, p_t)

    with pytest.raises(ModelLoadError, match="lora"):
        make(folders, "sd", lora=True, lora_rank=2, lora_target_modules=SMALL_LORA).load_checkpoint_state_dict(state)


def test_guidance_embedding_size_mismatch_is_a_clear_error(folders):
    state = make(folders, "sd", w_embedding_dim=256).checkpoint_state_dict()
    other = make(folders, "sd", w_embedding_dim=128)
    with pytest.raises(ConfigError, match=r"size 256.*w_embedding_dim=128"):
        other.load_checkpoint_state_dict(state)


def test_sdxl_train_step(folders):
    m = make(folders, "sdxl", w_min=3.0)
    assert m.teacher.family == "sdxl"
    calls = CallLog(m.teacher.net)
    try:
        out = m.train_step(pixel_batch(m, 2), step=0)
    finally:
        calls.close()
    assert calls.sizes == [4]
    loss = out.losses["student"]
    assert torch.isfinite(loss)
    loss.backward()
    assert m.nets.student.add_embedding.linear_1.weight.grad is not None
    img = m.sample(PROMPTS[:1], 2, torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 16, 16) and bool(torch.isfinite(img).all())


def test_bad_resolution_is_rejected(folders):
    with pytest.raises(ResolutionError):
        make(folders, "sd", resolution=15)


# --------------------------------------------------------------------------- LoRA mode


def test_lora_one_unet_teacher_is_adapters_disabled(folders):
    from diffusers import UNet2DConditionModel

    m = make(folders, "sd", lora=True, lora_rank=4, lora_alpha=8, lora_target_modules=SMALL_LORA)
    unets = {id(mod) for mod in m.modules() if isinstance(mod, UNet2DConditionModel)}
    assert unets == {id(m.teacher.net)} and m.nets.student is m.teacher.net and m.nets.target is None
    group = m.parameter_groups()["student"]
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert len(group) == len(trainable) > 0 and all(p.dtype == torch.float32 for p in group)
    with torch.no_grad():
        for n, p in m.nets.student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)

    fresh = Teacher.from_pretrained(folders("sd"))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond = fresh.encode_prompt(PROMPTS[:2])
    with torch.no_grad():
        ref = fresh.forward(x, t, cond)
        with m.nets.adapters_disabled():
            off = m.teacher.forward(x, t, cond)
        on = m.teacher.forward(x, t, cond)
    torch.testing.assert_close(off, ref, atol=1e-6, rtol=0)
    assert (on - ref).abs().max() > 1e-3
    assert all(p.requires_grad for p in group)

    calls = CallLog(m.nets.student)
    try:
        out = m.train_step(pixel_batch(m, 2), step=0)
    finally:
        calls.close()
    assert calls.sizes == [4, 2, 2]  # teacher (batched cond+uncond, adapters off), student, target
    out.losses["student"].backward()
    assert all(p.grad is not None for p in group)
    assert all(p.grad is None for n, p in m.nets.student.named_parameters() if "lora_" not in n)

    # gradient checkpointing (train mode) keeps the gradients flowing to the adapters only
    ckpt_m = make(folders, "sd", lora=True, lora_rank=2, lora_target_modules=SMALL_LORA, gradient_checkpointing=True)
    ckpt_m.train()
    assert ckpt_m.nets.student.training and not ckpt_m.teacher.vae.training
    ckpt_m.train_step(pixel_batch(ckpt_m, 2), 0).losses["student"].backward()
    assert all(p.grad is not None for p in ckpt_m.parameter_groups()["student"])

    state = m.checkpoint_state_dict()
    assert state and all(k.startswith("lora.") for k in state)
    other = make(folders, "sd", lora=True, lora_rank=4, lora_alpha=8, lora_target_modules=SMALL_LORA)
    other.load_checkpoint_state_dict(state)
    for (n, a), (_, b) in zip(m.nets.student.named_parameters(), other.nets.student.named_parameters()):
        if "lora_" in n:
            assert torch.equal(a, b)


def test_lora_fixed_guidance_is_used():
    m = ConsistencyStudent.__new__(ConsistencyStudent)  # only the guidance sampler; no networks needed
    torch.nn.Module.__init__(m)
    m.lora = object()
    m.cfg = LCDConfig(lora=True, lora_guidance=6.5)
    assert m.guidance(3, torch.device("cpu")).tolist() == [6.5, 6.5, 6.5]
    m.cfg = LCDConfig(lora=True, w_min=2.0, w_max=4.0)
    w = m.guidance(100, torch.device("cpu"))
    assert bool(((w >= 2.0) & (w <= 4.0)).all()) and w.std() > 0


def test_lora_missing_target_modules_error_lists_existing_names(folders):
    with pytest.raises(ConfigError) as info:
        make(folders, "sd", lora=True, lora_target_modules=["to_q", "to_qq", "attn9.proj"])
    msg = str(info.value)
    assert "to_qq" in msg and "attn9.proj" in msg and "to_k" in msg and "conv1" in msg
    assert "'to_q'" not in msg.split("include")[0]  # only the missing ones are named as missing


# --------------------------------------------------------------------------- data


def test_digits_dataset_feeds_train_step(folders):
    m = make(folders, "sd", caption_dropout=0.5)
    ds = m.train_dataset()
    items = [ds[i] for i in range(3)]
    assert items[0]["pixels"].shape == (3, 16, 16)
    batch = torch.utils.data.default_collate(items)
    assert torch.isfinite(m.train_step(batch, 0).losses["student"])
    # caption dropout replaces rows by the empty-prompt embedding
    cond = m.teacher.encode_prompt(PROMPTS[:2])
    dropped = drop_captions(cond, m.nets.uncond(torch.device("cpu")), torch.tensor([True, False]))
    assert torch.equal(dropped.hidden[0], m.nets.uncond(torch.device("cpu")).hidden[0])
    assert torch.equal(dropped.hidden[1], cond.hidden[1])


def test_latent_cache_skips_vae_and_text_encoder(folders, tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(PROMPTS[i % 4])
    m = make(folders, "sd", dataset=str(data), use_latent_cache=True, cache_dir=str(tmp_path / "cache"), cache_batch_size=2)
    ds = m.train_dataset()
    assert len(ds) == 5 and (tmp_path / "cache" / "index.json").is_file()
    item = ds[0]
    assert item["latents"].shape == (4, 8, 8) and item["hidden"].ndim == 2
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    vae_calls, text_calls = CallLog(m.teacher.vae.encoder), CallLog(m.teacher.text_encoders[0])
    try:
        out = m.train_step(batch, 0)
    finally:
        vae_calls.close()
        text_calls.close()
    assert torch.isfinite(out.losses["student"])
    assert vae_calls.sizes == [] and text_calls.sizes == []
    # the cache folder itself is also accepted as the dataset
    again = make(folders, "sd", dataset=str(tmp_path / "cache"))
    assert len(again.train_dataset()) == 5


def test_bad_datasets_are_data_errors_and_shards_go_through_the_cache(folders, tmp_path):
    from PIL import Image

    from fastgen.data.shards import write_shards
    from fastgen.errors import DataError

    m = make(folders, "sd", dataset=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="nope"):
        m.train_dataset()
    items = [(Image.new("RGB", (16, 16), (60 * i, 20, 90)), PROMPTS[i]) for i in range(3)]
    write_shards(items, tmp_path / "shards", per_shard=2)
    with pytest.raises(DataError, match="latent_cache"):
        make(folders, "sd", dataset=str(tmp_path / "shards")).train_dataset()
    cached = make(folders, "sd", dataset=str(tmp_path / "shards"), use_latent_cache=True, cache_dir=str(tmp_path / "c"))
    ds = cached.train_dataset()
    assert len(ds) == 3 and ds[0]["latents"].shape == (4, 8, 8)
    assert cached.evaluation_plan() is None and TrainingEvaluator()(cached, 0) == {}  # digits metrics: digits teacher only
    assert cached.sample_settings()[0] == cached.sample_config.prompts


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["lcd-digits", "lcd-lora-digits", "lcd-sd15", "lcd-sd21-v", "lcd-lora-sdxl"])
def test_recipes_parse(name):
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert recipe["method"] == "lcd" and recipe["output_dir"]
    assert set(recipe["train"]) <= TRAIN_KEYS, set(recipe["train"]) - TRAIN_KEYS
    cfg = config_from_dict(LCDConfig, recipe["lcd"])
    assert cfg.lora == ("lora" in name)
    from fastgen.trainers.engine.run import load_run_config

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shipped recipes use the current layout: no key migration
        run_cfg, method_cls = load_run_config(str(RECIPES / f"{name}.yaml"))
    assert method_cls is LCD and run_cfg.lcd == cfg and run_cfg.teacher.path


def test_evaluate_scores_digits_samples(folders, monkeypatch):
    """evaluate() plumbing with a stand-in classifier (the shipped one is tested with the zoo)."""
    from fastgen.zoo import paths

    class FakeClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 32 * 32, 8)

        def forward(self, images):
            assert images.shape[1:] == (3, 32, 32)
            feats = self.proj(images.flatten(1))
            return feats.new_zeros(len(images), 10), feats.new_zeros(len(images), 6), feats

    m = make(folders, "sd", eval_samples=20, sample_steps=2)
    monkeypatch.setattr(LCD, "is_digits_world", lambda self: True)
    monkeypatch.setattr(paths, "load_classifier", lambda root=None: FakeClassifier())
    scores = TrainingEvaluator()(m, 0)
    assert scores["samples"] == 20 and scores["eval_steps"] == 2
    assert {"digit_accuracy", "colour_accuracy", "digits_fid", "digits_fid_floor"} <= set(scores)
    assert all(isinstance(v, (int, float)) for v in scores.values())


def test_vae_posterior_sample_is_an_option(folders):
    """data.vae_sample: a fresh posterior sample per step (the LCD scripts); the default is the mean."""
    m = build_method(LCD, {"data": {"vae_sample": True}}, teacher=str(folders("sd")))
    b = pixel_batch(m, 2)
    a, _ = m.nets.encode_batch(b, vae_sample=True)
    c, _ = m.nets.encode_batch(b, vae_sample=True)
    mean1, _ = m.nets.encode_batch(b)
    mean2, _ = m.nets.encode_batch(b)
    assert torch.equal(mean1, mean2) and not torch.equal(a, c)
    with pytest.raises(ConfigError, match="vae_sample"):
        build_method(LCD, {"data": {"vae_sample": True, "latent_cache": True}}, teacher=str(folders("sd")))


def test_long_captions_are_counted_with_the_teachers_tokenizer(folders, tmp_path, caplog):
    """Captions the teacher's tokenizer would truncate are counted once per dataset (a warning naming how many)."""
    from PIL import Image

    data = tmp_path / "long"
    data.mkdir()
    m = make(folders, "sd", dataset=str(data))
    limit = m.teacher.pipeline().tokenizer.model_max_length
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 90, 30)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("a cat " * (limit if i < 2 else 1))
    with caplog.at_level("WARNING"):
        ds = m.train_dataset()
    assert ds.num_long_captions == 2
    assert sum("2 of 3" in r.getMessage() or ("2" in r.getMessage() and str(limit) in r.getMessage()) for r in caplog.records) >= 1
