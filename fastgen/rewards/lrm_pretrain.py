"""Pre-training a latent proxy reward model (LRM) for a real teacher on image-caption data.

``fastgen lrm pretrain --teacher FOLDER --data SOURCE [key=value ...]`` (:func:`pretrain_lrm_on_data`):

* **latents**: the teacher's own VAE encodes every image exactly as the teacher's pipeline does
  (``(mean - shift_factor) * scaling_factor``, the diffusion space the student's outputs live in);
  only the VAE, the tokenizer and the text encoder are loaded, never the denoiser;
* **text**: the LRM reads the teacher's tokens at full length (77 for CLIP tokenizers): with
  ``text_tower=teacher`` (the default) its text tower *is* a copy of the teacher's CLIP text encoder
  (SD2.x: OpenCLIP ViT-H/14's text tower, the one RG-LCD's LRM uses) plus a new projection; with
  ``text_tower=open_clip`` an open_clip text transformer loaded from a local checkpoint;
* **image tower**: the ``rg-lcd-vit`` preset is RG-LCD's ``latent_ViT`` (patch 4, width 512,
  12 layers, 8 heads, embedding 1024) over the teacher's latents at the chosen resolution;
* **loss**: CLIP's symmetric InfoNCE (identical captions in a batch are all positives), plus, with
  ``expert=...``, a distillation of an expert pixel reward over the batch's decoded latents (the
  same Bradley-Terry view of the expert the online alignment uses, over more than two candidates);
* **output**: ``config.json`` + ``model.safetensors`` + ``tokenizer/`` (+ ``pretrain_metrics.json``)
  written atomically; :meth:`LatentRewardModel.from_pretrained` reloads it (safetensors only).

Sources: an image-caption folder (``img.png`` + ``img.txt`` or ``metadata.jsonl``), webdataset shards
(a ``.tar``, a brace pattern or a folder of them; streamed) or a latent cache folder of this teacher
(``index.json``; its latents are used as they are).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from fastgen.errors import ConfigError, DataError, ModelLoadError, ResolutionError
from fastgen.losses import label_aware_info_nce
from fastgen.rewards.latent_proxy import (
    CONFIG_FILE,
    FORMAT,
    METRICS_FILE,
    LatentRewardModel,
    LRMConfig,
    LRMPretrainConfig,
    contrastive_step,
)
from fastgen.rewards.lrm_towers import clip_text_config, open_clip_text_config

__all__ = [
    "PRESETS",
    "TeacherParts",
    "build_lrm",
    "caption_retrieval_accuracy",
    "load_open_clip_state",
    "load_teacher_parts",
    "pretrain_lrm_on_data",
    "resolve_architecture",
]

#: Architecture presets of :class:`LRMPretrainConfig` (``preset=``); ``None`` fields of the config take these.
PRESETS: dict[str, dict[str, Any]] = {
    # the digits world's LRM: a small CNN and a 2-layer, 64-wide, 16-token text transformer from scratch
    "digits-cnn": {"tower": "cnn", "width": 64, "depth": 3, "patch_size": 2, "heads": 4, "embed_dim": 64,
                   "text_tower": "transformer", "text_max_length": 16, "text_width": 64, "text_layers": 2,
                   "text_heads": 4, "unlocked_text_layers": -1, "unlocked_image_layers": -1},
    # RG-LCD's latent_ViT (open_clip_customized/model_configs/latent_ViT.json): 4-channel latents, patch 4,
    # 12 layers of width 512 (head width 64), embedding 1024 (ViT-H-14's); the text tower is the teacher's
    # own CLIP text encoder (SD2.x: ViT-H-14's text tower) at 77 tokens.  During online alignment RG-LCD
    # trains the last 5 text layers and the last image group (last block + final norm + projection).
    "rg-lcd-vit": {"tower": "vit", "width": 512, "depth": 12, "patch_size": 4, "heads": 8, "embed_dim": 1024,
                   "text_tower": "teacher", "text_max_length": None, "text_width": 512, "text_layers": 12,
                   "text_heads": 8, "unlocked_text_layers": 5, "unlocked_image_layers": 1},
    # a seconds-long stand-in for tests and smoke runs (tiny teachers): a 1-layer ViT, the teacher's text encoder
    "tiny": {"tower": "vit", "width": 32, "depth": 1, "patch_size": 2, "heads": 2, "embed_dim": 16,
             "text_tower": "teacher", "text_max_length": None, "text_width": 32, "text_layers": 1, "text_heads": 2,
             "unlocked_text_layers": -1, "unlocked_image_layers": -1},
}

_ARCH_KEYS = tuple(PRESETS["digits-cnn"])
_PRETRAIN_TEXT_TOWERS = {"transformer": "transformer", "teacher": "clip", "open_clip": "open_clip"}


# --------------------------------------------------------------------------- configuration


def check_pretrain_config(config: LRMPretrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid optimisation setting."""
    for name in ("steps", "batch_size", "log_every", "eval_size", "vae_batch_size", "expert_batch_size"):
        if int(getattr(config, name)) < 1:
            raise ConfigError(f"LRM pre-training: {name} must be positive, got {getattr(config, name)}")
    if config.batch_size < 2:
        raise ConfigError("LRM pre-training: batch_size must be at least 2 for a contrastive loss")
    if not config.lr > 0 or config.text_lr_scale < 0:
        raise ConfigError(f"LRM pre-training: lr must be > 0 and text_lr_scale >= 0, got {config.lr}, {config.text_lr_scale}")
    if config.mixed_precision not in ("no", "bf16"):
        raise ConfigError(f"LRM pre-training: mixed_precision must be 'no' or 'bf16', got {config.mixed_precision!r}")
    if config.num_workers < 0:
        raise ConfigError(f"LRM pre-training: num_workers must be >= 0, got {config.num_workers}")


