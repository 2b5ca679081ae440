"""What the one-step generators share around their losses (BOOT, DMD, DisBack).

:class:`OneStepMethod` loads the teacher, trains on prompts only (an image source is refused), samples
with one network call whose starting noise is drawn exactly as the exported pipeline draws it, and
exports the network into the teacher's pipeline with a one-step ``DDIMScheduler``
(:mod:`fastgen.pipelines.one_step`). A method supplies :meth:`OneStepMethod.one_step` (noise and prompt
embeddings to a clean latent), :meth:`OneStepMethod.sampling_network` and the read-out of its export.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch

from fastgen.data.sources import build_dataset, source_kind
from fastgen.diffusion import randn_like_diffusers
from fastgen.errors import ConfigError
from fastgen.models import PromptEmbeds
from fastgen.models.spec import load_teacher
from fastgen.pipelines.cards import one_step_card
from fastgen.pipelines.one_step import one_step_export_plan
from fastgen.errors import ModelLoadError
from fastgen.pipelines.writer import ExportError, ExportPlan
from fastgen.trainers.engine.ema import EMA
from fastgen.trainers.method import Method

__all__ = ["OneStepMethod"]

FAMILIES = ("sd", "sdxl", "flux", "sd3", "pixart")


class OneStepMethod(Method):
    """Base of the one-step generator methods; ``label`` names the method in messages and the model card."""

    default_sample_steps = 1
    default_data_source = "prompts"
    label: ClassVar[str] = ""

    def __init__(self, config: Any, **shared: Any):
        super().__init__(config, **shared)
        if self.sample_steps != 1:
            raise ConfigError(f"{self.label}'s student is a one-step generator; set sample.steps: 1 (or null), got {self.sample_steps}")
        self.loaded = load_teacher(self.teacher_config, self.default_teacher, FAMILIES, self.label)
        self.teacher = self.loaded.teacher
        self._uncond_cpu = self.teacher.encode_prompt([""])

    def is_digits_world(self) -> bool:
        return self.loaded.digits

    def uncond(self, device: torch.device) -> PromptEmbeds:
        return self._uncond_cpu.to(device)

    def train_dataset(self) -> torch.utils.data.Dataset:
        kind = source_kind(self.data_config)
        if kind != "prompts":
            raise ConfigError(f"{self.label} is data-free: it trains on prompts only, but data.source '{self.data_config.source}' "
                              f"is a {kind} source (refused, not ignored); set data.source: prompts and data.prompts: <a prompt "
                              "file> (or leave data.prompts null for the digits-world captions)")
        return build_dataset(self.data_config, resolution=self.loaded.resolution, accepts=("prompts",))

    # ---- what a method supplies ----------------------------------------------------------------
    def one_step(self, z: torch.Tensor, embeds: PromptEmbeds, net: torch.nn.Module) -> torch.Tensor:
        """The clean latent (float32) that ``net`` makes of the starting noise ``z`` in one call."""
        raise NotImplementedError

    def trained_network(self) -> torch.nn.Module:
        """The network that maps noise to samples (its EMA, when kept, samples and is exported instead)."""
        raise NotImplementedError

    def export_readout(self) -> tuple[int, str, dict[str, Any]]:
        """``(timestep the network reads, prediction type its output is read as, extra facts for the export)``."""
        raise NotImplementedError

    # ---- an optional EMA of the trained network, for samples and export ----------------------
    ema: EMA | None = None
    ema_group: str = ""

    def keep_ema(self, decay: float, group: str) -> None:
        """Average :meth:`trained_network` after each step of optimizer ``group`` (``decay`` 0: no EMA)."""
        self.ema = EMA(self.trained_network(), decay) if decay > 0 else None
        self.ema_group = group

    def after_optimizer_step(self, name: str, step: int) -> None:
        super().after_optimizer_step(name, step)
        if self.ema is not None and name == self.ema_group:
            self.ema.update()

    def ema_state(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict("ema.") if self.ema is not None else {}

    def load_ema_state(self, state: dict[str, torch.Tensor]) -> None:
        ema = {k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")}
        if self.ema is not None:
            if not ema:
                raise ModelLoadError(f"this checkpoint has no EMA of the {self.label} network but the recipe sets "
                                     f"{self.config.section}.ema_decay > 0; resume with {self.config.section}.ema_decay: 0")
            self.ema.load_state_dict(ema)

    def uses_ema(self) -> bool:
        return self.ema is not None and self.export_config.weights != "online"

    def sampling_network(self) -> torch.nn.Module:
        """The weights that sample and are exported: the EMA with ``export.weights: target`` when kept."""
        if not self.uses_ema():
            return self.trained_network()
        net = copy.deepcopy(self.trained_network())
        self.ema.copy_to(net)
        return net

    def weights_label(self, online: str) -> str:
        return f"EMA (decay {self.config.ema_decay})" if self.uses_ema() else online

    # ---- use ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], num_steps: int, generator: torch.Generator, guidance_scale: float | None = None) -> torch.Tensor:
        """Images in [0, 1] from one network call, the starting noise drawn as the exported pipeline draws it."""
        if int(num_steps) != 1:
            raise ConfigError(f"{self.label} samples in exactly one step (its network maps the starting noise to the sample), "
                              f"got {num_steps}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        teacher, res = self.teacher, self.loaded.resolution
        embeds = teacher.encode_prompt(prompts)
        z = randn_like_diffusers(teacher.latent_shape(len(embeds), res, res), generator=generator, device=teacher.device,
                                 dtype=embeds.dtype).float()
        net = self.sampling_network()
        was_training = net.training
        net.eval()
        try:
            x = self.one_step(z, embeds, net)
        finally:
            net.train(was_training)
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            images = teacher.decode(x)
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def export_plan(self) -> ExportPlan:
        teacher = self.teacher
        if teacher.kind != "unet":
            raise ExportError(f"{self.label} exports a UNet network into a stock pipeline with a one-step DDIMScheduler; teacher "
                              f"'{self.loaded.name}' is a {teacher.pipeline_class}, whose stock flow scheduler cannot return the "
                              "network's sample in one step: not supported yet; distil a UNet (SD-family) teacher to export")
        timestep, prediction_type, extra = self.export_readout()
        net = copy.deepcopy(self.sampling_network()).requires_grad_(False).eval()
        info = {"method": self.name, "method_title": self.label, "teacher": self.loaded.name,
                "teacher_path": os.fspath(Path(self.loaded.path).resolve()), "teacher_pipeline_class": teacher.pipeline_class,
                "prediction_type": teacher.prediction_type, "resolution": self.loaded.resolution, "component": "unet",
                "teacher_guidance_scale": float(self.config.guidance_scale), "config": asdict(self.config), **extra}
        return one_step_export_plan(teacher.pipeline(), "unet", net, timestep, prediction_type, info, one_step_card,
                                    dtype=teacher.dtype)
