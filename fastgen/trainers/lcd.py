"""Latent Consistency Distillation (LCD / LCM, and LCM-LoRA) of an SD-family UNet teacher.

One training iteration (full mode), all in the teacher's latent space::

    i ~ U{0..N-1};  t_s = tau_i = (i+1)k - 1;  t_e = max(t_s - k, 0)          (skip grid, k = T // N)
    x_s = alpha_s z0 + sigma_s eps                                             (teacher's noise schedule)
    w ~ U[w_min, w_max]                                                        (LCM guidance form)
    (x0_T, eps_T) = teacher CFG at (x_s, t_s), cond and uncond in ONE batched forward
    x_e = alpha_e x0_T + sigma_e eps_T                                         (DDIM step t_s -> t_e)
    pred   = c_skip(t_s) x_s + c_out(t_s) x0(student(x_s, t_s, c, w))         (consistency function)
    target = c_skip(t_e) x_e + c_out(t_e) x0(ema_target(x_e, t_e, c, w))      (no grad)
    loss   = mean(sqrt((pred - target)^2 + c^2) - c)                          (pseudo-Huber; or l2)
    after the step: ema_target <- mu ema_target + (1 - mu) student

**Full mode**: the student is the teacher UNet plus a zero-initialised guidance embedding
(``time_cond_proj_dim``), its target an EMA. **LoRA mode**: peft adapters on the teacher's own UNet
(adapters off = the teacher), the target is the LoRA UNet under ``no_grad``, and ``w`` is baked in
(``lora_guidance`` or sampled), so the LoRA is used with ``guidance_scale = 1``. The networks, the
sampler and the export live in :mod:`fastgen.trainers.consistency` (shared with RG-LCD and SCott);
the guidance convention is explained there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from fastgen.errors import ConfigError
from fastgen.models.lora import DEFAULT_UNET_TARGETS
from fastgen.models.teacher import PromptEmbeds, drop_captions
from fastgen.trainers.consistency import (
    ConsistencyMethod,
    ConsistencyStudent,
    TeacherMove,
    consistency_distillation_loss,
)
from fastgen.trainers.method import StepOutput, register_method

__all__ = ["LCD", "LCDConfig", "lcd_step"]


@dataclass
class LCDConfig:
    """LCD's algorithm options (the ``lcd:`` section). Defaults follow the diffusers LCD scripts.

    Attributes:
        num_ddim_timesteps: N of the DDIM skip grid (k = T // N = 20 for 1000 train steps).
        w_min, w_max: guidance range in the LCM form ``x_c + w (x_c - x_u)`` = pipeline
            ``guidance_scale - 1`` (diffusers defaults 5 / 15 for SD; 3 / 15 for SDXL).
        w_embedding_dim: ``time_cond_proj_dim`` of the full student (256).
        loss: ``"huber"`` (pseudo-Huber, as in the LCD READMEs) or ``"l2"``.
        huber_c: the pseudo-Huber ``c`` (0.001).
        timestep_scaling: ``s`` of the boundary scalings ``c_skip``, ``c_out`` (10).
        ema_decay: decay of the EMA target, updated after every student step (0.95).
        gradient_checkpointing: trade compute for memory in the student UNet.
        lora: train LoRA adapters on the teacher UNet instead of a full student.
        lora_rank, lora_alpha, lora_dropout, lora_target_modules: the peft ``LoraConfig``.
        lora_guidance: fixed ``w`` (LCM form) baked into the LoRA; ``None`` = sampled in ``[w_min, w_max]``.
        caption_dropout: probability of training a row on the empty prompt (0 in the scripts).
        seed: seed of the LoRA initialisation.
    """

    section: ClassVar[str] = "lcd"

    num_ddim_timesteps: int = 50
    w_min: float = 5.0
    w_max: float = 15.0
    w_embedding_dim: int = 256
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    ema_decay: float = 0.95
    gradient_checkpointing: bool = False
    lora: bool = False
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_UNET_TARGETS))
    lora_guidance: float | None = None
    caption_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.section
        checks = [
            (self.num_ddim_timesteps >= 1, f"{s}.num_ddim_timesteps must be >= 1, got {self.num_ddim_timesteps}; use e.g. 50"),
            (self.w_min <= self.w_max, f"{s}.w_min ({self.w_min}) is larger than {s}.w_max ({self.w_max}); swap them or make them equal"),
            (self.w_min >= 0, f"{s}.w_min must be >= 0 (w is the LCM form x_c + w(x_c - x_u); w = 0 is the conditional "
                              f"prediction alone), got {self.w_min}"),
            (self.lora_guidance is None or self.lora_guidance >= 0, f"{s}.lora_guidance must be >= 0 or null, got {self.lora_guidance}"),
            (self.w_embedding_dim >= 2, f"{s}.w_embedding_dim must be >= 2, got {self.w_embedding_dim}; use e.g. 256"),
            (self.huber_c > 0 or self.loss != "huber", f"{s}.huber_c must be > 0 for the pseudo-Huber loss, got {self.huber_c}"),
            (0.0 <= self.ema_decay < 1.0, f"{s}.ema_decay must be in [0, 1), got {self.ema_decay}; use e.g. 0.95"),
            (0.0 <= self.caption_dropout <= 1.0, f"{s}.caption_dropout must be in [0, 1], got {self.caption_dropout}"),
            (self.lora_rank >= 1, f"{s}.lora_rank must be >= 1, got {self.lora_rank}; use e.g. 64"),
            (bool(self.lora_target_modules), f"{s}.lora_target_modules is empty; list the UNet modules to adapt, e.g. [to_q, to_k]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def lcd_step(nets: ConsistencyStudent, cfg: LCDConfig, latents: torch.Tensor, embeds: PromptEmbeds,
             move: TeacherMove | None = None) -> dict[str, torch.Tensor]:
    """One LCD step's loss on encoded latents and prompt embeddings; RG-LCD and SCott compose it.

    ``move`` replaces the teacher's deterministic DDIM step (SCott's SDE sub-steps). Returns
    :func:`~fastgen.trainers.consistency.consistency_distillation_loss`'s dict plus the drawn ``w``.
    """
    b, device = latents.shape[0], latents.device
    # 1. caption dropout (the unconditional branch the student may also be asked for)
    if cfg.caption_dropout > 0:
        drop = torch.rand(b) < cfg.caption_dropout
        if bool(drop.any()):
            embeds = drop_captions(embeds, nets.uncond(device), drop)
    # 2. randomness of the step: skip-grid index, noise, guidance w
    index = torch.randint(0, cfg.num_ddim_timesteps, (b,)).to(device)
    noise = torch.randn_like(latents)
    w = nets.guidance(b, device)
    # 3. the consistency-distillation loss (guided teacher DDIM step, student vs EMA target)
    out = consistency_distillation_loss(nets, latents, embeds, index, noise, w, cfg.loss, cfg.huber_c, move)
    out["w"] = w
    return out


@register_method
class LCD(ConsistencyMethod):
    """Latent Consistency Distillation; see the module docstring for the algorithm."""

    name = "lcd"
    config_class = LCDConfig
    label = "LCD"

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        latents, embeds = self.nets.encode_batch(batch, self.data_config.vae_sample)
        out = lcd_step(self.nets, self.config, latents, embeds)
        loss = out["loss"]
        return StepOutput(
            losses={"student": loss},
            logs={"loss": float(loss.detach()), "t_mean": float(out["t_start"].float().mean()), "w_mean": float(out["w"].mean())},
        )
