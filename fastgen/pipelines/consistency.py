"""The export of a consistency student (LCD, RG-LCD, SCott): a stock pipeline with the student UNet and
an ``LCMScheduler`` (full student), or LoRA weights + the scheduler's config (LCM-LoRA); for a flow-matching
teacher, the student transformer and a ``FlowMatchLCMScheduler``."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchLCMScheduler, LCMScheduler

from fastgen.pipelines.cards import consistency_card
from fastgen.pipelines.writer import ExportPlan

__all__ = ["consistency_export_plan", "flow_lcm_scheduler", "lcm_scheduler", "student_export_plan"]


def lcm_scheduler(base_config: dict[str, Any], original_inference_steps: int, timestep_scaling: float) -> LCMScheduler:
    """An ``LCMScheduler`` from a teacher's scheduler config with the student's grid and boundary scaling."""
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    base = {k: v for k, v in base_config.items() if k in accepted}
    base.update(original_inference_steps=original_inference_steps, timestep_scaling=timestep_scaling)
    return LCMScheduler.from_config(base)


def flow_lcm_scheduler(base_config: dict[str, Any]) -> FlowMatchLCMScheduler:
    """A ``FlowMatchLCMScheduler`` with a flow teacher's schedule (shift, dynamic shifting and its ``mu`` range)."""
    accepted = inspect.signature(FlowMatchLCMScheduler.__init__).parameters
    return FlowMatchLCMScheduler.from_config({k: v for k, v in base_config.items() if k in accepted})


def consistency_export_plan(
    pipe: Any,
    cfg: Any,
    info: dict[str, Any],
    *,
    unet: torch.nn.Module | None = None,
    transformer: torch.nn.Module | None = None,
    unet_is_target: bool = True,
    lora_weights: dict[str, torch.Tensor] | None = None,
    lora_metadata: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> ExportPlan:
    """The plan of a consistency student of the teacher pipeline ``pipe``.

    ``cfg`` holds the consistency options (``num_ddim_timesteps``, ``timestep_scaling``, ``w_min``, ``w_max``,
    ``ema_decay``, ``w_embedding_dim``, the ``lora_*`` fields); ``info`` the teacher and sampling facts. A full
    student passes ``unet`` (``transformer`` for a flow teacher); a LoRA student ``lora_weights`` and ``lora_metadata``.
    """
    if transformer is not None:  # a flow-matching teacher's student
        info = {**info, "pipeline_class": type(pipe).__name__, "scheduler": "FlowMatchLCMScheduler", "export": "pipeline",
                "transformer_weights": "ema_target" if unet_is_target else "online_student", "ema_decay": cfg.ema_decay,
                "num_grid_steps": cfg.num_ddim_timesteps, "w_range_lcm_form": [cfg.w_min, cfg.w_max],
                "guidance_scale_range": [cfg.w_min + 1.0, cfg.w_max + 1.0], "guidance": "embedded (guidance_scale)",
                "renoise": "FlowMatchLCMScheduler draws from torch's global generator: torch.manual_seed(seed) first",
                "transformer_dtype": str(dtype or next(transformer.parameters()).dtype).replace("torch.", "")}
        return ExportPlan(kind="pipeline", base=pipe, info=info, card=consistency_card, dtype=dtype,
                          replace={"transformer": transformer, "scheduler": flow_lcm_scheduler(dict(pipe.scheduler.config))})
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


def student_export_plan(student: Any, method: str, config: dict[str, Any], steps: int, guidance_scale: float, weights: str,
                        extra: dict[str, Any] | None = None) -> ExportPlan:
    """The export of a consistency student (``fastgen.trainers.consistency.ConsistencyStudent``): its sampling
    UNet (``weights``: ``target`` or ``online``) in the teacher's pipeline, or its LoRA weights."""
    loaded, teacher = student.loaded, student.teacher
    info = {"method": method + ("-lora" if student.is_lora else ""), "teacher": loaded.name,
            "teacher_path": os.fspath(Path(loaded.path).resolve()), "teacher_pipeline_class": teacher.pipeline_class,
            "prediction_type": teacher.prediction_type, "resolution": student.resolution, "num_inference_steps": steps,
            "guidance_scale": guidance_scale, "config": config, **(extra or {})}
    if student.flow and teacher.max_sequence_length is not None:
        info["max_sequence_length"] = int(teacher.max_sequence_length)  # the T5 length it was distilled with
    if student.lora is not None:
        return consistency_export_plan(teacher.pipeline(), student.cfg, info, lora_weights=student.lora.state_dict(),
                                       lora_metadata=student.lora.adapter_metadata())
    net = student.sampling_net(weights)
    role = {"transformer": net} if student.flow else {"unet": net}
    return consistency_export_plan(teacher.pipeline(), student.cfg, info, **role, unet_is_target=net is student.target,
                                   dtype=teacher.dtype)
