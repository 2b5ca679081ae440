"""Latent Consistency Distillation (LCD / LCM, and LCM-LoRA) of an SD-family UNet teacher.

One training iteration (full mode), all in the teacher's latent space::

    i ~ U{0..N-1};  t_s = tau_i = (i+1)k - 1;  t_e = max(t_s - k, 0)          (skip grid, k = T // N)
    x_s = alpha_s z0 + sigma_s eps                                             (teacher's noise schedule)
    w ~ U[w_min, w_max]                                                        (LCM guidance form, see below)
    (x0_T, eps_T) = teacher CFG at (x_s, t_s), cond and uncond in ONE batched forward
    x_e = alpha_e x0_T + sigma_e eps_T                                         (DDIM step t_s -> t_e)
    pred   = c_skip(t_s) x_s + c_out(t_s) x0(student(x_s, t_s, c, w))         (consistency function)
    target = c_skip(t_e) x_e + c_out(t_e) x0(ema_target(x_e, t_e, c, w))      (no grad)
    loss   = mean(sqrt((pred - target)^2 + c^2) - c)                          (pseudo-Huber; or l2)

**Guidance convention.** fastgen's ``w`` is the LCM-paper form ``x_c + w (x_c - x_u)``, which is
Imagen/diffusers CFG with scale ``w + 1``: the teacher is called with ``guidance = w + 1``. The full
student embeds ``w`` with the sinusoidal guidance embedding of diffusers (``timestep_cond``); stock
diffusers pipelines embed ``guidance_scale - 1`` for a UNet with ``time_cond_proj_dim``, so an
exported student run with ``guidance_scale = g`` reproduces training ``w = g - 1``, i.e. the
teacher's own pipeline at the same ``guidance_scale = g``. ``w_min = 5, w_max = 15`` (the diffusers
script defaults) therefore cover pipeline guidance scales 6..16.

**Full mode.** The student is the teacher UNet's config plus ``time_cond_proj_dim`` with the
teacher's weights; the new ``time_embedding.cond_proj`` is zero-initialised so the student starts
exactly as the teacher. The target is an EMA of the student (``ema_decay``), updated in
:meth:`LCD.after_optimizer_step`; it is what :meth:`LCD.sample` and :meth:`LCD.export` use by
default (``export_unet="target"``).

**LoRA mode.** peft LoRA adapters are injected into the teacher's own UNet (one UNet in memory):
adapters disabled = the teacher, adapters enabled = the student, and the target is the same LoRA
UNet under ``no_grad`` (no EMA). There is no guidance embedding: ``w`` is fixed (``lora_guidance``)
or sampled in ``[w_min, w_max]`` and baked in, so the LoRA is used with ``guidance_scale = 1``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fastgen.diffusion import (
    consistency_scalings,
    ddim_step,
    expand_like,
    lcm_timesteps,
    multistep_consistency_sample,
    randn_like_diffusers,
    skip_grid,
    to_x0,
)
from fastgen.errors import ConfigError, DataError, ModelLoadError
from fastgen.trainers.method import Method, StepOutput, register_method

#: LoRA targets of the diffusers LCM-LoRA scripts (attention, feed-forward, resnet convs, resampling convs).
DEFAULT_LORA_TARGETS: list[str] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]

#: Prompts of the sample grids when a recipe gives none (digits-world captions).
DEFAULT_SAMPLE_PROMPTS: list[str] = [
    "a red handwritten digit seven",
    "a blue handwritten digit three",
    "a green handwritten digit zero",
    "a yellow handwritten digit five",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_COND_PROJ_KEY = "time_embedding.cond_proj.weight"


@dataclass
class LCDConfig:
    """Options of LCD (the ``lcd:`` section of a recipe). Defaults follow the diffusers LCD scripts.

    Attributes:
        teacher: teacher pipeline folder or a shipped alias (``digits-sd``).
        resolution: training/sampling image size in pixels; ``None`` = the teacher's default.
        teacher_dtype: dtype of the frozen teacher UNet and text encoders (the VAE stays float32;
            the trainable student is always float32). ``float16``/``bfloat16`` halve GPU memory.
        num_ddim_timesteps: N of the DDIM skip grid (k = T // N = 20 for 1000 train steps).
        w_min, w_max: guidance range in the LCM form ``x_c + w (x_c - x_u)`` = pipeline
            ``guidance_scale - 1`` (diffusers defaults 5 / 15 for SD; 3 / 15 for SDXL).
        w_embedding_dim: ``time_cond_proj_dim`` of the full student (256).
        loss: ``"huber"`` (pseudo-Huber, as in the LCD READMEs) or ``"l2"``.
        huber_c: the pseudo-Huber ``c`` (0.001).
        timestep_scaling: ``s`` of the boundary scalings ``c_skip``, ``c_out`` (10).
        ema_decay: decay of the EMA target, updated after every student step (0.95).
        export_unet: which full-mode UNet :meth:`LCD.sample` and :meth:`LCD.export` use:
            ``"target"`` (the EMA target, as LCM does) or ``"online"``.
        gradient_checkpointing: trade compute for memory in the student UNet (both modes).
        lora: train LoRA adapters on the teacher UNet instead of a full student.
        lora_rank, lora_alpha, lora_dropout, lora_target_modules: the peft ``LoraConfig``.
        lora_guidance: fixed ``w`` (LCM form) baked into the LoRA; ``None`` = sampled in
            ``[w_min, w_max]`` every step.
        dataset: ``"digits"`` (the embedded digits world), an image-caption folder, webdataset
            shards (a ``.tar`` path, brace pattern or folder of ``.tar`` files) or a complete
            :class:`~fastgen.data.cache.EmbeddingCache` folder.
        caption_dropout: probability of training a row on the empty prompt (0 in the scripts).
        use_latent_cache: encode the data once (VAE latents + text embeddings) into
            ``cache_dir`` and train from the cache (no VAE encode / text encoder per step).
        cache_dir: where the cache goes; ``None`` = ``$FASTGEN_CACHE`` (or ``~/.cache/fastgen``)
            ``/lcd-latents/<key>``.
        cache_batch_size: encoder batch size while building the cache.
        sample_prompts: prompts of the periodic sample grids.
        sample_steps: consistency steps of the sample grids (and the model card's recommendation).
        sample_guidance_scale: pipeline ``guidance_scale`` for full-mode samples and the model
            card; ``None`` = ``1 + (w_min + w_max) / 2``. LoRA mode always samples at 1.0.
        eval_samples: student samples scored by :meth:`LCD.evaluate` (digits world only; the
            trainer calls it every ``train.eval_every`` steps); 0 turns evaluation off.
        seed: seed of the LoRA initialisation and of the evaluation sample generator.
    """

    teacher: str = "digits-sd"
    resolution: int | None = None
    teacher_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    num_ddim_timesteps: int = 50
    w_min: float = 5.0
    w_max: float = 15.0
    w_embedding_dim: int = 256
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    ema_decay: float = 0.95
    export_unet: Literal["target", "online"] = "target"
    gradient_checkpointing: bool = False
    lora: bool = False
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lora_guidance: float | None = None
    dataset: str = "digits"
    caption_dropout: float = 0.0
    use_latent_cache: bool = False
    cache_dir: str | None = None
    cache_batch_size: int = 64
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_steps: int = 4
    sample_guidance_scale: float | None = None
    eval_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_ddim_timesteps < 1:
            raise ConfigError(f"lcd.num_ddim_timesteps must be >= 1, got {self.num_ddim_timesteps}; use e.g. 50")
        if self.w_min > self.w_max:
            raise ConfigError(
                f"lcd.w_min ({self.w_min}) is larger than lcd.w_max ({self.w_max}); swap them or make them equal"
            )
        if self.w_min < 0:
            raise ConfigError(
                f"lcd.w_min must be >= 0 (w is the LCM form x_c + w(x_c - x_u); w = 0 is the conditional "
                f"prediction alone), got {self.w_min}"
            )
        if self.lora_guidance is not None and self.lora_guidance < 0:
            raise ConfigError(f"lcd.lora_guidance must be >= 0 or null, got {self.lora_guidance}")
        if self.w_embedding_dim < 2:
            raise ConfigError(f"lcd.w_embedding_dim must be >= 2, got {self.w_embedding_dim}; use e.g. 256")
        if self.huber_c <= 0 and self.loss == "huber":
            raise ConfigError(f"lcd.huber_c must be > 0 for the pseudo-Huber loss, got {self.huber_c}; use e.g. 0.001")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"lcd.ema_decay must be in [0, 1), got {self.ema_decay}; use e.g. 0.95")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"lcd.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.lora_rank < 1:
            raise ConfigError(f"lcd.lora_rank must be >= 1, got {self.lora_rank}; use e.g. 64")
        if not self.lora_target_modules:
            raise ConfigError("lcd.lora_target_modules is empty; list the UNet module names to adapt, e.g. [to_q, to_k]")
        if self.sample_steps < 1 or self.sample_steps > self.num_ddim_timesteps:
            raise ConfigError(
                f"lcd.sample_steps must be in 1..num_ddim_timesteps ({self.num_ddim_timesteps}), got {self.sample_steps}"
            )
        if self.cache_batch_size < 1:
            raise ConfigError(f"lcd.cache_batch_size must be >= 1, got {self.cache_batch_size}")
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"lcd.resolution must be positive or null, got {self.resolution}")


# --------------------------------------------------------------------------- small pure helpers


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of guidance weights ``w`` [B] -> [B, dim], as diffusers' pipelines build
    ``timestep_cond`` (``get_guidance_scale_embedding``): ``1000 w`` times ``exp(-log(1e4) j/(h-1))``,
    sin then cos, zero-padded for odd ``dim``."""
    w = torch.as_tensor(w).reshape(-1).to(torch.float32) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


def lcd_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """Mean pseudo-Huber ``sqrt(d^2 + c^2) - c`` (``kind="huber"``) or mean squared error (``"l2"``), in float32."""
    diff = pred.float() - target.float()
    if kind == "huber":
        return (torch.sqrt(diff**2 + huber_c**2) - huber_c).mean()
    if kind == "l2":
        return (diff**2).mean()
    raise ConfigError(f"unknown LCD loss {kind!r}; use 'huber' or 'l2'")


def _missing_lora_targets(net: torch.nn.Module, targets: list[str]) -> list[str]:
    names = [n for n, _ in net.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def _adaptable_module_names(net: torch.nn.Module, limit: int = 12) -> list[str]:
    """Short names (last two components) of Linear/Conv2d modules, for error messages."""
    seen: list[str] = []
    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            parts = name.split(".")
            short = ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]
            if short not in seen:
                seen.append(short)
        if len(seen) >= limit:
            break
    return seen


def _no_autocast(device: torch.device):
    """A context that turns autocast off on ``device`` (the trainer runs train_step under autocast)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def _default_cache_root() -> Path:
    return Path(os.environ.get("FASTGEN_CACHE") or Path.home() / ".cache" / "fastgen")


# --------------------------------------------------------------------------- the method


@register_method
class LCD(Method):
    """Latent Consistency Distillation; see the module docstring for the math and conventions.

    Networks: ``self.teacher`` (:class:`~fastgen.models.Teacher`, frozen), ``self.student`` (the
    trained UNet; in LoRA mode the teacher's own UNet carrying the adapters) and, in full mode,
    ``self.target`` (EMA of the student).
    """

    name = "lcd"
    config_class = LCDConfig

    def __init__(self, config: LCDConfig):
        super().__init__(config)
        from fastgen.models import Teacher
        from fastgen.zoo.paths import resolve_model

        cfg = config
        self.teacher_path = resolve_model(cfg.teacher)
        teacher = Teacher.from_pretrained(self.teacher_path, dtype=torch.float32)
        if teacher.family not in ("sd", "sdxl"):
            raise ConfigError(
                f"LCD distils UNet teachers (SD1.x/2.x, SDXL); '{cfg.teacher}' is a {teacher.family} "
                f"({teacher.pipeline_class}) pipeline. Use a StableDiffusion(XL)Pipeline folder as lcd.teacher"
            )
        if teacher.schedule.kind != "vp":
            raise ConfigError(f"LCD needs a discrete (DDPM-family) noise schedule; '{cfg.teacher}' uses {teacher.schedule.kind}")
        self.teacher = teacher
        self.resolution = int(cfg.resolution or teacher.default_resolution)
        teacher.check_resolution(self.resolution, self.resolution)

        T = int(teacher.schedule.num_train_timesteps)
        if cfg.num_ddim_timesteps > T:
            raise ConfigError(
                f"lcd.num_ddim_timesteps ({cfg.num_ddim_timesteps}) exceeds the teacher's {T} training timesteps"
            )
        self.register_buffer("ddim_grid", skip_grid(T, cfg.num_ddim_timesteps), persistent=False)
        self.skip = T // cfg.num_ddim_timesteps

        net = teacher.net
        if cfg.lora:
            self._setup_lora(net)
            self.target = None
        else:
            self._setup_full(net)

        low = _DTYPES[cfg.teacher_dtype]
        if low != torch.float32:
            # the teacher UNet's weights go low (in LoRA mode the shared base; adapters stay float32)
            for name, p in net.named_parameters():
                if "lora_" not in name:
                    p.data = p.data.to(low)
            for enc in teacher.text_encoders:
                enc.to(low)

        self._uncond_cpu = teacher.encode_prompt([""])
        self._uncond: dict[tuple[str, torch.dtype], Any] = {}

    # ------------------------------------------------------------------ construction

    def _setup_full(self, net: torch.nn.Module) -> None:
        cfg = self.config
        existing = net.config.get("time_cond_proj_dim")
        if existing is not None and int(existing) != cfg.w_embedding_dim:
            raise ConfigError(
                f"the teacher UNet already has a guidance embedding of size {existing} but lcd.w_embedding_dim is "
                f"{cfg.w_embedding_dim}; set lcd.w_embedding_dim={existing}"
            )
        student = type(net).from_config(net.config, time_cond_proj_dim=cfg.w_embedding_dim)
        missing, unexpected = student.load_state_dict(net.state_dict(), strict=False)
        if unexpected or set(missing) - {_COND_PROJ_KEY}:
            raise ModelLoadError(
                f"could not copy the teacher UNet into the student: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}; the teacher folder's unet/ may be corrupt"
            )
        if _COND_PROJ_KEY in missing:  # new guidance embedding: zero so the student starts as the teacher
            with torch.no_grad():
                student.time_embedding.cond_proj.weight.zero_()
        if next(student.parameters()).dtype != torch.float32:
            student.to(dtype=torch.float32)
        student.requires_grad_(True)
        student.train()
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        self.student = student
        target = copy.deepcopy(student)
        target.requires_grad_(False)
        target.eval()
        self.target = target

    def _setup_lora(self, net: torch.nn.Module) -> None:
        cfg = self.config
        missing = _missing_lora_targets(net, list(cfg.lora_target_modules))
        if missing:
            raise ConfigError(
                f"LoRA target module(s) {missing} do not exist in the teacher UNet "
                f"({type(net).__name__}); modules that can be adapted include: "
                f"{', '.join(_adaptable_module_names(net))}. Fix lcd.lora_target_modules"
            )
        try:
            from peft import LoraConfig
        except ImportError as exc:  # pragma: no cover - peft is a dependency
            raise ConfigError("LoRA mode needs the 'peft' package; pip install peft") from exc
        lora_config = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net.add_adapter(lora_config)  # peft inject_adapter_in_model; lora_B = 0 so the student starts as the teacher
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._tuner_layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        for name, p in net.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name:
                p.data = p.data.float()
        if cfg.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        # The student IS the teacher's UNet (one UNet in memory). Keep it out of Module registration
        # a second time so state_dict()/parameters() list each weight once.
        object.__setattr__(self, "student", net)

    # ------------------------------------------------------------------ networks

    @property
    def is_lora(self) -> bool:
        return bool(self.config.lora)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """LoRA mode: run the shared UNet as the plain teacher inside this block."""
        if not self.is_lora:
            yield
            return
        for m in self._tuner_layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in self._tuner_layers:
                m.enable_adapters(True)
            for name, p in self.student.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)

    def sampling_unet(self) -> torch.nn.Module:
        """The UNet that :meth:`sample` and :meth:`export` use (EMA target unless ``export_unet="online"``)."""
        if self.is_lora or self.config.export_unet == "online":
            return self.student
        return self.target

    def train(self, mode: bool = True) -> "LCD":
        super().train(mode)  # the Teacher keeps itself in eval mode
        if self.target is not None:
            self.target.eval()
        elif self.is_lora:
            # the shared UNet follows the mode so LoRA dropout / gradient checkpointing act in training
            # (the UNet has no dropout of its own, so its teacher output does not change)
            self.student.train(mode)
        return self

    def _device(self) -> torch.device:
        return self.teacher.device

    def uncond(self, device: torch.device) -> Any:
        """The empty-prompt embedding (computed once at construction), on ``device``."""
        key = (str(device), self._uncond_cpu.dtype)
        if key not in self._uncond:
            self._uncond[key] = self._uncond_cpu.to(device)
        return self._uncond[key]

    def unet_forward(
        self,
        net: torch.nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        embeds: Any,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw output of ``net`` (student or target UNet) with the teacher's conditioning conventions
        (SDXL ``text_embeds`` + ``time_ids`` derived from the latent size, as the stock pipeline does)."""
        b, _, h, w = x_t.shape
        p = next(net.parameters())
        dtype = p.dtype if not self.is_lora else self.teacher.dtype
        device = p.device
        embeds = embeds.expand(b).to(device=device, dtype=dtype)
        added = None
        if self.teacher.family == "sdxl":
            time_ids = embeds.extra.get("time_ids")
            if time_ids is None:
                f = self.teacher.vae_scale_factor
                row = torch.tensor([h * f, w * f, 0, 0, h * f, w * f], device=device, dtype=dtype)
                time_ids = row.unsqueeze(0).expand(b, 6)
            added = {"text_embeds": embeds.pooled, "time_ids": time_ids.to(dtype)}
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(device=device, dtype=dtype)
        return net(
            x_t.to(device=device, dtype=dtype),
            self.teacher.schedule.model_timestep(t.to(device)),
            encoder_hidden_states=embeds.hidden,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def consistency_fn(
        self,
        net: torch.nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        embeds: Any,
        w: torch.Tensor | None,
    ) -> torch.Tensor:
        """``f(x_t, t) = c_skip(t) x_t + c_out(t) x0(net(x_t, t, c, w))`` in float32 (``w`` LCM form; ignored in LoRA mode)."""
        w_emb = None
        if not self.is_lora and w is not None:
            w_emb = guidance_embedding(w, self.config.w_embedding_dim).to(x_t.device)
        out = self.unet_forward(net, x_t, t, embeds, w_emb).float()
        x = x_t.float()
        alpha, sigma = self.teacher.schedule.alpha_sigma(t.to(x.device))
        x0 = to_x0(out, x, alpha.to(x.device), sigma.to(x.device), self.teacher.prediction_type)
        c_skip, c_out = consistency_scalings(t.to(x.device), timestep_scaling=self.config.timestep_scaling)
        return expand_like(c_skip, x) * x + expand_like(c_out, x) * x0

    # ------------------------------------------------------------------ what trains

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        if self.is_lora:
            return {"student": [p for n, p in self.student.named_parameters() if "lora_" in n]}
        return {"student": [p for p in self.student.parameters() if p.requires_grad]}

    @torch.no_grad()
    def after_optimizer_step(self, name: str, step: int) -> None:
        if self.is_lora or name != "student":
            return
        mu = float(self.config.ema_decay)
        tgt = [p for p in self.target.parameters()]
        src = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(tgt, src, 1.0 - mu)

    # ------------------------------------------------------------------ the step

    def encode_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """``(latents z0 [B, C, h, w] float32, PromptEmbeds)`` of a batch of pixels+captions or cached tensors."""
        from fastgen.models import PromptEmbeds

        device = self._device()
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"].to(device=device, dtype=torch.float32)
            elif "pixels" in batch:
                with _no_autocast(device):  # the VAE encodes in its own dtype (fp16 VAEs overflow)
                    latents = self.teacher.encode(batch["pixels"].to(device=device, dtype=torch.float32)).float()
            else:
                raise DataError(
                    f"an LCD batch needs 'pixels' (images in [-1, 1]) or 'latents' (from an embedding cache); "
                    f"got keys {sorted(batch)}"
                )
            if "hidden" in batch:
                embeds = PromptEmbeds(
                    hidden=batch["hidden"].to(device),
                    pooled=batch["pooled"].to(device) if "pooled" in batch else None,
                )
            elif "caption" in batch:
                captions = batch["caption"]
                if isinstance(captions, str):
                    captions = [captions]
                embeds = self.teacher.encode_prompt(list(captions))
            else:
                raise DataError(f"an LCD batch needs 'caption' strings or cached 'hidden' embeddings; got keys {sorted(batch)}")
        if len(embeds) != latents.shape[0]:
            raise DataError(f"batch has {latents.shape[0]} images but {len(embeds)} captions; pass one caption per image")
        return latents, embeds

    def sample_guidance(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-sample ``w`` (LCM form): fixed ``lora_guidance`` in LoRA mode when set, else U[w_min, w_max]."""
        cfg = self.config
        if self.is_lora and cfg.lora_guidance is not None:
            return torch.full((batch,), float(cfg.lora_guidance), device=device)
        u = torch.rand(batch)
        return (cfg.w_min + (cfg.w_max - cfg.w_min) * u).to(device)

    def compute_loss(
        self,
        latents: torch.Tensor,
        embeds: Any,
        index: torch.Tensor,
        noise: torch.Tensor,
        w: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The LCD loss for explicit randomness: grid ``index`` [B], ``noise`` like ``latents``, ``w`` [B] (LCM form).

        Returns ``loss`` plus the intermediate tensors (``t_start``, ``t_end``, ``x_start``, ``x_end``,
        ``pred``, ``target``) for inspection and tests.
        """
        sched = self.teacher.schedule
        device = latents.device
        grid = self.ddim_grid.to(device)
        t_start = grid[index.to(device)]
        t_end = (t_start - self.skip).clamp(min=0)
        a_s, s_s = sched.alpha_sigma(t_start)
        x_start = expand_like(a_s.to(device), latents) * latents + expand_like(s_s.to(device), latents) * noise

        with torch.no_grad():
            with self.adapters_disabled():
                x0_t, eps_t = self.teacher.predict(
                    x_start, t_start, embeds, self.uncond(device), guidance=(w + 1.0).to(device)
                )
            a_e, s_e = sched.alpha_sigma(t_end)
            x_end = ddim_step(x0_t.float(), eps_t.float(), a_e.to(device), s_e.to(device))

        pred = self.consistency_fn(self.student, x_start, t_start, embeds, w)

        with torch.no_grad():
            tnet = self.student if self.is_lora else self.target
            target = self.consistency_fn(tnet, x_end, t_end, embeds, w)

        loss = lcd_loss(pred, target, self.config.loss, self.config.huber_c)
        return {
            "loss": loss,
            "t_start": t_start,
            "t_end": t_end,
            "x_start": x_start,
            "x_end": x_end,
            "pred": pred,
            "target": target,
        }

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        latents, embeds = self.encode_batch(batch)
        b, device = latents.shape[0], latents.device
        cfg = self.config
        if cfg.caption_dropout > 0:
            drop = torch.rand(b) < cfg.caption_dropout
            if bool(drop.any()):
                embeds = self._drop_captions(embeds, drop)
        index = torch.randint(0, cfg.num_ddim_timesteps, (b,)).to(device)
        noise = torch.randn_like(latents)
        w = self.sample_guidance(b, device)
        out = self.compute_loss(latents, embeds, index, noise, w)
        loss = out["loss"]
        return StepOutput(
            losses={"student": loss},
            logs={"loss": float(loss.detach()), "t_mean": float(out["t_start"].float().mean()), "w_mean": float(w.mean())},
        )

    def _drop_captions(self, embeds: Any, drop: torch.Tensor) -> Any:
        from fastgen.models import PromptEmbeds

        u = self.uncond(embeds.device).to(embeds.device, embeds.dtype).expand(len(embeds))
        d = drop.to(embeds.device)

        def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None:
                return None
            m = d.view(-1, *([1] * (a.ndim - 1)))
            return torch.where(m, b.to(a.dtype), a)

        return PromptEmbeds(
            hidden=pick(embeds.hidden, u.hidden),
            pooled=pick(embeds.pooled, u.pooled),
            extra={k: v for k, v in embeds.extra.items()},
        )

    # ------------------------------------------------------------------ data

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The digits world, an image-caption folder, shards, or an embedding cache (see :class:`LCDConfig`).

        With ``use_latent_cache`` the images and captions are encoded once into an
        :class:`~fastgen.data.cache.EmbeddingCache` and the cache is returned (items carry
        ``latents``, ``hidden`` and, for SDXL, ``pooled``).
        """
        cfg = self.config
        source = str(cfg.dataset)
        path = Path(source)
        if source != "digits" and (path / "index.json").is_file():
            from fastgen.data.cache import CachedDataset

            ds = CachedDataset(path)
            if "hidden" not in ds.text_keys:
                raise DataError(
                    f"embedding cache '{path}' has text keys {ds.text_keys}, not the 'hidden' (and 'pooled') that "
                    f"LCD writes; rebuild it with lcd.use_latent_cache=true and lcd.dataset=<the image data>"
                )
            return ds
        raw = self._raw_dataset(source)
        if cfg.use_latent_cache:
            return self.build_cache(raw)
        if isinstance(raw, torch.utils.data.IterableDataset):
            raise DataError(
                f"lcd.dataset '{source}' is a stream of webdataset shards without a length, but the trainer needs a "
                f"map-style dataset; set lcd.use_latent_cache=true to encode the shards once into a cache"
            )
        return raw

    def _raw_dataset(self, source: str) -> torch.utils.data.Dataset:
        res = self.resolution
        if source == "digits":
            from fastgen.data.digits import DigitsDataset

            return DigitsDataset("train", res)
        path = Path(source)
        is_shards = source.endswith(".tar") or "{" in source or (path.is_dir() and any(path.glob("*.tar")))
        if is_shards:
            from fastgen.data.shards import ImageCaptionShards

            return ImageCaptionShards(source, resolution=res, shuffle_shards=True, shuffle_buffer=1000, seed=self.config.seed)
        if path.is_dir():
            from fastgen.data.folders import ImageCaptionFolder

            return ImageCaptionFolder(path, resolution=res)
        raise DataError(
            f"lcd.dataset '{source}' is neither 'digits' nor an existing folder of images with captions, "
            f"webdataset shards (.tar / brace pattern) or an embedding cache; fix the path"
        )

    def cache_key(self) -> str:
        from fastgen.data.cache import cache_key

        return cache_key("lcd-latents-v1", os.fspath(Path(self.teacher_path).resolve()), self.resolution, self.config.dataset)

    def build_cache(self, dataset: Any) -> torch.utils.data.Dataset:
        """Encode ``dataset`` once (VAE latents, distribution mean; text hidden/pooled) and return the cache."""
        from fastgen.data.cache import EmbeddingCache

        key = self.cache_key()
        root = Path(self.config.cache_dir) if self.config.cache_dir else _default_cache_root() / "lcd-latents" / key[:16]
        device = self._device()

        def encode_images(pixels: torch.Tensor) -> torch.Tensor:
            return self.teacher.encode(pixels.to(device=device, dtype=torch.float32)).float().cpu()

        def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
            e = self.teacher.encode_prompt(captions)
            out = {"hidden": e.hidden.cpu()}
            if e.pooled is not None:
                out["pooled"] = e.pooled.cpu()
            return out

        return EmbeddingCache(root).build(dataset, encode_images, encode_text, self.config.cache_batch_size, key)

    # ------------------------------------------------------------------ state

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        if self.is_lora:
            return {f"lora.{n}": p.detach() for n, p in self.student.named_parameters() if "lora_" in n}
        state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        state.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
        return state

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        has_lora = any(k.startswith("lora.") for k in state)
        has_full = any(k.startswith("student.") for k in state)
        if self.is_lora and not has_lora:
            raise ModelLoadError(
                "this checkpoint holds a full LCD student but the recipe has lcd.lora=true; set lcd.lora=false to load it"
            )
        if not self.is_lora and not has_full:
            raise ModelLoadError(
                "this checkpoint holds LoRA weights but the recipe has lcd.lora=false; set lcd.lora=true (and the "
                "same lora_rank / lora_target_modules) to load it"
            )
        if self.is_lora:
            self._load_lora_state(state)
            return
        key = f"student.{_COND_PROJ_KEY}"
        if key not in state:
            raise ModelLoadError(f"checkpoint has no guidance embedding ('{key}'); it is not an LCD full-mode checkpoint")
        got, want = int(state[key].shape[1]), int(self.config.w_embedding_dim)
        if got != want:
            raise ConfigError(
                f"the checkpoint's guidance embedding has size {got} (time_cond_proj_dim) but the recipe sets "
                f"lcd.w_embedding_dim={want}; set lcd.w_embedding_dim={got} to load this checkpoint"
            )
        for prefix, net in (("student.", self.student), ("target.", self.target)):
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise ModelLoadError(f"checkpoint has no '{prefix}*' weights; it is incomplete, use another checkpoint")
            try:
                net.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise ModelLoadError(
                    f"checkpoint '{prefix.rstrip('.')}' weights do not fit the student built from teacher "
                    f"'{self.config.teacher}': {str(exc)[:400]}; use the teacher the run was trained with"
                ) from exc

    def _load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.student.named_parameters() if "lora_" in n}
        given = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
        if missing or unexpected:
            raise ModelLoadError(
                f"the checkpoint's LoRA layers do not match the recipe's lcd.lora_target_modules: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                f"use the lora_target_modules the run was trained with"
            )
        for n, p in own.items():
            v = given[n]
            if v.shape != p.shape:
                raise ConfigError(
                    f"LoRA weight '{n}' has shape {tuple(v.shape)} in the checkpoint but {tuple(p.shape)} here "
                    f"(lcd.lora_rank={self.config.lora_rank}); set lcd.lora_rank to the run's rank"
                )
            with torch.no_grad():
                p.copy_(v.to(p.dtype))

    # ------------------------------------------------------------------ use

    @property
    def default_sample_prompts(self) -> list[str]:
        """Prompts of the trainer's sample grids when ``train.sample_prompts`` is empty."""
        return list(self.config.sample_prompts)

    def is_digits_world(self) -> bool:
        """True when the teacher is the shipped digits-world SD teacher (digits metrics apply)."""
        from fastgen.zoo import paths

        try:
            shipped = paths.sd_teacher().resolve()
        except ModelLoadError:
            return False
        return Path(self.teacher_path).resolve() == shipped

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Digits world only: digit/colour accuracy and digits-FID of ``eval_samples`` student samples
        (``sample_steps`` steps, default guidance), with the real-vs-real floor; ``{}`` elsewhere."""
        if self.config.eval_samples <= 0 or not self.is_digits_world():
            return {}
        from fastgen.data.digits import eval_prompts
        from fastgen.evaluation.digits_metrics import cached_digits_evaluator

        cached = cached_digits_evaluator(self)
        if cached is None:
            return {}
        evaluator, floor = cached
        prompts, digits, colours = eval_prompts(self.config.eval_samples, seed=0)
        gen = torch.Generator(device=self._device()).manual_seed(self.config.seed)
        chunks = [
            self.sample(prompts[i : i + 250], self.config.sample_steps, gen).float().cpu()
            for i in range(0, len(prompts), 250)
        ]
        images = torch.cat(chunks)
        if images.shape[-1] != 32:
            images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        scores = evaluator.score(images, digits, colours).as_dict()
        scores["digits_fid_floor"] = round(float(floor), 3)
        scores["eval_steps"] = self.config.sample_steps
        return scores

    def default_guidance_scale(self) -> float:
        """Pipeline ``guidance_scale`` used for samples and recommended in the model card."""
        cfg = self.config
        if self.is_lora:
            return 1.0
        if cfg.sample_guidance_scale is not None:
            return float(cfg.sample_guidance_scale)
        return 1.0 + 0.5 * (cfg.w_min + cfg.w_max)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        num_steps: int,
        generator: torch.Generator,
        guidance_scale: float | None = None,
        resolution: int | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1] ``[B, 3, H, W]`` by multistep consistency sampling on LCMScheduler's timesteps.

        Draws noise exactly as the exported pipeline does (``x_T`` first, then one re-noise draw per
        step from ``generator``), so ``pipe(prompts, num_inference_steps=num_steps,
        guidance_scale=g, generator=same-seed)`` gives the same images. ``guidance_scale`` is the
        pipeline's (embedded as ``w = g - 1``); ignored in LoRA mode (which is used at 1.0).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        net = self.sampling_unet()
        device = self._device()
        res = int(resolution or self.resolution)
        embeds = self.teacher.encode_prompt(list(prompts))
        b = len(embeds)
        g = self.default_guidance_scale() if guidance_scale is None else float(guidance_scale)
        w = None if self.is_lora else torch.full((b,), g - 1.0, device=device)
        shape = self.teacher.latent_shape(b, res, res)
        x_T = randn_like_diffusers(shape, generator=generator, device=device, dtype=embeds.dtype).float()
        ts = lcm_timesteps(
            num_steps, self.teacher.schedule.num_train_timesteps, original_inference_steps=self.config.num_ddim_timesteps
        )
        was_training = net.training
        net.eval()
        try:
            z0 = multistep_consistency_sample(
                lambda x, t: self.consistency_fn(net, x, t, embeds, w),
                x_T,
                self.teacher.schedule,
                ts,
                generator=generator,
            )
        finally:
            net.train(was_training)
        with _no_autocast(device):
            images = self.teacher.decode(z0.to(torch.float32))
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def lcm_scheduler(self):
        """An ``LCMScheduler`` from the teacher's scheduler config with this run's grid and scaling."""
        import inspect

        from diffusers import LCMScheduler

        accepted = inspect.signature(LCMScheduler.__init__).parameters
        base = {k: v for k, v in self.teacher.pipeline().scheduler.config.items() if k in accepted}
        base.update(original_inference_steps=self.config.num_ddim_timesteps, timestep_scaling=self.config.timestep_scaling)
        return LCMScheduler.from_config(base)

    def export(self, folder: Path, metadata: dict[str, Any] | None = None) -> None:
        """Full mode: a stock pipeline folder (teacher class: ``StableDiffusionPipeline`` /
        ``StableDiffusionXLPipeline``) with the student UNet and an ``LCMScheduler``. LoRA mode:
        ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` + ``scheduler_config.json``
        (LCMScheduler) + ``fastgen_export.json``. Both with a README.md model card."""
        from fastgen.pipelines.model_card import write_model_card

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        metadata = dict(metadata or {})
        if self.is_lora:
            info = self._export_lora(folder)
        else:
            info = self._export_full(folder)
        info["metadata"] = {k: v for k, v in metadata.items() if k != "metrics"}
        info["metrics"] = metadata.get("metrics") or {}
        (folder / "fastgen_export.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        write_model_card(folder, self._card(info))

    def _common_info(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "method": "lcd-lora" if self.is_lora else "lcd",
            "teacher": str(cfg.teacher),
            "teacher_path": os.fspath(Path(self.teacher_path).resolve()),
            "teacher_pipeline_class": self.teacher.pipeline_class,
            "prediction_type": self.teacher.prediction_type,
            "resolution": self.resolution,
            "num_inference_steps": cfg.sample_steps,
            "guidance_scale": self.default_guidance_scale(),
            "scheduler": "LCMScheduler",
            "original_inference_steps": cfg.num_ddim_timesteps,
            "timestep_scaling": cfg.timestep_scaling,
            "config": asdict(cfg),
        }

    def _export_full(self, folder: Path) -> dict[str, Any]:
        pipe = self.teacher.pipeline()
        pipe_cls = type(pipe)
        components = dict(pipe.components)
        unet = self.sampling_unet()
        tdtype = self.teacher.dtype
        export_unet = copy.deepcopy(unet).to(tdtype) if next(unet.parameters()).dtype != tdtype else unet
        components["unet"] = export_unet
        components["scheduler"] = self.lcm_scheduler()
        import inspect

        params = inspect.signature(pipe_cls.__init__).parameters
        for key in params:
            if key not in components and key != "self" and key in pipe.config:
                components[key] = pipe.config[key]
        if "requires_safety_checker" in params:
            components["requires_safety_checker"] = False
        out = pipe_cls(**{k: v for k, v in components.items() if k in params})
        out.save_pretrained(os.fspath(folder), safe_serialization=True)
        info = self._common_info()
        info.update(
            {
                "export": "pipeline",
                "pipeline_class": pipe_cls.__name__,
                "unet_weights": "ema_target" if unet is self.target else "online_student",
                "ema_decay": self.config.ema_decay,
                "time_cond_proj_dim": self.config.w_embedding_dim,
                "w_range_lcm_form": [self.config.w_min, self.config.w_max],
                "guidance_scale_range": [self.config.w_min + 1.0, self.config.w_max + 1.0],
                "unet_dtype": str(tdtype).replace("torch.", ""),
            }
        )
        return info

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights in the key format ``pipe.load_lora_weights`` reads, before the ``unet.``
        prefix that ``save_lora_weights`` adds: peft's ``<module>.lora_A.weight`` / ``lora_B.weight``.

        Not ``diffusers.utils.convert_state_dict_to_diffusers``: on this UNet it renames only the
        attention projections to the old ``lora.down``/``lora.up`` form, and ``load_lora_weights``
        then silently drops them (diffusers issue #14548).
        """
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.student)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def _export_lora(self, folder: Path) -> dict[str, Any]:
        pipe_cls = type(self.teacher.pipeline())
        meta = self.student.peft_config["default"].to_dict()
        pipe_cls.save_lora_weights(
            os.fspath(folder),
            unet_lora_layers=self.lora_state_dict(),
            unet_lora_adapter_metadata=meta,
            safe_serialization=True,
        )
        self.lcm_scheduler().save_config(os.fspath(folder))
        cfg = self.config
        info = self._common_info()
        info.update(
            {
                "export": "lora",
                "base_model": str(cfg.teacher),
                "base_model_path": os.fspath(Path(self.teacher_path).resolve()),
                "pipeline_class": pipe_cls.__name__,
                "weight_name": "pytorch_lora_weights.safetensors",
                "lora_rank": cfg.lora_rank,
                "lora_alpha": cfg.lora_alpha,
                "lora_target_modules": list(cfg.lora_target_modules),
                "baked_guidance_lcm_form": cfg.lora_guidance if cfg.lora_guidance is not None else [cfg.w_min, cfg.w_max],
            }
        )
        return info

    def _card(self, info: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        steps = info["num_inference_steps"]
        res = info["resolution"]
        if self.is_lora:
            baked = info["baked_guidance_lcm_form"]
            baked_txt = (
                f"w = {baked} (teacher CFG scale {baked + 1:g})"
                if not isinstance(baked, list)
                else f"w sampled in [{baked[0]:g}, {baked[1]:g}] (teacher CFG scales {baked[0] + 1:g} to {baked[1] + 1:g})"
            )
            usage = (
                "from diffusers import DiffusionPipeline, LCMScheduler\n\n"
                f'pipe = DiffusionPipeline.from_pretrained("{info["base_model_path"]}")  # base: {info["base_model"]}\n'
                'pipe.scheduler = LCMScheduler.from_pretrained("<this folder>")  # or LCMScheduler.from_config(pipe.scheduler.config)\n'
                'pipe.load_lora_weights("<this folder>")\n'
                f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale=1.0, height={res}, width={res}).images[0]'
            )
            guidance = (
                f"Classifier-free guidance is baked into the LoRA: during distillation the teacher used {baked_txt}, "
                "with w in the LCM form `x_c + w (x_c - x_u)` (= diffusers guidance_scale w + 1). Use "
                "`guidance_scale=1.0` (values above 1 make the stock pipeline run real CFG on top; 1 to 2 may still help)."
            )
            weights = "LoRA adapters (peft format, `unet.` prefix) in `pytorch_lora_weights.safetensors`; load with `pipe.load_lora_weights`."
            title = f"LCM-LoRA distilled from {info['base_model']}"
        else:
            g = info["guidance_scale"]
            lo, hi = info["guidance_scale_range"]
            usage = (
                "from diffusers import DiffusionPipeline\n\n"
                'pipe = DiffusionPipeline.from_pretrained("<this folder>")\n'
                f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={g:g}, height={res}, width={res}).images[0]'
            )
            guidance = (
                f"The UNet embeds the guidance weight (time_cond_proj_dim={cfg.w_embedding_dim}); no unconditional pass runs. "
                f"fastgen trains with w in the LCM form `x_c + w (x_c - x_u)`, w in [{cfg.w_min:g}, {cfg.w_max:g}]. "
                f"`{info['pipeline_class']}` embeds `guidance_scale - 1`, so `guidance_scale = w + 1`: a value g here means "
                f"the teacher's own pipeline at guidance_scale g. Trained range: guidance_scale {lo:g} to {hi:g}; "
                f"default {g:g}."
            )
            which = "EMA target" if info["unet_weights"] == "ema_target" else "online student"
            weights = (
                f"`unet/` holds the {which} weights (EMA decay {cfg.ema_decay}), stored as {info['unet_dtype']}; the "
                "text encoder(s), tokenizer(s) and VAE are the teacher's, unchanged."
            )
            title = f"LCM distilled from {info['teacher']}"
        return {
            "title": title,
            "method": "Latent Consistency Distillation" + (" (LoRA)" if self.is_lora else ""),
            "teacher": f"{info['teacher']} ({info['teacher_pipeline_class']}, {info['prediction_type']} prediction)",
            "pipeline_class": info["pipeline_class"],
            "scheduler": (
                f"LCMScheduler (original_inference_steps={info['original_inference_steps']}, "
                f"timestep_scaling={info['timestep_scaling']:g})"
            ),
            "steps": f"{steps} (LCMScheduler accepts 1 to {info['original_inference_steps']})",
            "guidance": guidance,
            "weights": weights,
            "resolution": res,
            "metrics": info.get("metrics") or {},
            "metadata": info.get("metadata") or {},
            "usage": usage,
            "training": {
                k: v
                for k, v in info["config"].items()
                if k
                in (
                    "num_ddim_timesteps",
                    "w_min",
                    "w_max",
                    "w_embedding_dim",
                    "loss",
                    "huber_c",
                    "timestep_scaling",
                    "ema_decay",
                    "lora",
                    "lora_rank",
                    "lora_alpha",
                    "lora_guidance",
                    "dataset",
                    "caption_dropout",
                )
            },
            "tags": ["fastgen", "lcm", "latent-consistency", "distillation"] + (["lora"] if self.is_lora else []),
        }


__all__ = ["DEFAULT_LORA_TARGETS", "LCD", "LCDConfig", "guidance_embedding", "lcd_loss"]
