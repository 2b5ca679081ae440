"""Builds the digits world's models with fixed seeds: ``fastgen zoo build``.

Stages, each resumable (a finished stage's output in the work folder is reused):

1. ``tokenizer``    CLIP-style byte-level BPE trained on the caption vocabulary.
2. ``text_encoder`` tiny ``CLIPTextModel`` trained to recognise digit and colour from its pooled output.
3. ``t5_tokenizer`` T5-layout unigram tokenizer (:mod:`fastgen.zoo.t5`).
4. ``t5_encoder``   tiny ``T5EncoderModel`` (FLUX's second text tower), robust to the padded length.
5. ``classifier``   the digits classifier (training split only).
6. ``vae``          ``AutoencoderKL`` 32x32x3 -> 8x8x4 for the UNet world.
7. ``vae_f2``       ``AutoencoderKL`` with factor 2 for the DiT world (32x32x3 -> 16x16x4, 64 Flux tokens).
8. ``unet``         SD-style ``UNet2DConditionModel`` teacher: eps, scaled-linear 1000 steps, 10% caption dropout.
9. ``dit``          ``FluxTransformer2DModel`` teacher: flow matching, 10% caption dropout; checkpoints and
                    resumes within the stage.

Finally the two teachers are assembled as stock diffusers pipeline folders
(``StableDiffusionPipeline`` and ``FluxPipeline``) plus the classifier folder under the output
folder (by default the package's shipped artefacts).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastgen.data import digits as dw
from fastgen.diffusion import NoiseSchedule, from_x0_eps
from fastgen.io import atomic_folder, atomic_write_json
from fastgen.trainers.engine.ema import EMA

# The shipped world's facts live in fastgen.zoo.paths; re-exported here (``build.DIT_RESOLUTION`` etc.).
from fastgen.zoo.paths import (  # noqa: F401
    DIT_GUIDANCE,
    DIT_MAX_SEQUENCE_LENGTH,
    DIT_RESOLUTION,
    DIT_TRAIN_TEXT_LENGTHS,
    UNET_GUIDANCE,
    UNET_RESOLUTION,
)

logger = logging.getLogger(__name__)

STAGES = ("tokenizer", "text_encoder", "t5_tokenizer", "t5_encoder", "classifier", "vae", "vae_f2", "unet", "dit")


@dataclass
class StageSteps:
    text_encoder: int = 400
    t5_encoder: int = 600
    classifier: int = 700
    vae: int = 1000
    vae_f2: int = 1500
    unet: int = 1200
    dit: int = 4000


@dataclass
class BuildConfig:
    out_dir: str = ""
    work_dir: str = "runs/zoo-build"
    quick: bool = False
    seed: int = 0
    steps: StageSteps = field(default_factory=StageSteps)
    unet_batch: int = 128
    dit_batch: int = 64
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    dit_lr: float = 5e-4
    dit_ema_decay: float = 0.999
    #: the DiT stage saves a resumable checkpoint every this many steps
    dit_checkpoint_every: int = 250
    #: dtype of the shipped DiT transformer's weights (float16 halves them; diffusers loads them as float32)
    dit_storage_dtype: str = "float16"
    #: teacher stages whose learning rate decays (cosine, to 10%) after warm-up instead of staying constant
    cosine_decay: list[str] = field(default_factory=lambda: ["dit"])

    def __post_init__(self):
        if self.dit_storage_dtype not in ("float32", "float16"):
            raise ValueError(f"dit_storage_dtype must be float32 or float16, got {self.dit_storage_dtype!r}")
        if self.quick:
            self.steps = StageSteps(text_encoder=5, t5_encoder=5, classifier=5, vae=5, vae_f2=5, unet=5, dit=5)


# ----------------------------------------------------------------------------------------------
# helpers


def _teacher_lr_lambda(total: int, cosine: bool, warmup: int = 50):
    """Linear warm-up, then constant or cosine decay to 10% of the peak."""
    import math

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def teacher_ema(module: torch.nn.Module, decay: float) -> EMA:
    """The teachers' EMA: the project EMA with its decay warm-up counted from one, so that the k-th update
    (k = 1, 2, ...) uses ``min(decay, (1 + k) / (10 + k))`` (first update 2/11), as the shipped teachers were
    built. The teachers have no buffers, so the trainable parameters are the whole state."""
    ema = EMA(module, decay, warmup=True)
    ema.num_updates = 1
    return ema


def _save_folder(model, target: Path, **kwargs) -> None:
    """``model.save_pretrained`` into ``target``, atomically (a complete old or new folder at every moment)."""
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp, **kwargs)


def _noised_and_target(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
    """The teacher's input ``x_t = alpha_t x0 + sigma_t eps`` and its regression target (the schedule's
    prediction type: eps for the UNet, ``eps - x0`` for the flow DiT)."""
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = schedule.add_noise(x0, eps, t)
    return x_t, from_x0_eps(x0, eps, alpha, sigma, schedule.prediction_type)


def _augment_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translations (with edge replication) of a batch of images."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


# ----------------------------------------------------------------------------------------------
# stage 1: tokenizer


def build_tokenizer(out: Path):
    """A CLIP-layout byte-level BPE tokenizer trained on the digits world's captions."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    corpus = dw.all_captions() + ["a photo of a cat", "an image", "digit"]
    tok.train_from_iterator(corpus * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for ch in pre_tokenizers.ByteLevel.alphabet():
        for sym in (ch, ch + "</w>"):
            if sym not in vocab:
                vocab[sym] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer.save_pretrained(out)
    return tokenizer


# ----------------------------------------------------------------------------------------------
# stage 2: text encoder


def _tokenize(tokenizer, prompts: list[str], max_length: int = 77) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def build_text_encoder(out: Path, tokenizer, steps: int, seed: int):
    """Tiny CLIPTextModel whose pooled output is trained to name the digit and the colour."""
    from transformers import CLIPTextConfig, CLIPTextModel

    gen = _seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    )
    model = CLIPTextModel(config)
    heads = torch.nn.Linear(64, 10 + len(dw.PALETTE))
    prompts, digits, colours = dw.labelled_captions()
    ids = _tokenize(tokenizer, prompts)
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-3, weight_decay=0.01)
    model.train()
    loss = torch.tensor(0.0)
    for _ in tqdm(range(steps), desc="text encoder", mininterval=5):
        idx = torch.randint(0, len(ids), (64,), generator=gen)
        pooled = model(ids[idx]).pooler_output
        logits = heads(pooled)
        loss = F.cross_entropy(logits[:, :10], digits[idx]) + F.cross_entropy(logits[:, 10:], colours[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    _save_folder(model, out)
    return model, {"final_loss": float(loss.detach())}


# ----------------------------------------------------------------------------------------------
# stage 3: classifier


def build_classifier(out: Path, steps: int, seed: int):
    from fastgen.zoo.classifier import DigitsClassifier

    gen = _seed(seed)
    train = dw.DigitsDataset("train")
    images, digits, colours = train.all_pixels(32)
    images64, _, _ = train.all_pixels(64)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 2))
    model.train()
    loss = torch.tensor(0.0)
    for _ in tqdm(range(steps), desc="classifier", mininterval=5):
        idx = torch.randint(0, len(images), (128,), generator=gen)
        # half the batch rendered at 64 px: the classifier must read both worlds' images
        use64 = torch.rand(128, generator=gen) < 0.5
        x = torch.where(use64[:, None, None, None], F.interpolate(images64[idx], size=32, mode="area"), images[idx])
        x = _augment_shift(x, 2, gen)
        gain = 0.8 + 0.4 * torch.rand(128, 1, 1, 1, generator=gen)
        x = (x * gain + 0.04 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        d_logits, c_logits, _ = model(x)
        loss = F.cross_entropy(d_logits, digits[idx]) + F.cross_entropy(c_logits, colours[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    _save_folder(model, out)
    return model, {"final_loss": float(loss.detach())}


@torch.no_grad()
def classifier_accuracy(model, split: str = "test") -> dict:
    ds = dw.DigitsDataset(split)
    images, digits, colours = ds.all_pixels(32)
    d_logits, c_logits, _ = model(images)
    return {
        "digit_accuracy": round(float((d_logits.argmax(1) == digits).float().mean()), 4),
        "colour_accuracy": round(float((c_logits.argmax(1) == colours).float().mean()), 4),
        "samples": len(images),
    }


# ----------------------------------------------------------------------------------------------
# stages 4-5: VAEs


def make_vae(factor: int, sample_size: int):
    from diffusers import AutoencoderKL

    blocks = {4: (32, 64, 64), 2: (32, 64)}[factor]
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        norm_num_groups=32, sample_size=sample_size, scaling_factor=1.0, shift_factor=0.0 if factor == 2 else None,
    )


def build_vae(out: Path, factor: int, resolution: int, steps: int, seed: int, crop: int | None = None):
    """Train a small AutoencoderKL (MSE + tiny KL); the scaling factor is set to 1/std of the latents.

    With ``crop``, training uses random ``crop``x``crop`` patches of ``resolution`` renders (the
    network is convolutional, so it runs at the full resolution afterwards).
    """
    gen = _seed(seed)
    train = dw.DigitsDataset("train")
    images, _, _ = train.all_pixels(resolution)
    images = images * 2 - 1
    vae = make_vae(factor, resolution)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 2), pct_start=0.1)
    vae.train()
    loss = torch.tensor(0.0)
    for _ in tqdm(range(steps), desc=f"vae f{factor}", mininterval=5):
        idx = torch.randint(0, len(images), (32,), generator=gen)
        x = _augment_shift(images[idx], 2, gen)
        if crop:
            oy, ox = (int(v) for v in torch.randint(0, resolution - crop + 1, (2,), generator=gen))
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(len(images), 256 if steps < 50 else 2048), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    _save_folder(vae, out)
    return vae, {"final_loss": float(loss.detach()), "scaling_factor": vae.config.scaling_factor}


