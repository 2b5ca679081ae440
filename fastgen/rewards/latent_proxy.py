"""A latent proxy reward model (LRM): a small CLIP-style model that scores VAE latents directly.

Reward-guided distillation backpropagates a reward through the student's outputs.  With an
expert reward over *pixels* that means decoding every sample with the VAE, which is slow and
memory hungry.  A latent reward model instead reads the latents the denoiser produces and
scores them against the prompt without any decoding::

    LRM(z, prompt) = cos(E_img(z), E_txt(prompt))          (forward)
    logits        = cos * exp(logit_scale)                  (logits; logit_scale <= log 100)

It is built in two phases:

1. **Contrastive pre-training** on (latent, caption) pairs (:func:`pretrain_lrm`), with an
   InfoNCE loss that treats every item of the same class as a positive
   (:func:`label_aware_info_nce`): the digits world has only 60 distinct (digit, colour) classes,
   so a batch holds many positives per caption.
2. **Online alignment** with an expert pixel reward while the student trains
   (:class:`LRMAligner`): for each prompt three candidate latents (the student's one-step output,
   the EMA target's output and a real data latent) are decoded and scored by the expert; the LRM
   is trained so that its pairwise Bradley-Terry preferences match the expert's
   (:func:`pairwise_preference_loss`).

Latents are always in the *diffusion space*, i.e. what the denoiser sees: VAE latents minus the
shift factor, times the scaling factor (:meth:`fastgen.models.teacher.Teacher.encode`).

Command line::

    fastgen lrm pretrain [--teacher digits-sd] [--data digits] [--out runs/lrm-digits] [key=value ...]
    python -m fastgen.rewards.latent_proxy pretrain ...        (the same)

Pre-training on real image-caption data for a real teacher lives in :mod:`fastgen.rewards.lrm_pretrain`;
the towers (including full-length CLIP / open_clip text towers) in :mod:`fastgen.rewards.lrm_towers`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.losses import PREFERENCE_PAIRS, label_aware_info_nce
from fastgen.losses import pairwise_preference_kl as pairwise_preference_loss
from fastgen.errors import ConfigError, DataError, FastgenError, ModelLoadError
from fastgen.rewards.base import RewardModel
from fastgen.rewards.lrm_towers import IMAGE_TOWERS, TEXT_TOWERS, build_image_tower, build_text_tower, trainable_parameters

__all__ = [
    "LRMConfig",
    "LatentRewardModel",
    "LRMPretrainConfig",
    "LRMAligner",
    "PAIRS",
    "label_aware_info_nce",
    "pairwise_preference_loss",
    "pretrain_lrm",
    "teacher_decoder",
    "main",
]

#: Upper bound of ``logit_scale`` (CLIP's clamp: the temperature never drops below 1/100).
MAX_LOGIT_SCALE = math.log(100.0)

#: Candidate pairs compared by the alignment loss: (student, target), (student, real), (target, real).
PAIRS: tuple[tuple[int, int], ...] = PREFERENCE_PAIRS

#: Index of the real data latent among the three candidates.
REAL = 2

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "pretrain_metrics.json"
FORMAT = "fastgen-latent-reward-model"

PRETRAIN_HINT = (
    "pre-train an LRM on this teacher (`fastgen lrm pretrain --teacher <teacher folder>`, or "
    "`python -m fastgen.rewards.latent_proxy pretrain --teacher <teacher folder>`)"
)


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# --------------------------------------------------------------------------- configuration


@dataclass
class LRMConfig:
    """Architecture of a :class:`LatentRewardModel`.

    Attributes:
        latent_channels, latent_size: the latents it reads, ``[latent_channels, latent_size, latent_size]``.
        tower: image tower, ``"cnn"`` (conv stem + residual stages + global average pool) or
            ``"vit"`` (patchify + transformer over patch tokens and a class token).
        width: channels of the CNN / token width of the ViT.
        depth: residual stages (CNN) or transformer layers (ViT).
        patch_size: ViT patch size (must divide ``latent_size``).
        heads: ViT attention heads (must divide ``width``).
        embed_dim: size of the shared image-text embedding.
        text_max_length: prompts are padded / truncated to this many tokens.
        text_width, text_layers, text_heads: the text transformer.
        vocab_size: token vocabulary; ``0`` takes the size of the tokenizer.
        init_logit_scale: initial ``logit_scale`` (``log(1/0.07)`` as in CLIP).
        latent_scaling: the latent space it reads; only ``"diffusion"`` (the denoiser's space:
            VAE latents minus shift, times scaling factor) is supported.
        text_tower: ``"transformer"`` (the small tower above, trained from scratch), ``"clip"``
            (a transformers CLIP text model, e.g. a copy of the teacher's text encoder) or
            ``"open_clip"`` (an open_clip text transformer); see :mod:`fastgen.rewards.lrm_towers`.
        text_config: the architecture of a ``clip`` / ``open_clip`` text tower (a config dict, saved in
            ``config.json`` so the LRM rebuilds without its source); ``text_width/layers/heads`` then do
            not apply.
        unlocked_text_layers, unlocked_image_layers: what :meth:`LatentRewardModel.unfreeze` (online
            alignment) trains: the last N layers of each tower plus its final norm and projection;
            ``-1`` = the whole tower (RG-LCD unlocks 5 text layers and the last ViT group).
    """

    latent_channels: int = 4
    latent_size: int = 8
    tower: str = "cnn"
    width: int = 64
    depth: int = 3
    patch_size: int = 2
    heads: int = 4
    embed_dim: int = 64
    text_max_length: int = 16
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 0
    init_logit_scale: float = math.log(1 / 0.07)
    latent_scaling: str = "diffusion"
    text_tower: str = "transformer"
    text_config: dict = field(default_factory=dict)
    unlocked_text_layers: int = -1
    unlocked_image_layers: int = -1

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for name in ("latent_channels", "latent_size", "width", "depth", "embed_dim", "text_max_length",
                     "text_width", "text_layers", "text_heads", "patch_size", "heads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"LRM config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.tower not in IMAGE_TOWERS:
            raise ConfigError(f"LRM config: unknown tower {self.tower!r}; use 'cnn' or 'vit'")
        if self.text_tower not in TEXT_TOWERS:
            raise ConfigError(f"LRM config: unknown text_tower {self.text_tower!r}; use one of {', '.join(TEXT_TOWERS)}")
        if self.text_tower != "transformer" and not self.text_config:
            raise ConfigError(f"LRM config: text_tower={self.text_tower} needs its text_config (the architecture dict); "
                              f"build the LRM with `fastgen lrm pretrain`, which fills it in")
        if self.text_tower == "clip":
            positions = int(self.text_config.get("max_position_embeddings", 77))
            if self.text_max_length > positions:
                raise ConfigError(f"LRM config: text_max_length {self.text_max_length} exceeds the CLIP text tower's "
                                  f"{positions} positions")
            if self.vocab_size > int(self.text_config.get("vocab_size", 0)):
                raise ConfigError(f"LRM config: the tokenizer has {self.vocab_size} tokens but the CLIP text tower's "
                                  f"embedding only {self.text_config.get('vocab_size')}")
        if self.tower == "vit":
            if self.latent_size % self.patch_size:
                raise ConfigError(f"LRM config: patch_size {self.patch_size} does not divide latent_size "
                                  f"{self.latent_size}; pick a patch size that divides it")
            if self.width % self.heads:
                raise ConfigError(f"LRM config: heads {self.heads} does not divide width {self.width}")
        if self.text_tower == "transformer" and self.text_width % self.text_heads:
            raise ConfigError(f"LRM config: text_heads {self.text_heads} does not divide text_width {self.text_width}")
        if self.latent_scaling != "diffusion":
            raise ConfigError(f"LRM config: latent_scaling {self.latent_scaling!r} is not supported; the LRM reads "
                              f"latents in the 'diffusion' space (what the denoiser sees)")
        if self.vocab_size < 1:
            raise ConfigError("LRM config: vocab_size must be positive (0 means 'take it from the tokenizer', "
                              "which needs a tokenizer)")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.latent_channels), int(self.latent_size), int(self.latent_size))


# --------------------------------------------------------------------------- the model


class LatentRewardModel(RewardModel):
    """A reward model over **latents**: ``forward(latents [N,C,H,W], prompts) -> cosine [N]``.

    Unlike pixel reward models it can be trained (``train()`` switches modes normally); it is
    constructed trainable and in eval mode, :meth:`from_pretrained` returns it frozen (like every
    reward model) unless ``trainable=True``.  Text features are cached per prompt only while the
    text tower is frozen and in eval mode; the cache is invalidated whenever its weights change.

    Args:
        config: the architecture; ``vocab_size=0`` takes the tokenizer's size.
        tokenizer: a transformers tokenizer (the teacher's, ``<teacher>/tokenizer``).
        meta: free-form information saved in ``config.json`` (teacher, pre-training data, ...).
    """

    name = "lrm"

    def __init__(self, config: LRMConfig, tokenizer: Any, meta: dict | None = None):
        super().__init__()
        if tokenizer is None:
            raise ConfigError("LatentRewardModel needs a tokenizer (e.g. the teacher's `<teacher>/tokenizer`)")
        if int(config.vocab_size) <= 0:
            config = replace(config, vocab_size=len(tokenizer))
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.meta: dict = dict(meta or {})
        self.image_tower = build_image_tower(config)
        self.text_tower = build_text_tower(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self._text_cache: dict[str, torch.Tensor] = {}
        self._cache_key: tuple | None = None
        self.eval()

    # ------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> "LatentRewardModel":
        """Ordinary ``nn.Module.train`` semantics (pixel reward models never leave eval mode; the LRM can)."""
        self._text_cache.clear()
        self._cache_key = None
        return nn.Module.train(self, mode)

    def unfreeze(self) -> "LatentRewardModel":
        """Trainable parameters (those :attr:`LRMConfig.unlocked_text_layers` / ``unlocked_image_layers``
        unlock; all by default), train mode."""
        self.set_trainable(self.config.unlocked_text_layers, self.config.unlocked_image_layers)
        return self.train()

    def set_trainable(self, text_layers: int = -1, image_layers: int = -1) -> "LatentRewardModel":
        """Make only the last ``text_layers`` / ``image_layers`` layers of each tower (plus its final norm and
        projection, and ``logit_scale``) trainable; ``-1``: the whole tower. Everything else is frozen."""
        self.requires_grad_(False)
        unlocked = trainable_parameters(self.text_tower, int(text_layers)) + trainable_parameters(self.image_tower, int(image_layers))
        for p in unlocked:
            p.requires_grad_(True)
        self.logit_scale.requires_grad_(True)
        self.clear_text_cache()
        return self

    def clear_text_cache(self) -> None:
        self._text_cache.clear()
        self._cache_key = None

    # ------------------------------------------------------------------ shapes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents the model reads."""
        return self.config.latent_shape

    def check_compatible(self, latent_channels: int, latent_size: int | Sequence[int]) -> None:
        """Raise :class:`ConfigError` unless latents ``[latent_channels, *latent_size]`` fit this LRM."""
        size = (int(latent_size), int(latent_size)) if isinstance(latent_size, (int, float)) else tuple(int(s) for s in latent_size)
        given = (int(latent_channels), *size)
        if given != self.latent_shape:
            raise ConfigError(
                f"LRM reads latents {_shape_str(self.latent_shape)} but the teacher's VAE gives {_shape_str(given)}; "
                + PRETRAIN_HINT
            )

    def check_latents(self, latents: torch.Tensor, prompts: Sequence[str] | None = None) -> None:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ConfigError(
                f"LRM reads latents {_shape_str(self.latent_shape)} but got latents "
                f"{_shape_str(latents.shape[1:])} (batch shape {_shape_str(latents.shape)}); pass [N, "
                f"{', '.join(map(str, self.latent_shape))}] latents in the diffusion space, or " + PRETRAIN_HINT
            )
        if prompts is not None and len(prompts) != len(latents):
            raise DataError(f"{len(prompts)} prompts for {len(latents)} latents: the LRM needs exactly one prompt per latent")

    # ------------------------------------------------------------------ encoders

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = self.logit_scale
        return p.device, p.dtype

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[N, text_max_length]`` on the model's device."""
        tok = self.tokenizer([str(p) for p in prompts], padding="max_length", max_length=self.config.text_max_length,
                             truncation=True, return_tensors="pt")
        device, _ = self._device_dtype()
        return tok["input_ids"].to(device), tok["attention_mask"].to(device)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features ``[N, embed_dim]`` of tokenised prompts (no cache)."""
        return F.normalize(self.text_tower(input_ids, attention_mask).float(), dim=-1)

    def _text_version(self) -> tuple | None:
        try:
            return tuple((p.data_ptr(), p._version) for p in self.text_tower.parameters())
        except RuntimeError:  # inference-mode tensors do not track versions: never cache
            return None

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features ``[N, embed_dim]``.

        Computed with gradients while the text tower trains; cached per prompt only in eval mode
        with a frozen text tower (frozen reward use), and recomputed after any weight change.
        """
        prompts = [str(p) for p in prompts]
        frozen = not self.training and not any(p.requires_grad for p in self.text_tower.parameters())
        key = self._text_version() if frozen else None
        if key is None:
            return self.encode_tokens(*self.tokenize(prompts))
        if key != self._cache_key:
            self._text_cache.clear()
            self._cache_key = key
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            # ordinary (not inference-mode) tensors, so cached features can later enter autograd graphs
            with torch.inference_mode(False), torch.no_grad():
                feats = self.encode_tokens(*self.tokenize(missing))
            self._text_cache.update(zip(missing, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    def encode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features ``[N, embed_dim]`` of diffusion-space latents ``[N, C, H, W]``."""
        self.check_latents(latents)
        device, dtype = self._device_dtype()
        return F.normalize(self.image_tower(latents.to(device=device, dtype=dtype)).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` with ``logit_scale`` clamped to ``<= log 100``."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    # ------------------------------------------------------------------ scoring

    def forward(self, latents: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # type: ignore[override]
        """Cosine similarity ``[N]`` between each latent and its prompt (differentiable in ``latents``)."""
        self.check_latents(latents, prompts)
        img = self.encode_latents(latents)
        txt = self.encode_text(prompts).to(img.device)
        return (img * txt).sum(-1)

    def logits(self, latents: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Bradley-Terry logits ``cos * exp(logit_scale)`` ``[N]``."""
        return self.forward(latents, prompts) * self.scale()

    def preference_scale(self) -> float:
        return float(self.scale().detach())

    def describe(self) -> dict:
        return {"reward": self.name, "definition": "cos(E_img(latents), E_txt(prompt)) of a latent proxy reward model",
                "input": "latents " + _shape_str(self.latent_shape) + " (diffusion space)", "tower": self.config.tower,
                "text_tower": self.config.text_tower, "text_max_length": self.config.text_max_length,
                **({"meta": self.meta} if self.meta else {})}

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer/`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        info = {
            "format": FORMAT,
            "version": 1,
            "lrm_config": asdict(self.config),
            "tokenizer": {"class": type(self.tokenizer).__name__, "folder": TOKENIZER_DIR,
                          "max_length": self.config.text_max_length, "vocab_size": len(self.tokenizer)},
            "meta": self.meta,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
        self.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu",
                        trainable: bool = False) -> "LatentRewardModel":
        """Load a folder written by :meth:`save_pretrained` (safetensors only, strict keys and shapes).

        Returns the model frozen and in eval mode unless ``trainable=True``.

        Raises:
            ModelLoadError: the folder or one of its files is missing, or the weights do not match.
        """
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"LRM folder {folder} not found; {PRETRAIN_HINT.replace('this teacher', 'your teacher')}")
        missing = [name for name, ok in ((CONFIG_FILE, (folder / CONFIG_FILE).is_file()),
                                         (WEIGHTS_FILE, (folder / WEIGHTS_FILE).is_file()),
                                         (TOKENIZER_DIR + "/", (folder / TOKENIZER_DIR).is_dir())) if not ok]
        if missing:
            raise ModelLoadError(f"LRM folder {folder} is incomplete: missing {', '.join(missing)} (an LRM folder holds "
                                 f"{CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_DIR}/, as written by save_pretrained)")
        try:
            info = json.loads((folder / CONFIG_FILE).read_text())
            raw = dict(info["lrm_config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{folder / CONFIG_FILE} is not an LRM config ({exc}); re-save the model with "
                                 f"LatentRewardModel.save_pretrained") from exc
        known = {f.name for f in fields(LRMConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ModelLoadError(f"{folder / CONFIG_FILE}: unknown LRM config keys {unknown}; it was written by a "
                                 f"different fastgen version")
        config = LRMConfig(**raw)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure is a load error
            raise ModelLoadError(f"cannot load the LRM tokenizer from {folder / TOKENIZER_DIR}: {exc}") from exc
        model = cls(config, tokenizer, meta=info.get("meta") or {})
        model.load_weights(load_file(str(folder / WEIGHTS_FILE)), source=str(folder / WEIGHTS_FILE))
        model.to(device)
        return model.unfreeze().eval() if trainable else model.freeze()

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load with a message listing missing / unexpected keys and shape mismatches."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k} {_shape_str(state[k].shape)} != {_shape_str(own[k].shape)}"
                        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
            if shapes:
                parts.append(f"shape mismatches {shapes[:8]}")
            raise ModelLoadError(f"LRM weights in {source} do not match its config: " + "; ".join(parts)
                                 + "; the weights and config.json must come from the same save_pretrained")
        self.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- contrastive pre-training


@dataclass
class LRMPretrainConfig:
    """Contrastive pre-training of an LRM on a teacher's latents (:func:`pretrain_lrm`).

    Attributes:
        teacher: teacher folder or shipped alias (``digits-sd``); its VAE makes the latents, its
            tokenizer becomes the LRM's (and, with ``text_tower=teacher``, its text encoder the
            LRM's text tower).
        data: ``"digits"`` (the digits world's captioned renders), or an image-caption folder,
            webdataset shards or a latent cache of this teacher (see :mod:`fastgen.data.sources`).
        out: output folder (``config.json``, ``model.safetensors``, ``tokenizer/``, ``pretrain_metrics.json``);
            ``None``: ``runs/lrm-digits`` (digits) or ``runs/lrm-<teacher folder name>``.
        steps, batch_size, lr, weight_decay, seed: optimisation (AdamW, linear warm-up then cosine decay).
        preset: architecture defaults, ``auto`` (``digits-cnn`` on the digits world, else
            ``rg-lcd-vit``), ``digits-cnn``, ``rg-lcd-vit`` or ``tiny`` (seconds, for tests and smoke runs;
            :data:`fastgen.rewards.lrm_pretrain.PRESETS`);
            every architecture field below left at ``None`` takes the preset's value.
        tower, width, depth, patch_size, heads, embed_dim: the image tower (see :class:`LRMConfig`).
        text_tower: ``transformer`` (small, from scratch), ``teacher`` (a copy of the teacher's CLIP text
            encoder, full 77-token captions) or ``open_clip`` (``open_clip_model`` initialised from
            ``open_clip_checkpoint``).
        text_max_length, text_width, text_layers, text_heads: the ``transformer`` text tower (a
            ``teacher``/``open_clip`` tower reads as many tokens as it has positions unless
            ``text_max_length`` is lower).
        text_encoder: the teacher component copied by ``text_tower=teacher``.
        open_clip_model, open_clip_checkpoint: architecture name (e.g. ``ViT-H-14``) and local weights
            (``.safetensors``, or a torch file read with ``weights_only``) of ``text_tower=open_clip``.
        text_lr_scale: learning-rate multiplier of an initialised (teacher / open_clip) text tower.
        train_text_layers: text layers trained during pre-training (the last N; ``-1``: all).
        unlocked_text_layers, unlocked_image_layers: saved in the LRM config; what trains during
            RG-LCD's online alignment (``None``: the preset's).
        resolution: image size (``None``: the teacher's default); latents are ``resolution / VAE factor``.
        vae_sample: encode with a sample of the VAE posterior instead of its mean.
        expert, expert_weight, expert_batch_size: optional reward distillation: an expert reward
            (name or dict for :func:`fastgen.rewards.load_reward`) scores the decoded latents of the
            first ``expert_batch_size`` rows against each of their captions, and the LRM's softmax over
            those images matches the expert's (KL, times ``expert_weight``).
        eval_size: held-out items of a folder / cache for the retrieval accuracy (at most a tenth).
        vae_batch_size, num_workers, shuffle_buffer: encoding chunk, DataLoader workers, shard shuffle buffer.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ...; mixed_precision: ``no`` or ``bf16``.
        log_every: steps between log lines.
        train_sources: digits only: use only the first N source digits of the train split (0: all).
    """

    teacher: str = "digits-sd"
    data: str = "digits"
    out: str | None = None
    steps: int = 800
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    preset: str = "auto"
    tower: str | None = None
    width: int | None = None
    depth: int | None = None
    patch_size: int | None = None
    heads: int | None = None
    embed_dim: int | None = None
    text_tower: str | None = None
    text_max_length: int | None = None
    text_width: int | None = None
    text_layers: int | None = None
    text_heads: int | None = None
    text_encoder: str = "text_encoder"
    open_clip_model: str | None = None
    open_clip_checkpoint: str | None = None
    text_lr_scale: float = 0.1
    train_text_layers: int = -1
    unlocked_text_layers: int | None = None
    unlocked_image_layers: int | None = None
    resolution: int | None = None
    vae_sample: bool = False
    expert: Any = None
    expert_weight: float = 1.0
    expert_batch_size: int = 8
    eval_size: int = 256
    vae_batch_size: int = 32
    num_workers: int = 0
    shuffle_buffer: int = 1000
    device: str = "auto"
    mixed_precision: str = "no"
    log_every: int = 100
    train_sources: int = 0


def _encode_all(teacher: Any, pixels01: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels01), batch):
            out.append(teacher.encode(pixels01[i : i + batch] * 2 - 1).float().cpu())
    return torch.cat(out)


def _digits_latents(teacher: Any, split: str, resolution: int, sources: int = 0):
    from fastgen.data.digits import PALETTE, DigitsDataset

    ds = DigitsDataset(split, resolution=resolution)
    pixels, digits, colours = ds.all_pixels(resolution)
    if sources > 0:
        n = min(len(pixels), sources * len(PALETTE))
        pixels, digits, colours = pixels[:n], digits[:n], colours[:n]
    return _encode_all(teacher, pixels), digits * len(PALETTE) + colours


@torch.no_grad()
def retrieval_accuracy(lrm: LatentRewardModel, latents: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> float:
    """Fraction of latents whose best-scoring canonical digits caption is their own (digit, colour)."""
    from fastgen.data.digits import PALETTE, caption

    n_col = len(PALETTE)
    captions = [caption(k // n_col, k % n_col) for k in range(10 * n_col)]
    was_training = lrm.training
    lrm.eval()
    txt = lrm.encode_tokens(*lrm.tokenize(captions))
    correct = 0
    for i in range(0, len(latents), batch):
        img = lrm.encode_latents(latents[i : i + batch])
        pred = (img @ txt.t()).argmax(1).cpu()
        correct += int((pred == labels[i : i + batch]).sum())
    lrm.train(was_training)
    return correct / max(1, len(latents))


def contrastive_step(lrm, loss, opt, sched, losses: list, step: int, config, bar) -> None:
    """One optimizer step of LRM pre-training: step, clamp the logit scale, record the loss, log every
    ``config.log_every`` steps (progress bar and a line)."""
    from tqdm.auto import tqdm

    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        lrm.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
    losses.append(float(loss.detach()))
    if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
        recent = sum(losses[-config.log_every:]) / len(losses[-config.log_every:])
        bar.set_postfix(loss=f"{recent:.3f}", scale=f"{lrm.preference_scale():.1f}")
        tqdm.write(f"step {step + 1}/{config.steps}  loss {recent:.4f}  logit scale {lrm.preference_scale():.2f}")


def pretrain_lrm(config: LRMPretrainConfig) -> Path:
    """Pre-train an LRM contrastively on a teacher's (latent, caption) pairs and save it.

    ``data=digits``: the train split is rendered at the teacher's resolution in every colour, encoded
    once with the teacher's VAE (diffusion-space latents, kept in memory) and paired with captions in
    random templates; the loss is :func:`label_aware_info_nce`.  At the end, the test split's retrieval
    accuracy over the 60 canonical captions is printed and written with the config and wall time
    to ``<out>/pretrain_metrics.json``.

    Any other ``data`` (an image-caption folder, webdataset shards, a latent cache) is pre-trained by
    :func:`fastgen.rewards.lrm_pretrain.pretrain_lrm_on_data`.

    Returns:
        The output folder.
    """
    from tqdm.auto import tqdm

    from fastgen.data.digits import PALETTE, TEMPLATES, caption
    from fastgen.models.teacher import Teacher
    from fastgen.rewards.lrm_pretrain import build_lrm, check_pretrain_config, lrm_optimizer, resolve_architecture
    from fastgen.zoo.paths import resolve_model

    if config.data != "digits":
        from fastgen.rewards.lrm_pretrain import pretrain_lrm_on_data

        return pretrain_lrm_on_data(config)
    t_start = time.time()
    check_pretrain_config(config)
    arch = resolve_architecture(config)
    config = replace(config, out=config.out or "runs/lrm-digits")
    out = Path(config.out)

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    teacher_path = resolve_model(config.teacher)
    teacher = Teacher.from_pretrained(teacher_path)
    tokenizer = getattr(teacher.pipeline(), "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"teacher {config.teacher} has no `tokenizer` component; the LRM borrows the teacher's tokenizer")
    resolution = int(config.resolution or teacher.default_resolution)

    t0 = time.time()
    train_z, train_y = _digits_latents(teacher, "train", resolution, config.train_sources)
    test_z, test_y = _digits_latents(teacher, "test", resolution)
    encode_s = time.time() - t0

    n_col, n_cls, n_tpl = len(PALETTE), 10 * len(PALETTE), len(TEMPLATES)
    meta = {"teacher": str(config.teacher), "teacher_path": str(teacher_path), "data": config.data,
            "resolution": resolution, "vae_scale_factor": int(teacher.vae_scale_factor),
            "scaling_factor": float(teacher.scaling_factor), "shift_factor": float(teacher.shift_factor)}
    lrm = build_lrm(config, arch, tokenizer, int(train_z.shape[1]), int(train_z.shape[-1]), meta,
                    text_encoder=getattr(teacher.pipeline(), config.text_encoder, None))
    config = replace(config, **{k: v for k, v in arch.items() if hasattr(config, k)})
    del teacher

    # every caption the world has, template-major: row t * 60 + (digit * 6 + colour)
    captions = [caption(k // n_col, k % n_col, t) for t in range(n_tpl) for k in range(n_cls)]
    cap_ids, cap_mask = lrm.tokenize(captions)

    opt = lrm_optimizer(lrm, config, arch)
    warmup = max(1, config.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    n = len(train_z)
    bs = min(config.batch_size, n)
    order, cursor = torch.randperm(n, generator=gen), 0
    t_train = time.time()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="lrm pretrain", mininterval=2.0)
    for step in bar:
        if cursor + bs > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + bs]
        cursor += bs
        labels = train_y[idx]
        rows = torch.randint(0, n_tpl, (bs,), generator=gen) * n_cls + labels
        uniq, inv = torch.unique(rows, return_inverse=True)
        txt = lrm.encode_tokens(cap_ids[uniq], cap_mask[uniq])[inv]
        img = lrm.encode_latents(train_z[idx])
        loss = label_aware_info_nce(lrm.scale() * img @ txt.t(), labels)
        contrastive_step(lrm, loss, opt, sched, losses, step, config, bar)
    bar.close()
    train_s = time.time() - t_train

    lrm.freeze()
    test_acc = retrieval_accuracy(lrm, test_z, test_y)
    train_acc = retrieval_accuracy(lrm, train_z[: len(test_z)], train_y[: len(test_z)])
    lrm.save_pretrained(out)
    wall = time.time() - t_start
    metrics = {
        "test_retrieval_accuracy": test_acc,
        "train_retrieval_accuracy": train_acc,
        "chance": 1.0 / n_cls,
        "final_loss": sum(losses[-config.log_every:]) / max(1, len(losses[-config.log_every:])),
        "num_train_latents": int(n),
        "num_test_latents": int(len(test_z)),
        "latent_shape": list(lrm.latent_shape),
        "wall_time_s": round(wall, 2),
        "encode_time_s": round(encode_s, 2),
        "train_time_s": round(train_s, 2),
        "torch_threads": torch.get_num_threads(),
        "config": asdict(config),
        "lrm_config": asdict(lrm.config),
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"LRM test retrieval accuracy {test_acc:.4f} over {n_cls} canonical captions (chance {1 / n_cls:.4f}); "
          f"train {train_acc:.4f}; {wall:.0f} s; saved to {out}")
    return out


# --------------------------------------------------------------------------- online alignment


def teacher_decoder(teacher: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latents -> images in [0, 1]`` through a :class:`~fastgen.models.teacher.Teacher`'s VAE."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return (teacher.decode(latents).float() + 1) / 2

    return decode


class LRMAligner:
    """Keeps an LRM aligned with an expert pixel reward during distillation.

    Each :meth:`step` takes, per prompt, three candidate latents (student one-step output, EMA
    target output, real data latent), decodes them (no grad), scores the images with the expert
    (no grad; ``rewards * expert.preference_scale()`` as logits), scores the latents with the
    LRM and takes one AdamW step on ``rm_loss_scale * pairwise_preference_loss`` (no gradient
    clipping).  The LRM is trainable only inside :meth:`step`; afterwards it is frozen and in eval
    mode, so a student loss through it never updates it.

    Args:
        lrm: the latent reward model (its own optimizer lives here).
        expert: pixel reward model, ``expert(images in [0,1], prompts) -> [N]``.
        decode: ``latents -> images in [0, 1]`` (see :func:`teacher_decoder`).
        lr, weight_decay, betas: AdamW settings.
        rm_loss_scale: multiplier of the loss.
        update_every: update the LRM every k-th student step (see :meth:`should_update`).
        batch_size: use a random subset of this many prompts per update (``None``: all).
        smooth_gt_label: see :func:`pairwise_preference_loss`.
        seed: seed of the subsampling.
    """

    def __init__(self, lrm: LatentRewardModel, expert: RewardModel, decode: Callable[[torch.Tensor], torch.Tensor],
                 lr: float, rm_loss_scale: float = 1.0, update_every: int = 1, batch_size: int | None = None,
                 smooth_gt_label: bool = False, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), seed: int = 0):
        if not lr > 0:
            raise ConfigError(f"LRM aligner: lr must be positive, got {lr}")
        if int(update_every) < 1:
            raise ConfigError(f"LRM aligner: update_every must be >= 1, got {update_every}")
        if batch_size is not None and int(batch_size) < 1:
            raise ConfigError(f"LRM aligner: batch_size must be >= 1 or None, got {batch_size}")
        self.lrm, self.expert, self.decode = lrm, expert, decode
        self.rm_loss_scale = float(rm_loss_scale)
        self.update_every = int(update_every)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.smooth_gt_label = bool(smooth_gt_label)
        self.optimizer = torch.optim.AdamW(lrm.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        self.updates = 0
        self._gen = torch.Generator().manual_seed(int(seed))
        lrm.freeze()

    def should_update(self, step: int) -> bool:
        """Whether the LRM is updated at student step ``step`` (every ``update_every``-th step, from 0)."""
        return int(step) % self.update_every == 0

    def _candidates(self, student_latents, target_latents, real_latents, prompts, subsample: bool):
        n = len(prompts)
        for name, z in (("student", student_latents), ("target", target_latents), ("real", real_latents)):
            if z.ndim != 4 or len(z) != n:
                raise DataError(f"LRM aligner: {name} latents {_shape_str(z.shape)} for {n} prompts; pass [N, C, H, W] "
                                f"latents with one prompt per row")
        cands = [z.detach() for z in (student_latents, target_latents, real_latents)]
        prompts = [str(p) for p in prompts]
        if subsample and self.batch_size is not None and n > self.batch_size:
            idx = torch.randperm(n, generator=self._gen)[: self.batch_size]
            cands = [z[idx.to(z.device)] for z in cands]
            prompts = [prompts[int(i)] for i in idx]
            n = len(prompts)
        device = cands[0].device
        return torch.cat([z.to(device) for z in cands]), prompts, n

    @torch.no_grad()
    def _expert_logits(self, cands: torch.Tensor, prompts: list[str], n: int) -> torch.Tensor:
        images = self.decode(cands)
        rewards = self.expert(images, prompts * 3).float()
        return rewards.view(3, n).t() * float(self.expert.preference_scale())

    def step(self, student_latents: torch.Tensor, target_latents: torch.Tensor, real_latents: torch.Tensor,
             prompts: Sequence[str]) -> dict[str, float]:
        """One LRM update; returns ``{"lrm_loss", "lrm_agreement"}`` (before the update)."""
        cands, prompts, n = self._candidates(student_latents, target_latents, real_latents, prompts, subsample=True)
        expert_logits = self._expert_logits(cands, prompts, n)
        self.lrm.unfreeze()
        try:
            with torch.enable_grad():
                lrm_logits = self.lrm.logits(cands, prompts * 3).view(3, n).t()
                loss, agreement = pairwise_preference_loss(expert_logits, lrm_logits, self.smooth_gt_label)
                self.optimizer.zero_grad(set_to_none=True)
                (loss * self.rm_loss_scale).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                self.lrm.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
        finally:
            self.lrm.freeze()
        self.updates += 1
        return {"lrm_loss": float(loss.detach()), "lrm_agreement": float(agreement)}

    @torch.no_grad()
    def evaluate(self, student_latents: torch.Tensor, target_latents: torch.Tensor, real_latents: torch.Tensor,
                 prompts: Sequence[str]) -> dict[str, float]:
        """Loss and agreement on all given triples without updating anything."""
        cands, prompts, n = self._candidates(student_latents, target_latents, real_latents, prompts, subsample=False)
        expert_logits = self._expert_logits(cands, prompts, n)
        lrm_logits = self.lrm.logits(cands, prompts * 3).view(3, n).t()
        loss, agreement = pairwise_preference_loss(expert_logits, lrm_logits, self.smooth_gt_label)
        return {"lrm_loss": float(loss), "lrm_agreement": float(agreement)}

    # ------------------------------------------------------------------ checkpointing

    _GROUP_KEYS = ("lr", "weight_decay", "eps", "betas")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``name -> tensor`` state (safetensors-compatible).

        Keys: ``lrm.<param>`` (LRM weights), ``optimizer.state.<param index>.<key>`` (AdamW moments
        and step), ``optimizer.group.<group index>.<lr|weight_decay|eps|betas>`` and
        ``aligner.updates``.
        """
        out: dict[str, torch.Tensor] = {f"lrm.{k}": v.detach().clone() for k, v in self.lrm.state_dict().items()}
        osd = self.optimizer.state_dict()
        for pid, state in osd["state"].items():
            for key, val in state.items():
                out[f"optimizer.state.{pid}.{key}"] = val.detach().clone() if torch.is_tensor(val) else torch.tensor(val)
        for gi, group in enumerate(osd["param_groups"]):
            for key in self._GROUP_KEYS:
                out[f"optimizer.group.{gi}.{key}"] = torch.tensor(group[key], dtype=torch.float64)
        out["aligner.updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (strict for the LRM weights)."""
        lrm_state = {k[len("lrm."):]: v for k, v in state.items() if k.startswith("lrm.")}
        if not lrm_state:
            raise ModelLoadError("LRM aligner state has no 'lrm.*' entries; pass the dict returned by LRMAligner.state_dict")
        self.lrm.load_weights(lrm_state, source="the aligner state")
        self.lrm.freeze()
        template = self.optimizer.state_dict()
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        groups = [dict(g) for g in template["param_groups"]]
        for key, val in state.items():
            parts = key.split(".")
            if key.startswith("optimizer.state.") and len(parts) == 4:
                opt_state.setdefault(int(parts[2]), {})[parts[3]] = val
            elif key.startswith("optimizer.group.") and len(parts) == 4:
                gi, name = int(parts[2]), parts[3]
                if gi >= len(groups):
                    raise ModelLoadError(f"LRM aligner state has optimizer group {gi} but the optimizer has {len(groups)}")
                groups[gi][name] = tuple(float(x) for x in val.tolist()) if name == "betas" else float(val)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        if "aligner.updates" in state:
            self.updates = int(state["aligner.updates"])


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastgen.rewards.latent_proxy pretrain [--config recipe.yaml] [--teacher T] [--data SOURCE] [--out DIR] [key=value ...]``."""
    from fastgen.config import load_config

    parser = argparse.ArgumentParser(prog="python -m fastgen.rewards.latent_proxy",
                                     description="Latent proxy reward models (LRM).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="contrastive pre-training of an LRM on a teacher's latents",
                       description="Keys: " + ", ".join(f.name for f in fields(LRMPretrainConfig)))
    p.add_argument("--config", default=None, help="YAML recipe with LRMPretrainConfig keys")
    p.add_argument("--teacher", default=None, help="teacher folder or alias (default digits-sd)")
    p.add_argument("--data", default=None, help="digits (default), an image-caption folder, webdataset shards or a latent cache")
    p.add_argument("--out", default=None, help="output folder (default runs/lrm-digits, or runs/lrm-<teacher name>)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=500 batch_size=64")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        base = {k: v for k, v in (("teacher", args.teacher), ("data", args.data), ("out", args.out)) if v is not None}
        cfg = load_config(LRMPretrainConfig, args.config, overrides=args.overrides, base=base or None)
        pretrain_lrm(cfg)
    except FastgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
