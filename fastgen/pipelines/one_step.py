"""Export of a one-step generator as a stock pipeline + a stock ``DDIMScheduler``.

A one-step student (BOOT's signal generator; a score-distilled generator) is a network that maps
the starting noise to a clean latent with one call. diffusers' ``DDIMScheduler`` does exactly that
in one step when the step ends on the "final alpha" (``set_alpha_to_one=True``, ``abar = 1``):
``prev_sample = sqrt(1) * x0 + sqrt(1 - 1) * eps = x0``, with ``x0`` the network output converted by
``prediction_type`` at the single timestep. The timestep the network sees is chosen with
``timestep_spacing`` (the stock SD pipelines reset ``steps_offset`` to 1, so it cannot be used):

* ``linspace`` with one step -> timestep ``0`` (BOOT: the student's signal ``y_0`` at ``t = 0``,
  ``prediction_type="sample"``);
* ``trailing`` with one step -> timestep ``T - 1`` (a generator fed pure noise at the last timestep).

So ``DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=1, guidance_scale=1.0)``
returns the student's decoded sample, bit for bit what the student gives in process for the same
generator (the pipeline draws the starting latents with ``randn_tensor`` times ``init_noise_sigma = 1``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastgen.pipelines.writer import ExportError, ExportPlan

__all__ = ["one_step_export_plan", "one_step_scheduler"]


def one_step_scheduler(teacher_scheduler_config: dict[str, Any], timestep: int, prediction_type: str) -> Any:
    """A ``DDIMScheduler`` (the teacher's noise schedule) whose single step feeds the network ``timestep``
    (``0`` or ``T - 1``) and returns its output read as ``prediction_type`` converted to x0."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in dict(teacher_scheduler_config).items() if not k.startswith("_")}
    T = int(config.get("num_train_timesteps", 1000))
    spacing = {0: "linspace", T - 1: "trailing"}.get(int(timestep))
    if spacing is None:
        raise ExportError(f"a one-step DDIM export reads the network at timestep 0 or {T - 1}, got {timestep}")
    config.update(prediction_type=prediction_type, timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=False,
                  thresholding=False, steps_offset=1)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(1)
    if int(scheduler.timesteps[0]) != int(timestep):  # pragma: no cover - guards a change of diffusers' spacing rules
        raise ExportError(f"DDIMScheduler({spacing}) reads timestep {int(scheduler.timesteps[0])} in one step, not {timestep}")
    return scheduler


def one_step_export_plan(pipe: Any, component: str, network: torch.nn.Module, timestep: int, prediction_type: str,
                         info: dict[str, Any], card: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                         dtype: torch.dtype | None = None) -> ExportPlan:
    """The plan of a one-step generator ``network`` (replacing ``pipe``'s ``component``, e.g. ``unet``)."""
    scheduler = one_step_scheduler(dict(pipe.scheduler.config), timestep, prediction_type)
    info = {**info, "export": "pipeline", "pipeline_class": type(pipe).__name__, "scheduler": "DDIMScheduler",
            "scheduler_timestep_spacing": scheduler.config.timestep_spacing, "readout_timestep": int(timestep),
            "readout_prediction_type": prediction_type, "num_inference_steps": 1, "guidance_scale": 1.0,
            f"{component}_dtype": str(dtype or next(network.parameters()).dtype).replace("torch.", "")}
    return ExportPlan(kind="pipeline", base=pipe, replace={component: network, "scheduler": scheduler}, info=info, card=card,
                      dtype=dtype)