@torch.no_grad()
def vae_psnr(vae, resolution: int, split: str = "test", limit: int = 1024) -> float:
    images, _, _ = dw.DigitsDataset(split).all_pixels(resolution)
    images = images[:limit]
    recs = []
    for i in range(0, len(images), 128):
        x = images[i : i + 128] * 2 - 1
        recs.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
    rec = (torch.cat(recs) * 255).round() / 255
    mse = ((rec - images) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


# ----------------------------------------------------------------------------------------------
# shared by the teacher stages


@torch.no_grad()
def _encode_latents(vae, resolution: int, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Scaled (and shifted) latent means of the training items (the first ``limit``), with their captions."""
    train = dw.DigitsDataset("train")
    images, _, _ = train.all_pixels(resolution)
    images = images[:limit]
    shift = vae.config.shift_factor or 0.0
    lats = []
    for i in range(0, len(images), 256):
        lat = vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean
        lats.append((lat - shift) * vae.config.scaling_factor)
    captions = [dw.caption(*train._labels(i)) for i in range(len(images))]
    return torch.cat(lats), captions


@torch.no_grad()
def _caption_table(tokenizer, text_encoder, captions: list[str], max_length: int = 77):
    """Text hidden states and pooled outputs of every distinct caption, plus the empty prompt (last row)."""
    unique = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(unique)}
    out = text_encoder(_tokenize(tokenizer, unique, max_length))
    return out.last_hidden_state, out.pooler_output, torch.tensor([index[c] for c in captions])


# ----------------------------------------------------------------------------------------------
# stage 6: UNet teacher


def make_unet(cross_attention_dim: int = 64):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=UNET_RESOLUTION // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def make_ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def build_unet(out: Path, vae, tokenizer, text_encoder, cfg: BuildConfig):
    gen = _seed(cfg.seed + 6)
    latents, captions = _encode_latents(vae, UNET_RESOLUTION, 256 if cfg.quick else None)
    hidden, _, cap_idx = _caption_table(tokenizer, text_encoder, captions)
    empty = len(hidden) - 1
    schedule = NoiseSchedule.from_scheduler_config(make_ddim_scheduler())
    unet = make_unet(text_encoder.config.hidden_size)
    ema = teacher_ema(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.01)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, _teacher_lr_lambda(cfg.steps.unet, "unet" in cfg.cosine_decay))
    unet.train()
    losses = []
    for step in tqdm(range(cfg.steps.unet), desc="unet teacher", mininterval=5):
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        c = cap_idx[idx].clone()
        c[torch.rand(len(c), generator=gen) < cfg.caption_dropout] = empty
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t, target = _noised_and_target(schedule, x0, eps, t)
        pred = unet(x_t, t, encoder_hidden_states=hidden[c]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        warm.step()
        ema.update()
        losses.append(float(loss.detach()))
    ema.copy_to(unet)
    unet.eval()
    _save_folder(unet, out)
    tail = losses[-50:] or [float("nan")]
    return unet, {"final_loss": sum(tail) / len(tail)}


# ----------------------------------------------------------------------------------------------
# stage 7: DiT (Flux) teacher


def make_flux(text_dim: int = 64, pooled_dim: int = 64):
    """The DiT teacher: 3 double-stream + 6 single-stream blocks, width 128 (4 heads of 32), about 3.4 M
    parameters; text from the T5 tower (``text_dim``) and the CLIP pooled output (``pooled_dim``)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=3, num_single_layers=6, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, guidance_embeds=False,
        axes_dims_rope=[8, 12, 12],
    )


def make_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def flux_pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def flux_image_ids(h: int, w: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)


@torch.no_grad()
def _t5_table(tokenizer, encoder, captions: list[str], lengths) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """T5 hidden states of every distinct caption plus the empty prompt (last row), at each padded length,
    encoded exactly as FluxPipeline encodes them (no attention mask)."""
    unique = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(unique)}
    table = {int(n): encoder(_tokenize(tokenizer, unique, int(n)))[0] for n in lengths}
    return table, torch.tensor([index[c] for c in captions])


