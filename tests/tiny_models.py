"""Builders of tiny random-weight diffusers pipelines for tests.

Every builder creates the pipeline from configs alone (nothing is downloaded), saves it
with ``save_pretrained(..., safe_serialization=True)`` into ``folder`` and returns the
folder as a :class:`pathlib.Path`.  The networks have a few tens of thousands of
parameters, latents are 8x8 and the VAE has a downsampling factor of 2, so a full
pipeline loads and runs in well under a second on a CPU.

Tokenizers cannot be downloaded either, so they are built offline:

* a CLIP tokenizer from a tiny byte-level BPE trained with the ``tokenizers`` library on
  a handful of sentences (:func:`tiny_clip_tokenizer`);
* a T5 tokenizer from a small hand-made unigram vocabulary (:func:`tiny_t5_tokenizer`).

Builders: :func:`make_tiny_sd` (SD1.x epsilon or SD2.x v-prediction), :func:`make_tiny_sdxl`,
:func:`make_tiny_flux`, :func:`make_tiny_sd3` and :func:`make_tiny_pixart`; stand-ins of released teachers
(their layout and configs scaled down): :func:`make_tiny_sd15`, :func:`make_tiny_sd21_v` and
:func:`make_tiny_flux_dev`.
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from pathlib import Path

import torch

#: Sentences the tiny tokenizers are built from; prompts made of these words tokenize
#: into whole-word tokens, anything else falls back to single characters.
TOKENIZER_CORPUS: tuple[str, ...] = (
    "a photo of a cat sitting on a red sofa",
    "a painting of a dog running on the beach at sunset",
    "an astronaut riding a horse on the moon",
    "a blue car parked in the city at night",
    "portrait of an old man with a beard, oil painting",
    "a bowl of fruit on a wooden table, studio lighting",
)

#: Sequence length of the tiny T5 tokenizers (pipelines must be called with
#: ``max_sequence_length`` <= this value).
T5_MAX_LENGTH = 32

_CLIP_HIDDEN = 32
_SEED = 0


# --------------------------------------------------------------------------- tokenizers


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a tiny byte-level BPE (CLIP conventions) and return its vocab and merges."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(list(TOKENIZER_CORPUS), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    # CLIP's pre-tokenizer marks word ends with "</w>", so every byte symbol must exist
    # both bare and with the suffix, otherwise unseen characters map to <unk>.
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for symbol in (ch, ch + "</w>"):
            if symbol not in vocab:
                vocab[symbol] = len(vocab)
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges  # type: ignore[return-value]


def tiny_clip_tokenizer(model_max_length: int = 77):
    """Return a ``transformers.CLIPTokenizer`` built offline from a tiny trained BPE."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """Return a ``transformers.T5Tokenizer`` with a small hand-made unigram vocabulary."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = sorted({w.strip(",.") for s in TOKENIZER_CORPUS for w in s.split()})
    pieces += [("\u2581" + w, -3.0) for w in words]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += [(c, -6.0) for c in chars]
    pieces += [("\u2581" + c, -7.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# --------------------------------------------------------------------------- text encoders


def _clip_config(tokenizer, hidden: int = _CLIP_HIDDEN, projection_dim: int = _CLIP_HIDDEN, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_clip_text_model(tokenizer, with_projection: bool = False, hidden: int = _CLIP_HIDDEN, hidden_act: str = "quick_gelu"):
    """A 2-layer CLIP text encoder (optionally ``CLIPTextModelWithProjection``; ``hidden_act="gelu"`` as the
    OpenCLIP towers of SD2.x and SDXL)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _clip_config(tokenizer, hidden=hidden, projection_dim=hidden, hidden_act=hidden_act)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_t5_encoder(tokenizer, d_model: int = 32):
    """A 2-layer ``T5EncoderModel`` whose vocabulary matches ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


# --------------------------------------------------------------------------- image parts


def tiny_vae(latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None,
             quant_convs: bool = True):
    """A factor-2 ``AutoencoderKL`` (two blocks) for 16x16 images and 8x8 latents (``quant_convs=False``: no
    ``quant_conv`` / ``post_quant_conv``, as FLUX's VAE)."""
    from diffusers import AutoencoderKL

    extra = {} if quant_convs else {"use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        **extra,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def _tiny_unet(cross_attention_dim: int, *, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        **extra,
    ).eval()


# --------------------------------------------------------------------------- pipelines


def _save(pipe, folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_tiny_sd(folder, prediction_type: str = "epsilon") -> Path:
    """Save a tiny SD1.x-style pipeline (SD2.x-v style with ``prediction_type="v_prediction"``).

    UNet (8, 16) channels with cross-attention dim 32, a factor-2 VAE, one 2-layer CLIP
    text encoder, and a DDIM scheduler with SD's scaled-linear betas.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(_SEED)
    tokenizer = tiny_clip_tokenizer()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        unet=_tiny_unet(cross_attention_dim=_CLIP_HIDDEN),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _save(pipe, folder)


def make_tiny_sdxl(folder) -> Path:
    """Save a tiny SDXL-style pipeline.

    Two CLIP encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``, hidden 32 each,
    so the UNet's cross-attention dim is 64), a ``text_time`` additional embedding with
    ``addition_time_embed_dim=8`` (6 time ids -> 48) plus the 32-dim pooled projection.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(_SEED)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    time_dim = 8
    unet = _tiny_unet(
        cross_attention_dim=2 * _CLIP_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + _CLIP_HIDDEN,
        transformer_layers_per_block=1,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025),
        text_encoder=tiny_clip_text_model(tokenizer),
        text_encoder_2=tiny_clip_text_model(tokenizer_2, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )
    return _save(pipe, folder)


def make_tiny_flux(folder, guidance_embeds: bool = False, *, latent_channels: int = 4, num_single_layers: int = 1,
                   t5_max_length: int = T5_MAX_LENGTH, quant_convs: bool = True, scheduler=None) -> Path:
    """Save a tiny Flux-style pipeline.

    CLIP (pooled, 32) + tiny T5 (hidden 32, at most :data:`T5_MAX_LENGTH` tokens: call the
    pipeline with ``max_sequence_length`` <= 32), a factor-2 VAE with 4 latent channels and
    a non-zero ``shift_factor``, and a 1+1-layer ``FluxTransformer2DModel`` on 2x2-packed
    tokens (``in_channels = 4 * latent_channels = 16``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(_SEED)
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer(model_max_length=t5_max_length)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=_CLIP_HIDDEN,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    pipe = FluxPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
        vae=tiny_vae(latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=quant_convs),
        text_encoder=tiny_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(tokenizer_2, d_model=32),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    return _save(pipe, folder)


def make_tiny_sd3(folder) -> Path:
    """Save a tiny SD3-style pipeline.

    Two ``CLIPTextModelWithProjection`` encoders (hidden 32 each -> 64 after concatenation,
    pooled 32+32), a tiny T5 with ``d_model=64`` (the joint attention dim), a factor-2 VAE
    with ``shift_factor`` and a 1-layer ``SD3Transformer2DModel`` with patch size 2.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(_SEED)
    tok_1, tok_2, tok_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * _CLIP_HIDDEN,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _CLIP_HIDDEN,
        pos_embed_max_size=16,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=tiny_clip_text_model(tok_1, with_projection=True),
        tokenizer=tok_1,
        text_encoder_2=tiny_clip_text_model(tok_2, with_projection=True),
        tokenizer_2=tok_2,
        text_encoder_3=tiny_t5_encoder(tok_3, d_model=2 * _CLIP_HIDDEN),
        tokenizer_3=tok_3,
    )
    return _save(pipe, folder)


def make_tiny_pixart(folder, sigma: bool = False) -> Path:
    """Save a tiny PixArt-alpha (or PixArt-sigma with ``sigma=True``) pipeline.

    A tiny T5 (hidden 32), a factor-2 VAE and a 1-layer ``PixArtTransformer2DModel`` with
    patch size 2 and a learned-sigma output (``out_channels = 2 * in_channels``), like the
    released checkpoints.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(_SEED)
    tokenizer = tiny_t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_num_groups=8,
        interpolation_scale=1,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
    )
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=tokenizer,
        text_encoder=tiny_t5_encoder(tokenizer, d_model=32),
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )
    return _save(pipe, folder)


# --------------------------------------------------------------------------- stand-ins of released teachers
#
# The builders above give each family's pipeline class. These scale down the layout of a released
# checkpoint -- block order, attention layout, prediction type, scheduler config, text encoders, added
# conditioning, guidance embedding -- for tests that run the recipes written for those checkpoints
# (tests/test_recipe_smoke.py).


def _sd_layout_unet(cross_attention_dim: int, attention_head_dim, **extra):
    """SD1.x/2.x's UNet order scaled to two blocks: cross-attention in the down blocks but the last
    (``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``), mirrored going up, a cross-attention mid block."""
    return _tiny_unet(cross_attention_dim, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=attention_head_dim, **extra)


def tiny_safety_checker():
    """SD1.x's ``StableDiffusionSafetyChecker`` + ``CLIPImageProcessor`` with a 1-layer, 32 px vision tower."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionSafetyChecker(config).eval(), processor


#: the released SD 1.x / 2.x scheduler configs' noise schedule
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    set_alpha_to_one=False, steps_offset=1)


def make_tiny_sd15(folder) -> Path:
    """Save a stand-in of Stable Diffusion 1.5: a CLIP ViT-L-style text encoder (``quick_gelu``), SD's UNet
    layout (conv ``proj_in``/``proj_out``, one head count for every block), epsilon prediction, the released
    ``PNDMScheduler`` config (``skip_prk_steps``, ``steps_offset=1``), and a safety checker + feature extractor."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(_SEED)
    tokenizer = tiny_clip_tokenizer()
    scheduler = PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, prediction_type="epsilon")
    safety_checker, feature_extractor = tiny_safety_checker()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        unet=_sd_layout_unet(cross_attention_dim=_CLIP_HIDDEN, attention_head_dim=2),
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        image_encoder=None,
        requires_safety_checker=True,
    )
    return _save(pipe, folder)


def make_tiny_sd21_v(folder) -> Path:
    """Save a stand-in of Stable Diffusion 2.1 (768-v): an OpenCLIP-H-style text encoder (``gelu``), SD's UNet
    layout with SD2's linear ``proj_in``/``proj_out``, per-block head counts and ``upcast_attention``,
    v-prediction with the released ``DDIMScheduler`` config, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(_SEED)
    tokenizer = tiny_clip_tokenizer()
    scheduler = DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, prediction_type="v_prediction")
    unet = _sd_layout_unet(cross_attention_dim=_CLIP_HIDDEN, attention_head_dim=(1, 2), use_linear_projection=True,
                           upcast_attention=True)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(tokenizer, hidden_act="gelu"),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _save(pipe, folder)


def make_tiny_flux_dev(folder) -> Path:
    """Save a stand-in of FLUX.1-dev: the guidance embedding (``guidance_embeds=True``), CLIP (pooled) + T5
    (tokenizer length 512, FluxPipeline's default), a 16-channel VAE without quant convs (FLUX's scaling and
    shift), double blocks before single blocks (1 + 4, so that CLEAR's ``align_every: 4`` finds a single
    block), and the released dynamic-shift ``FlowMatchEulerDiscreteScheduler`` config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return make_tiny_flux(folder, guidance_embeds=True, latent_channels=16, num_single_layers=4, t5_max_length=512,
                          quant_convs=False, scheduler=scheduler)


__all__ = [
    "T5_MAX_LENGTH",
    "TOKENIZER_CORPUS",
    "make_tiny_flux",
    "make_tiny_flux_dev",
    "make_tiny_pixart",
    "make_tiny_sd",
    "make_tiny_sd15",
    "make_tiny_sd21_v",
    "make_tiny_sd3",
    "make_tiny_sdxl",
    "tiny_clip_text_model",
    "tiny_clip_tokenizer",
    "tiny_t5_encoder",
    "tiny_t5_tokenizer",
    "tiny_vae",
]


def tiny_open_clip_cfg(image_size: int, patch_size: int) -> dict:
    """A tiny open_clip architecture (ViT image tower, 77-token text tower with the real BPE vocabulary)."""
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


@contextlib.contextmanager
def tiny_open_clip_configs(hps_name: str, clip_name: str):
    """Register tiny open_clip configs: ``hps_name`` at 224 px (HPS's fixed size), ``clip_name`` at 64 px."""
    from open_clip import factory as oc_factory

    added = {hps_name: tiny_open_clip_cfg(224, 32), clip_name: tiny_open_clip_cfg(64, 16)}
    oc_factory._MODEL_CONFIGS.update(added)
    try:
        yield
    finally:
        for name in added:
            oc_factory._MODEL_CONFIGS.pop(name, None)


# --------------------------------------------------------------------------- test images


def pattern_card(width: int, height: int, checker: int = 16):
    """A deterministic RGB PIL test card: wrapping ramps, products and a ``checker``-pixel checkerboard."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    r = (x * 7 + y * 3) % 256
    g = (x * y // 5) % 256
    b = np.where((x // checker + y // checker) % 2 == 0, 230, 20) + 0 * x
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8), "RGB")


def random_images(n: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    """``n`` seeded uniform images ``[n, 3, height, width]`` in [0, 1]."""
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def build_method(method_cls, sections: dict | None = None, **options):
    """A method built through the run-config path from flat options: the method's own fields and the
    shared sections' fields under their old flat names (``teacher``, ``resolution``, ``dataset``,
    ``sample_steps`` ...), as :func:`fastgen.trainers.engine.run.migrate_recipe` maps them; ``sections``
    gives shared-section values by their new names (``{"data": {"vae_sample": True}}``)."""
    import warnings

    from fastgen.config import load_config
    from fastgen.trainers.engine.run import build_method as build, method_section, migrate_recipe, run_config_class

    section = method_section(method_cls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = migrate_recipe({section: dict(options)}, method_cls)
    for name, values in (sections or {}).items():
        data.setdefault(name, {}).update(values)
    cfg = load_config(run_config_class(method_cls), None, base=data)
    return build(cfg, method_cls)
