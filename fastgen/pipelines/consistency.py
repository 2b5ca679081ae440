"""The export of a consistency student (LCD, RG-LCD, SCott): a stock pipeline with the student UNet and
an ``LCMScheduler`` (full student), or LoRA weights + the scheduler's config (LCM-LoRA)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import LCMScheduler

from fastgen.pipelines.cards import consistency_card
from fastgen.pipelines.writer import ExportPlan

__all__ = ["consistency_export_plan", "lcm_scheduler"]


def lcm_scheduler(base_config: dict[str, Any], original_inference_steps: int, timestep_scaling: float) -> LCMScheduler:
    """An ``LCMScheduler`` from a teacher's scheduler config with the student's grid and boundary scaling."""
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    base = {k: v for k, v in base_config.items() if k in accepted}
    base.update(original_inference_steps=original_inference_steps, timestep_scaling=timestep_scaling)
    return LCMScheduler.from_config(base)


def consistency_export_plan(
    pipe: Any,
    cfg: Any,
    info: dict[str, Any],
    *,
    unet: torch.nn.Module | None = None,
    unet_is_target: bool = True,
    lora_weights: dict[str, torch.Tensor] | None = None,
    lora_metadata: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> ExportPlan:
    """The plan of a consistency student of the teacher pipeline ``pipe``.

    ``cfg`` holds the consistency options (``num_ddim_timesteps``, ``timestep_scaling``, ``w_min``, ``w_max``,
    ``ema_decay``, ``w_embedding_dim``, the ``lora_*`` fields); ``info`` the teacher and sampling facts. A full
    student passes ``unet``; a LoRA student ``lora_weights`` and ``lora_metadata``.
    """
    info = {**info, "pipeline_class": type(pipe).__name__, "scheduler": "LCMScheduler",
            "original_inference_steps": cfg.num_ddim_timesteps, "timestep_scaling": cfg.timestep_scaling}
    scheduler = lcm_scheduler(dict(pipe.scheduler.config), cfg.num_ddim_timesteps, cfg.timestep_scaling)
    if lora_weights is not None:
        info.update(export="lora", base_model=info["teacher"], base_model_path=info["teacher_path"],
                    weight_name="pytorch_lora_weights.safetensors", lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                    lora_target_modules=list(cfg.lora_target_modules),
                    baked_guidance_lcm_form=cfg.lora_guidance if cfg.lora_guidance is not None else [cfg.w_min, cfg.w_max])
        return ExportPlan(kind="lora", base=pipe, replace={"scheduler": scheduler}, lora_weights=lora_weights,
                          lora_metadata=lora_metadata, info=info, card=consistency_card)
    info.update(export="pipeline", unet_weights="ema_target" if unet_is_target else "online_student",
                ema_decay=cfg.ema_decay, time_cond_proj_dim=cfg.w_embedding_dim, w_range_lcm_form=[cfg.w_min, cfg.w_max],
                guidance_scale_range=[cfg.w_min + 1.0, cfg.w_max + 1.0],
                unet_dtype=str(dtype or next(unet.parameters()).dtype).replace("torch.", ""))
    return ExportPlan(kind="pipeline", base=pipe, replace={"unet": unet, "scheduler": scheduler}, info=info,
                      card=consistency_card, dtype=dtype)