def _save_dit_checkpoint(path: Path, step: int, model, ema, opt, sched, gen: torch.Generator, losses,
                         seconds: float) -> None:
    """The DiT stage's resumable state (a complete old or new folder at every moment)."""
    from safetensors.torch import save_file

    with atomic_folder(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                    "ema_updates": ema.num_updates}, tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses, "seconds": seconds}))


def _load_dit_checkpoint(path: Path, model, ema, opt, sched, gen: torch.Generator) -> tuple[int, list[float], float]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")))
    shadow = load_file(str(path / "ema.safetensors"))
    ema.shadow = {n: shadow[n] for n in ema.names}  # the EMA pairs shadow and parameters by order
    state = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    ema.num_updates = int(state["ema_updates"])
    progress = json.loads((path / "progress.json").read_text())
    return int(progress["step"]), list(progress["losses"]), float(progress.get("seconds", 0.0))


def build_dit(out: Path, vae_f2, tokenizer, text_encoder, t5_tokenizer, t5_encoder, cfg: BuildConfig):
    """The FluxTransformer teacher, trained by flow matching (logit-normal sigmas, 10% caption dropout).

    The T5 text is padded to a random length from :data:`DIT_TRAIN_TEXT_LENGTHS` each step (FluxPipeline
    pads to ``max_sequence_length`` and passes the pads on), so that the number of pads is not a signal.
    The stage checkpoints every ``cfg.dit_checkpoint_every`` steps next to ``out`` and resumes from there.
    """
    gen = _seed(cfg.seed + 7)
    latents, captions = _encode_latents(vae_f2, DIT_RESOLUTION, 256 if cfg.quick else None)
    packed = flux_pack(latents)  # [N, 64, 16]
    _, pooled, cap_idx = _caption_table(tokenizer, text_encoder, captions, 77)
    t5_hidden, t5_idx = _t5_table(t5_tokenizer, t5_encoder, captions, DIT_TRAIN_TEXT_LENGTHS)
    if not torch.equal(cap_idx, t5_idx):
        raise RuntimeError("caption tables disagree")  # both sort the same captions
    empty = len(pooled) - 1
    img_ids = flux_image_ids(latents.shape[-2], latents.shape[-1])
    schedule = NoiseSchedule.from_scheduler_config(make_flow_scheduler())
    model = make_flux(t5_encoder.config.d_model, text_encoder.config.hidden_size)
    ema = teacher_ema(model, cfg.dit_ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _teacher_lr_lambda(cfg.steps.dit, "dit" in cfg.cosine_decay, 100))
    ckpt = out.parent / f"{out.name}.checkpoint"
    start, losses, before = (0, [], 0.0)
    t0 = time.time()
    if ckpt.exists():
        start, losses, before = _load_dit_checkpoint(ckpt, model, ema, opt, sched, gen)
        logger.info("resuming the DiT stage at step %d from %s", start, ckpt)
    model.train()
    bar = tqdm(range(start, cfg.steps.dit), desc="dit teacher", mininterval=5, initial=start, total=cfg.steps.dit)
    for step in bar:
        length = DIT_TRAIN_TEXT_LENGTHS[int(torch.randint(0, len(DIT_TRAIN_TEXT_LENGTHS), (1,), generator=gen))]
        idx = torch.randint(0, len(packed), (cfg.dit_batch,), generator=gen)
        x0 = packed[idx]
        c = cap_idx[idx].clone()
        c[torch.rand(len(c), generator=gen) < cfg.caption_dropout] = empty
        sigma = torch.sigmoid(torch.randn(len(idx), generator=gen))  # logit-normal
        eps = torch.randn(x0.shape, generator=gen)
        x_t, target = _noised_and_target(schedule, x0, eps, sigma)
        pred = model(
            hidden_states=x_t, timestep=sigma, pooled_projections=pooled[c], encoder_hidden_states=t5_hidden[length][c],
            txt_ids=torch.zeros(length, 3), img_ids=img_ids, return_dict=False,
        )[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update()
        losses.append(round(float(loss.detach()), 5))
        if (step + 1) % cfg.dit_checkpoint_every == 0 and step + 1 < cfg.steps.dit:
            _save_dit_checkpoint(ckpt, step + 1, model, ema, opt, sched, gen, losses, before + time.time() - t0)
    ema.copy_to(model)
    model.eval()
    _save_folder(model, out)
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    tail = losses[-50:] or [float("nan")]
    return model, {"final_loss": sum(tail) / len(tail), "train_seconds_all_runs": round(before + time.time() - t0, 1),
                   "resumed_at": start or None}


# ----------------------------------------------------------------------------------------------
# assembly


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def assemble_pipelines(out_dir: Path, parts: dict, storage_dtype: str = "float16") -> None:
    from diffusers import FluxPipeline, StableDiffusionPipeline

    sd = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=make_ddim_scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )
    _save_folder(sd, out_dir / "sd-digits", safe_serialization=True)
    # the transformer is stored in float16 (half the package data); stock from_pretrained loads it as float32
    import copy

    stored = copy.deepcopy(parts["dit"]).to(STORAGE_DTYPES[storage_dtype])
    flux = FluxPipeline(
        scheduler=make_flow_scheduler(), vae=parts["vae_f2"], text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"], text_encoder_2=parts["t5_encoder"], tokenizer_2=parts["t5_tokenizer"],
        transformer=stored,
    )
    _save_folder(flux, out_dir / "flux-digits", safe_serialization=True)
    _save_folder(parts["classifier"], out_dir / "classifier")