def resolve_architecture(config: LRMPretrainConfig) -> dict[str, Any]:
    """The preset's architecture overridden by every architecture field of ``config`` that is not ``None``
    (plus ``"preset"``: the preset's name)."""
    name = config.preset
    if name == "auto":
        name = "digits-cnn" if config.data == "digits" else "rg-lcd-vit"
    if name not in PRESETS:
        raise ConfigError(f"LRM pre-training: unknown preset {config.preset!r}; use auto, {', '.join(PRESETS)}")
    arch = dict(PRESETS[name])
    for key in _ARCH_KEYS:
        value = getattr(config, key)
        if value is not None:
            arch[key] = value
    if arch["text_tower"] not in _PRETRAIN_TEXT_TOWERS:
        raise ConfigError(f"LRM pre-training: unknown text_tower {arch['text_tower']!r}; use transformer (from scratch), "
                          f"teacher (a copy of the teacher's text encoder) or open_clip")
    arch["preset"] = name
    return arch


def load_open_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip checkpoint: a ``.safetensors`` file, or a torch file read with
    ``weights_only=True`` (a bare state dict or ``{"state_dict": ...}`` as HPS ships it)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"open_clip checkpoint {path} not found; pass open_clip_checkpoint=<local weights file> "
                             f"(e.g. open_clip_pytorch_model.bin / open_clip_model.safetensors of the model)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is a load error naming the file
        raise ModelLoadError(f"cannot read open_clip checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelLoadError(f"open_clip checkpoint {path} holds no state dict of tensors")
    return state


def build_lrm(config: LRMPretrainConfig, arch: dict[str, Any], tokenizer: Any, latent_channels: int, latent_size: int,
              meta: dict, text_encoder: torch.nn.Module | None = None) -> LatentRewardModel:
    """A new, trainable LRM for ``[latent_channels, latent_size, latent_size]`` latents with the architecture
    ``arch`` (:func:`resolve_architecture`); its text tower is initialised as ``arch["text_tower"]`` says:
    ``teacher`` copies ``text_encoder``, ``open_clip`` loads ``config.open_clip_checkpoint`` (random when
    ``None``), ``transformer`` starts from scratch."""
    kind = arch["text_tower"]
    common = dict(latent_channels=int(latent_channels), latent_size=int(latent_size), tower=arch["tower"],
                  width=int(arch["width"]), depth=int(arch["depth"]), patch_size=int(arch["patch_size"]),
                  heads=int(arch["heads"]), embed_dim=int(arch["embed_dim"]), vocab_size=len(tokenizer))
    unlocked = dict(unlocked_text_layers=int(arch["unlocked_text_layers"]), unlocked_image_layers=int(arch["unlocked_image_layers"]))
    meta = dict(meta)
    if kind == "transformer":
        text = dict(text_max_length=int(arch["text_max_length"] or 77), text_width=int(arch["text_width"]),
                    text_layers=int(arch["text_layers"]), text_heads=int(arch["text_heads"]))
        return LatentRewardModel(LRMConfig(**common, **unlocked, **text), tokenizer, meta=meta).unfreeze()
    if kind == "teacher":
        if text_encoder is None:
            raise ModelLoadError(f"text_tower=teacher copies the teacher's `{config.text_encoder}` component, which the "
                                 f"teacher {config.teacher} does not have; use text_tower=transformer or open_clip")
        text_config = clip_text_config(text_encoder)
        positions = int(text_config.get("max_position_embeddings", 77))
        meta["text_init"] = f"teacher:{config.text_encoder}"
    else:
        if not config.open_clip_model:
            raise ConfigError("text_tower=open_clip needs open_clip_model=<architecture> (e.g. ViT-H-14, RG-LCD's text "
                              "tower) and open_clip_checkpoint=<local weights file>")
        text_config = open_clip_text_config(config.open_clip_model, tokenizer)
        positions = int(text_config["text_cfg"].get("context_length", 77))
        meta["text_init"] = f"open_clip:{config.open_clip_model}:{config.open_clip_checkpoint or 'random'}"
    model_max = getattr(tokenizer, "model_max_length", positions) or positions
    length = min(positions, int(model_max) if model_max < 10**6 else positions)
    if arch.get("text_max_length"):
        length = min(length, int(arch["text_max_length"]))
    text_config = json.loads(json.dumps(text_config))  # what config.json will hold, so a reload compares equal
    cfg = LRMConfig(**common, **unlocked, text_tower=_PRETRAIN_TEXT_TOWERS[kind], text_config=text_config,
                    text_max_length=length)
    lrm = LatentRewardModel(cfg, tokenizer, meta=meta)
    if kind == "teacher":
        lrm.text_tower.load_from(text_encoder)
    elif config.open_clip_checkpoint:
        lrm.text_tower.load_from(load_open_clip_state(config.open_clip_checkpoint), str(config.open_clip_checkpoint))
    return lrm.unfreeze()


def lrm_optimizer(lrm: LatentRewardModel, config: LRMPretrainConfig, arch: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.98); an initialised text tower trains at ``lr * text_lr_scale``, only its last
    ``train_text_layers`` layers (all with -1)."""
    kw = dict(lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    lrm.set_trainable(config.train_text_layers, -1)
    if arch["text_tower"] == "transformer" and config.train_text_layers < 0:
        return torch.optim.AdamW(lrm.parameters(), **kw)
    text = [p for p in lrm.text_tower.parameters() if p.requires_grad]
    text_ids = {id(p) for p in lrm.text_tower.parameters()}
    rest = [p for p in lrm.parameters() if p.requires_grad and id(p) not in text_ids]
    scale = 1.0 if arch["text_tower"] == "transformer" else config.text_lr_scale
    groups = [{"params": rest}] + ([{"params": text, "lr": config.lr * scale}] if text and scale > 0 else [])
    if not text or scale == 0:
        for p in text:
            p.requires_grad_(False)
    return torch.optim.AdamW(groups, **kw)


# --------------------------------------------------------------------------- the teacher's parts


@dataclass
class TeacherParts:
    """What LRM pre-training needs of a teacher: its VAE (and latent convention), tokenizer and text encoder."""

    path: Path
    vae: torch.nn.Module
    tokenizer: Any
    text_encoder: torch.nn.Module | None
    scaling_factor: float
    shift_factor: float
    vae_scale_factor: int
    latent_channels: int
    default_resolution: int | None

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> diffusion-space latents, as :meth:`fastgen.models.teacher.Teacher.encode`:
        ``(z - shift_factor) * scaling_factor`` with ``z`` the posterior mean (or a sample)."""
        p = next(self.vae.parameters())
        dist = self.vae.encode(pixels.to(device=p.device, dtype=p.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode01(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents -> images in [0, 1] (as :meth:`fastgen.models.teacher.Teacher.decode`)."""
        p = next(self.vae.parameters())
        z = latents.to(device=p.device, dtype=p.dtype) / self.scaling_factor + self.shift_factor
        return ((self.vae.decode(z).sample.float().clamp(-1, 1) + 1) / 2)


def _component(path: Path, index: dict, name: str, library_default: str):
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        listed = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple)) and v[1])
        raise ModelLoadError(f"teacher {path} has no `{name}` component (model_index.json lists {', '.join(listed)}); "
                             f"LRM pre-training needs the teacher's vae and tokenizer (and text encoder for text_tower=teacher)")
    library, cls_name = entry
    import importlib

    try:
        module = importlib.import_module(library or library_default)
        cls = getattr(module, cls_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"teacher {path}: cannot find class {cls_name} of component `{name}` ({exc})") from exc
    try:
        if library == "transformers" or library_default == "transformers":
            return cls.from_pretrained(str(path / name), local_files_only=True)
        return cls.from_pretrained(str(path), subfolder=name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - report any loader failure uniformly
        raise ModelLoadError(f"cannot load the teacher's `{name}` from {path / name} ({type(exc).__name__}: {exc}); "
                             f"re-save the pipeline with pipe.save_pretrained(...)") from exc


def load_teacher_parts(teacher: str, text_encoder: str | None = "text_encoder", device: str | torch.device = "cpu") -> TeacherParts:
    """Load the VAE, tokenizer and (``text_encoder``, unless ``None``) text encoder of a teacher folder or alias,
    after :func:`fastgen.models.loading.check_pipeline_folder` has validated the folder (clear errors for a
    wrong folder or a missing weights file); the denoiser is not loaded."""
    from fastgen.models.loading import check_pipeline_folder
    from fastgen.zoo.paths import resolve_model

    path = resolve_model(teacher)
    index, _ = check_pipeline_folder(path)
    vae = _component(path, index, "vae", "diffusers").to(device).eval().requires_grad_(False)
    tokenizer = _component(path, index, "tokenizer", "transformers")
    encoder = None
    if text_encoder:
        encoder = _component(path, index, text_encoder, "transformers").to(device).eval().requires_grad_(False)
    cfg = vae.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    default = None
    if index.get("_class_name") == "FluxPipeline":
        default = 128 * factor
    else:
        for name in ("unet", "transformer"):
            file = path / name / "config.json"
            if file.is_file():
                size = json.loads(file.read_text()).get("sample_size")
                if isinstance(size, (list, tuple)):
                    size = size[0]
                if size:
                    default = int(size) * factor
                break
    return TeacherParts(path=path, vae=vae, tokenizer=tokenizer, text_encoder=encoder,
                        scaling_factor=float(cfg.get("scaling_factor", 1.0) or 1.0),
                        shift_factor=float(cfg.get("shift_factor", 0.0) or 0.0), vae_scale_factor=factor,
                        latent_channels=int(cfg.latent_channels), default_resolution=default)


# --------------------------------------------------------------------------- data


def _open_source(config: LRMPretrainConfig, resolution: int, count_tokens, max_tokens: int):
    """``(dataset, kind)`` of ``config.data``: a folder, shards or a latent cache."""
    from fastgen.data.cache import CachedDataset
    from fastgen.data.folders import ImageCaptionFolder
    from fastgen.data.shards import ImageCaptionShards, check_shards, expand_shards
    from fastgen.data.sources import DataConfig, source_kind

    kind = source_kind(DataConfig(source=config.data))
    if kind not in ("folder", "shards", "cache"):
        raise ConfigError(f"LRM pre-training data {config.data!r} is a {kind} source; pass data=digits, an image-caption "
                          f"folder, webdataset shards or a latent cache of this teacher")
    captions = {"max_caption_tokens": max_tokens, "count_tokens": count_tokens}
    if kind == "folder":
        return ImageCaptionFolder(Path(config.data), resolution=resolution, **captions), kind
    if kind == "shards":
        check_shards(expand_shards(config.data))
        return ImageCaptionShards(config.data, resolution=resolution, shuffle_shards=True,
                                  shuffle_buffer=config.shuffle_buffer, seed=config.seed, **captions), kind
    return CachedDataset(Path(config.data)), kind


def _batches(dataset, batch_size: int, config: LRMPretrainConfig, gen: torch.Generator) -> Iterator[dict]:
    """Endless batches (epoch after epoch; shuffled for map-style data)."""
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=not iterable, drop_last=True,
                                         num_workers=config.num_workers, generator=None if iterable else gen)
    epoch = 0
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise DataError(f"data source {config.data!r} gave no complete batch of {batch_size}; lower batch_size")
        epoch += 1


@torch.no_grad()
def caption_retrieval_accuracy(lrm: LatentRewardModel, latents: torch.Tensor, captions: list[str], batch: int = 256) -> float:
    """Fraction of latents whose best-scoring caption among the distinct ``captions`` is their own."""
    uniq = list(dict.fromkeys(captions))
    was_training = lrm.training
    lrm.eval()
    txt = torch.cat([lrm.encode_tokens(*lrm.tokenize(uniq[i : i + batch])) for i in range(0, len(uniq), batch)])
    correct = 0
    for i in range(0, len(latents), batch):
        pred = (lrm.encode_latents(latents[i : i + batch]) @ txt.t()).argmax(1).tolist()
        correct += sum(uniq[p] == captions[i + j] for j, p in enumerate(pred))
    lrm.train(was_training)
    return correct / max(1, len(latents))


def _is_lrm_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, protect: list[Path]) -> None:
    for p in protect:
        a, b = out.resolve(), Path(p).resolve()
        if a == b or b in a.parents or a in b.parents:
            raise ConfigError(f"LRM output folder {out} overlaps {p}; choose a folder outside the teacher and the data")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"LRM output {out} is a file; pass a new (or empty) folder")
        if any(out.iterdir()) and not _is_lrm_folder(out):
            raise ConfigError(f"LRM output folder {out} holds other files (it is not an LRM folder); choose a new or "
                              f"empty folder, an existing LRM folder is replaced")


# --------------------------------------------------------------------------- pre-training


def _expert_distillation(lrm: LatentRewardModel, expert, parts: TeacherParts, latents: torch.Tensor,
                         captions: list[str], img: torch.Tensor, txt: torch.Tensor, k: int) -> torch.Tensor:
    """KL(expert || LRM) of each caption's softmax over the first ``k`` images of the batch (Bradley-Terry
    logits: the expert's reward times its ``preference_scale``, the LRM's cosine times ``exp(logit_scale)``)."""
    with torch.no_grad():
        images = parts.decode01(latents[:k])
        dev = next(iter(expert.parameters()), images).device
        prompts = [c for c in captions[:k] for _ in range(k)]
        r = expert(images.to(dev).repeat(k, 1, 1, 1), prompts).float().view(k, k) * float(expert.preference_scale())
        p = torch.softmax(r.to(img.device), dim=1)
    s = lrm.scale() * txt[:k] @ img[:k].t()
    return (p * (p.clamp_min(1e-12).log() - F.log_softmax(s, dim=1))).sum(1).mean()


def pretrain_lrm_on_data(config: LRMPretrainConfig) -> Path:
    """Pre-train an LRM on ``config.data`` (an image-caption folder, webdataset shards or a latent cache)
    with ``config.teacher``'s VAE and tokenizer (see the module docstring), save it and return the folder.

    ``<out>/pretrain_metrics.json`` records the retrieval accuracy (top-1 over the distinct captions of a
    held-out tenth, at most ``eval_size`` items, of a folder or cache; of the first ``eval_size`` training
    items for shards), losses, timings and the resolved configs.
    """
    from tqdm.auto import tqdm

    from fastgen.io import atomic_folder
    from fastgen.rewards import load_reward

    t_start = time.time()
    check_pretrain_config(config)
    arch = resolve_architecture(config)
    teacher_name = Path(str(config.teacher)).name or "teacher"
    config = replace(config, out=config.out or f"runs/lrm-{teacher_name}")
    out = Path(config.out)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    from fastgen.data.sources import DataConfig, source_kind

    source_kind(DataConfig(source=config.data))  # a wrong data path fails before any model loads
    parts = load_teacher_parts(config.teacher, config.text_encoder if arch["text_tower"] == "teacher" else None, device)
    _check_out(out, [parts.path] + ([Path(config.data)] if Path(config.data).exists() else []))
    resolution = int(config.resolution or parts.default_resolution or 0)
    if resolution <= 0:
        raise ConfigError(f"cannot tell the default image size of teacher {config.teacher}; pass resolution=<pixels>")
    if resolution % parts.vae_scale_factor:
        raise ResolutionError(f"resolution {resolution} is not a multiple of the teacher's VAE factor {parts.vae_scale_factor}; "
                              f"use e.g. {max(1, round(resolution / parts.vae_scale_factor)) * parts.vae_scale_factor}")
    latent_size = resolution // parts.vae_scale_factor
    meta = {"teacher": str(config.teacher), "teacher_path": str(parts.path), "data": str(config.data),
            "resolution": resolution, "vae_scale_factor": parts.vae_scale_factor, "scaling_factor": parts.scaling_factor,
            "shift_factor": parts.shift_factor, "preset": arch["preset"]}
    if arch["text_tower"] == "transformer":
        meta["text_init"] = "random"
    lrm = build_lrm(config, arch, parts.tokenizer, parts.latent_channels, latent_size, meta,
                    text_encoder=parts.text_encoder).to(device)
    parts.text_encoder = None  # copied; free it
    config = replace(config, **{k: v for k, v in arch.items() if hasattr(config, k)})
    tok = parts.tokenizer
    dataset, kind = _open_source(config, resolution, lambda s: len(tok(s).input_ids), lrm.config.text_max_length)

    # held-out items for the retrieval accuracy (map-style sources)
    eval_items: Any = None
    train_set = dataset
    if kind != "shards":
        n = len(dataset)
        if n < 2:
            raise DataError(f"data source {config.data!r} has {n} item(s); contrastive pre-training needs at least 2")
        n_eval = min(config.eval_size, n // 10) if n >= 20 else 0
        perm = torch.randperm(n, generator=gen).tolist()
        if n_eval >= 2:
            eval_items = torch.utils.data.Subset(dataset, perm[:n_eval])
            train_set = torch.utils.data.Subset(dataset, perm[n_eval:])
    bs = config.batch_size if kind == "shards" else min(config.batch_size, len(train_set))
    expert = load_reward(config.expert).to(device) if config.expert is not None else None

    def latents_of(batch: dict) -> torch.Tensor:
        if "latents" in batch:
            z = batch["latents"].to(device=device, dtype=torch.float32)
        else:
            px = batch["pixels"]
            z = torch.cat([parts.encode(px[i : i + config.vae_batch_size], sample=config.vae_sample)
                           for i in range(0, len(px), config.vae_batch_size)])
        lrm.check_latents(z)
        return z

    opt = lrm_optimizer(lrm, config, arch)
    lrm.train()
    warmup = max(1, config.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay (as the digits pre-training)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")
    batches = _batches(train_set, bs, config, gen)
    losses: list[float] = []
    expert_losses: list[float] = []
    encode_s, t_train = 0.0, time.time()
    bar = tqdm(range(config.steps), desc="lrm pretrain", mininterval=2.0)
    for step in bar:
        batch = next(batches)
        t0 = time.time()
        z = latents_of(batch)
        encode_s += time.time() - t0
        captions = [str(c) for c in batch["caption"]]
        uniq = list(dict.fromkeys(captions))
        labels = torch.tensor([uniq.index(c) for c in captions], device=device)
        with autocast:  # the towers only; the losses in float32
            txt = lrm.encode_tokens(*lrm.tokenize(uniq))[labels].float()
            img = lrm.encode_latents(z).float()
        loss = label_aware_info_nce(lrm.scale() * img @ txt.t(), labels)
        if expert is not None and config.expert_weight > 0:
            kd = _expert_distillation(lrm, expert, parts, z, captions, img, txt, min(config.expert_batch_size, len(z)))
            expert_losses.append(float(kd.detach()))
            loss = loss + config.expert_weight * kd
        contrastive_step(lrm, loss, opt, sched, losses, step, config, bar)
    bar.close()
    train_s = time.time() - t_train

    lrm.freeze()

    def gather(items, limit: int) -> tuple[torch.Tensor, list[str]]:
        zs, caps = [], []
        loader = torch.utils.data.DataLoader(items, batch_size=min(limit, 64), num_workers=0)
        for b in loader:
            zs.append(latents_of(b))
            caps += [str(c) for c in b["caption"]]
            if len(caps) >= limit:
                break
        return torch.cat(zs)[:limit], caps[:limit]

    metrics: dict[str, Any] = {}
    if eval_items is not None:
        ez, ec = gather(eval_items, len(eval_items))
        metrics.update(test_retrieval_accuracy=caption_retrieval_accuracy(lrm, ez, ec), num_test_items=len(ec),
                       test_chance=1.0 / len(set(ec)))
    tz, tc = gather(train_set, config.eval_size)
    metrics.update(train_retrieval_accuracy=caption_retrieval_accuracy(lrm, tz, tc), train_chance=1.0 / len(set(tc)))
    window, expert_window = losses[-config.log_every:], expert_losses[-config.log_every:]
    metrics.update({
        "final_loss": sum(window) / max(1, len(window)),
        "final_expert_loss": sum(expert_window) / len(expert_window) if expert_window else None,
        "source_kind": kind,
        "num_train_items": None if kind == "shards" else len(train_set),
        "batch_size": bs,
        "latent_shape": list(lrm.latent_shape),
        "text_max_length": lrm.config.text_max_length,
        "encode_time_s": round(encode_s, 2),
        "train_time_s": round(train_s, 2),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "config": asdict(config),
        "lrm_config": asdict(lrm.config),
    })
    with atomic_folder(out, tag="writing") as tmp:
        lrm.save_pretrained(tmp)
        metrics["wall_time_s"] = round(time.time() - t_start, 2)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    acc = metrics.get("test_retrieval_accuracy", metrics["train_retrieval_accuracy"])
    print(f"LRM retrieval accuracy {acc:.4f} ({'held-out' if eval_items is not None else 'train'}); "
          f"{metrics['wall_time_s']:.0f} s; saved to {out}")
    return out