def build(cfg: BuildConfig, rebuild: tuple[str, ...] = ()) -> dict:
    """Run every stage not yet done in the work folder (and those named in ``rebuild``), then
    assemble the pipeline folders into ``cfg.out_dir``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from fastgen.zoo import t5

    from fastgen.zoo.classifier import DigitsClassifier
    from fastgen.zoo.paths import artifacts_dir

    out_dir = Path(cfg.out_dir) if cfg.out_dir else artifacts_dir()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    info_path = work / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["config"] = asdict(cfg)
    from fastgen.config import save_config

    save_config(cfg, work / "config.yaml")
    unknown = set(rebuild) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown zoo stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")

    def run(name, fn, loader):
        path = work / name
        if path.exists() and name in info.get("done", []) and name not in rebuild:
            logger.info("reusing %s from %s", name, path)
            return loader(path)
        t0 = time.time()
        result = fn(path)
        model, stats = result if isinstance(result, tuple) else (result, {})
        stats["seconds"] = round(time.time() - t0, 1)
        info.setdefault("stages", {})[name] = stats
        info["done"] = sorted(set(info.get("done", [])) | {name})
        atomic_write_json(info_path, info)
        print(f"[zoo] {name}: {stats}", flush=True)
        return model

    steps = cfg.steps
    parts = {}
    parts["tokenizer"] = run("tokenizer", build_tokenizer, CLIPTokenizer.from_pretrained)
    parts["text_encoder"] = run(
        "text_encoder", lambda p: build_text_encoder(p, parts["tokenizer"], steps.text_encoder, cfg.seed + 2),
        CLIPTextModel.from_pretrained,
    )
    parts["text_encoder"].requires_grad_(False).eval()
    parts["t5_tokenizer"] = run("t5_tokenizer", t5.build_t5_tokenizer, T5TokenizerFast.from_pretrained)
    parts["t5_encoder"] = run(
        "t5_encoder", lambda p: t5.build_t5_encoder(p, parts["t5_tokenizer"], steps.t5_encoder, cfg.seed + 8),
        T5EncoderModel.from_pretrained,
    )
    parts["t5_encoder"].requires_grad_(False).eval()
    parts["classifier"] = run(
        "classifier", lambda p: build_classifier(p, steps.classifier, cfg.seed + 3), DigitsClassifier.from_pretrained
    )
    parts["vae"] = run(
        "vae", lambda p: build_vae(p, 4, UNET_RESOLUTION, steps.vae, cfg.seed + 4), AutoencoderKL.from_pretrained
    )
    parts["vae"].requires_grad_(False).eval()
    parts["vae_f2"] = run(
        "vae_f2", lambda p: build_vae(p, 2, DIT_RESOLUTION, steps.vae_f2, cfg.seed + 5),
        AutoencoderKL.from_pretrained,
    )
    parts["vae_f2"].requires_grad_(False).eval()
    parts["unet"] = run(
        "unet", lambda p: build_unet(p, parts["vae"], parts["tokenizer"], parts["text_encoder"], cfg),
        UNet2DConditionModel.from_pretrained,
    )
    parts["dit"] = run(
        "dit", lambda p: build_dit(p, parts["vae_f2"], parts["tokenizer"], parts["text_encoder"], parts["t5_tokenizer"],
                                   parts["t5_encoder"], cfg),
        FluxTransformer2DModel.from_pretrained,
    )
    assemble_pipelines(out_dir, parts, cfg.dit_storage_dtype)
    summary = {
        "classifier_test": classifier_accuracy(parts["classifier"]),
        "vae_psnr_test": round(vae_psnr(parts["vae"], UNET_RESOLUTION), 2),
        "vae_f2_psnr_test": round(vae_psnr(parts["vae_f2"], DIT_RESOLUTION, limit=512), 2),
    }
    info["summary"] = summary
    atomic_write_json(info_path, info)
    meta = {k: info[k] for k in ("config", "stages", "summary") if k in info}
    meta["torch"] = torch.__version__
    atomic_write_json(out_dir / "build_info.json", meta)
    print(f"[zoo] built into {out_dir}: {summary}", flush=True)
    return info
