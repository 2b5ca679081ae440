"""Score distillation (DMD): a one-step generator trained with the gradient ``s_fake - s_real`` on its own samples.

The generator ``G`` (a copy of the teacher network) reads pure noise ``z`` at the last timestep and its
output, read as the teacher's prediction type, gives a clean latent ``x = G(z, c)`` in one call. A fake-score
network (a copy of the teacher, or LoRA adapters on the teacher's own network, the DMD2 trick) tracks the
generator's distribution by denoising score matching on its samples. One iteration, on prompts only::

    z ~ N(0, I);  x = G(z, c)                                  (with gradient when the generator steps)
    generator (every fake_updates_per_generator_update-th iteration):
        t ~ U[t_min, t_max] T;  x_t = alpha_t x + sigma_t eps
        x_real = real-score x0-estimate at (x_t, t), CFG on it only (cond + uncond in one call)   no grad
        x_fake = fake-score x0-estimate at (x_t, t), no CFG                                      no grad
        grad   = (x_fake - x_real) / mean_chw |x - x_real|     (DMD's per-sample normalisation)
        L_G    = 0.5 mse(x, SG(x - grad))                      (d L_G / d x = grad / numel)
    fake score (every iteration): t ~ U{0..T-1} (flow: the teacher's training sigmas)
        L_fake = mse(fake(alpha_t SG(x) + sigma_t eps, t, c), the target of the teacher's prediction type)

``real_score`` is the frozen teacher here; DisBack (:mod:`fastgen.trainers.disback`) swaps other networks into
that slot. Export: the teacher's pipeline with ``G`` and a one-step ``DDIMScheduler`` that feeds timestep
``T - 1`` and converts by the teacher's prediction type (:mod:`fastgen.pipelines.one_step`).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from fastgen.diffusion import from_x0_eps
from fastgen.errors import ConfigError, ModelLoadError
from fastgen.models.lora import LoRA
from fastgen.models.spec import lower_precision
from fastgen.trainers.method import StepOutput, register_method
from fastgen.trainers.one_step import OneStepMethod

__all__ = ["DMD", "DMDConfig"]

GEN, FAKE = "generator", "fake_score"


@dataclass
class DMDConfig:
    """Score-distillation options (the ``dmd:`` section).

    Attributes:
        guidance_scale: CFG of the real score (pipeline convention; 1 = none). The fake score is never guided.
        t_min, t_max: fractions of the schedule the generator loss perturbs to (0.02 / 0.98, DMD2).
        fake_updates_per_generator_update: the fake score steps every iteration, the generator every k-th.
        normalize: DMD's per-sample normalisation of the gradient by ``mean |x - x_real|``.
        generator_output: how the generator's output is read at the last timestep: ``teacher`` (as the teacher's
            prediction type, DMD's; an epsilon output is divided by ``alpha_T``, 0.068 for SD) or ``sample`` (the
            output is the clean latent itself).
        fake_lora_rank: 0 = the fake score is a full copy of the teacher; > 0 = LoRA adapters of this rank on the
            teacher's own network (adapters off = the teacher; saves one network's memory).
        fake_lora_target_modules: the adapted modules.
        seed: seed of the LoRA initialisation.
        ema_decay: EMA of the generator (updated after each generator step) that samples and is exported with
            ``export.weights: target`` (0: none, the generator itself).
    """

    section: ClassVar[str] = "dmd"

    guidance_scale: float = 3.0
    t_min: float = 0.02
    t_max: float = 0.98
    fake_updates_per_generator_update: int = 5
    normalize: bool = True
    generator_output: Literal["teacher", "sample"] = "teacher"
    fake_lora_rank: int = 0
    fake_lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    seed: int = 0
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        s = self.section
        checks = [
            (self.guidance_scale >= 1.0, f"{s}.guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}"),
            (0.0 <= self.t_min < self.t_max <= 1.0, f"{s}.t_min / t_max must satisfy 0 <= t_min < t_max <= 1, got "
                                                     f"{self.t_min} / {self.t_max}"),
            (self.fake_updates_per_generator_update >= 1, f"{s}.fake_updates_per_generator_update must be >= 1, got "
                                                          f"{self.fake_updates_per_generator_update}"),
            (self.generator_output in ("teacher", "sample"), f"{s}.generator_output must be 'teacher' or 'sample', got "
                                                             f"{self.generator_output!r}"),
            (self.fake_lora_rank >= 0, f"{s}.fake_lora_rank must be >= 0 (0 = a full copy), got {self.fake_lora_rank}"),
            (0.0 <= self.ema_decay < 1.0, f"{s}.ema_decay must be in [0, 1), got {self.ema_decay}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@register_method
class DMD(OneStepMethod):
    """Score distillation with a fixed teacher target; see the module docstring for the algorithm."""

    name = "dmd"
    config_class = DMDConfig
    label = "DMD"

    def __init__(self, config: DMDConfig, **shared: Any):
        super().__init__(config, **shared)  # the teacher (self.loaded, self.teacher)
        cfg, loaded, teacher = config, self.loaded, self.teacher
        sched = teacher.schedule
        self.gen_t = float(1.0) if sched.kind == "flow" else int(sched.num_train_timesteps) - 1
        if teacher.prediction_type == "epsilon" and float(sched.alpha_sigma(torch.tensor(self.gen_t))[0]) < 1e-4:
            raise ConfigError(f"teacher '{loaded.name}' predicts epsilon and has alpha = 0 at its last timestep (zero terminal "
                              f"SNR): a one-step generator fed pure noise there cannot give x0; use a v-prediction teacher")
        self.generator = copy.deepcopy(teacher.net).requires_grad_(True).train()
        self.fake_lora: LoRA | None = None
        if cfg.fake_lora_rank > 0:
            self.fake_lora = LoRA(teacher.net, list(cfg.fake_lora_target_modules), cfg.fake_lora_rank, float(cfg.fake_lora_rank),
                                  0.0, cfg.seed, cfg.section)
            object.__setattr__(self, "fake", teacher.net)  # the teacher's own network, registered once as teacher.net
        else:
            self.fake = copy.deepcopy(teacher.net).requires_grad_(True).train()
        lower_precision(teacher, loaded.low_dtype, keep=LoRA.is_adapter)
        self.keep_ema(cfg.ema_decay, GEN)

    # ---- what trains -------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        fake = self.fake_lora.parameters() if self.fake_lora is not None else [p for p in self.fake.parameters() if p.requires_grad]
        return {GEN: [p for p in self.generator.parameters() if p.requires_grad], FAKE: fake}

    def generator_steps_at(self, step: int) -> bool:
        return step % self.config.fake_updates_per_generator_update == 0

    def optimizers_to_step(self, step: int) -> list[str]:
        return [GEN, FAKE] if self.generator_steps_at(step) else [FAKE]

    # ---- the networks --------------------------------------------------------------------------
    def teacher_disabled(self):
        """The teacher's own network without the fake score's adapters (a no-op for a full fake copy)."""
        return self.fake_lora.disabled() if self.fake_lora is not None else contextlib.nullcontext()

    def generate(self, z: torch.Tensor, embeds: Any, net: torch.nn.Module | None = None) -> torch.Tensor:
        """``x = G(z, c)``: the generator's output at the last timestep read as an x0-estimate, float32."""
        t = torch.full((len(z),), self.gen_t, device=z.device, dtype=torch.float64 if isinstance(self.gen_t, float) else torch.long)
        out = self.teacher.forward(z, t, embeds, net=self.generator if net is None else net).float()
        return out if self.config.generator_output == "sample" else self.teacher.output_to_x0_eps(out, z.float(), t)[0]

    def score_x0(self, net: torch.nn.Module | None, x_t: torch.Tensor, t: torch.Tensor, embeds: Any, guidance: float) -> torch.Tensor:
        """x0-estimate of a score network (``None``: the teacher), guided against the empty prompt when ``guidance > 1``
        (cond and uncond in one call, for the teacher and for any network in its slot alike)."""
        if net is None:
            with self.teacher_disabled():
                uncond = self.uncond(x_t.device) if guidance != 1.0 else None
                return self.teacher.predict(x_t, t, embeds, uncond, guidance=guidance)[0].float()
        if guidance == 1.0:
            out = self.teacher.forward(x_t, t, embeds, net=net).float()
        else:
            b = len(x_t)
            both = self.uncond(x_t.device).expand(b).cat(embeds.expand(b))
            out = self.teacher.forward(torch.cat([x_t, x_t]), torch.cat([t, t]), both, net=net).float()
            out = self.teacher.combine_guidance(*out.chunk(2), guidance)
        return self.teacher.output_to_x0_eps(out, x_t.float(), t)[0]

    def real_score(self) -> torch.nn.Module | None:
        """The network in the real-score slot (``None``: the teacher)."""
        return None

    def draw_t(self, b: int, device: torch.device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        sched = self.teacher.schedule
        if sched.kind == "flow":
            return sched.training_sigma(lo + (hi - lo) * torch.rand(b)).to(device)
        T = int(sched.num_train_timesteps)
        return torch.randint(int(lo * T), max(int(hi * T), int(lo * T) + 1), (b,)).clamp(max=T - 1).to(device)

    # ---- the losses ---------------------------------------------------------------------------
    def generator_loss(self, x: torch.Tensor, embeds: Any) -> dict[str, torch.Tensor]:
        cfg, sched = self.config, self.teacher.schedule
        t = self.draw_t(len(x), x.device, cfg.t_min, cfg.t_max)
        with torch.no_grad():
            x_t = sched.add_noise(x.detach(), torch.randn_like(x), t)
            x_real = self.score_x0(self.real_score(), x_t, t, embeds, float(cfg.guidance_scale))
            x_fake = self.score_x0(self.fake, x_t, t, embeds, 1.0)
            grad = x_fake - x_real
            if cfg.normalize:
                grad = grad / (x.detach() - x_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-8)
            grad = torch.nan_to_num(grad)
        loss = 0.5 * F.mse_loss(x, (x - grad).detach())
        return {"loss": loss, "t": t, "grad_norm": grad.flatten(1).norm(dim=1).mean()}

    def fake_loss(self, x: torch.Tensor, embeds: Any) -> torch.Tensor:
        """Denoising score matching of the fake score on generator samples (detached) in the teacher's prediction type."""
        sched, x = self.teacher.schedule, x.detach()
        t, eps = self.draw_t(len(x), x.device), torch.randn_like(x)
        alpha, sigma = (v.to(x.device).float() for v in sched.alpha_sigma(t))
        target = from_x0_eps(x, eps, alpha, sigma, self.teacher.prediction_type)
        return F.mse_loss(self.teacher.forward(sched.add_noise(x, eps, t), t, embeds, net=self.fake).float(), target)

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        embeds = self.teacher.encode_prompt(list(batch["caption"]))
        b, res = len(embeds), self.loaded.resolution
        z = torch.randn(self.teacher.latent_shape(b, res, res), device=self.teacher.device)
        steps_gen = GEN in self.optimizers_to_step(step)
        with contextlib.nullcontext() if steps_gen else torch.no_grad():
            x = self.generate(z, embeds)
        losses, logs = {}, {}
        if steps_gen:
            out = self.generator_loss(x, embeds)
            losses[GEN] = out["loss"]
            logs.update({"loss/generator": float(out["loss"].detach()), "grad_norm": float(out["grad_norm"])})
        losses[FAKE] = self.fake_loss(x, embeds)
        logs["loss/fake"] = float(losses[FAKE].detach())
        return StepOutput(losses=losses, logs=logs)

    # ---- state -------------------------------------------------------------------------------
    def fake_state(self) -> dict[str, torch.Tensor]:
        if self.fake_lora is not None:
            return self.fake_lora.named_weights()
        return self.fake.state_dict()

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        state.update({f"fake.{k}": v for k, v in self.fake_state().items()})
        return {**state, **self.ema_state()}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        gen = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
        fake = {k[len("fake."):]: v for k, v in state.items() if k.startswith("fake.")}
        try:
            self.generator.load_state_dict(gen, strict=True)
            if self.fake_lora is not None:
                self.fake_lora.load(fake)
            else:
                self.fake.load_state_dict(fake, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"the checkpoint does not fit this {self.label} run (teacher '{self.loaded.name}', "
                                 f"fake_lora_rank {self.config.fake_lora_rank}): {str(exc)[:300]}; use the run's settings") from exc
        self.load_ema_state(state)

    # ---- use ---------------------------------------------------------------------------------
    def trained_network(self) -> torch.nn.Module:
        return self.generator

    def one_step(self, z: torch.Tensor, embeds: Any, net: torch.nn.Module) -> torch.Tensor:
        return self.generate(z, embeds, net)

    def export_readout(self) -> tuple[int, str, dict[str, Any]]:
        read = "sample" if self.config.generator_output == "sample" else self.teacher.prediction_type
        return int(self.gen_t), read, {"weights_label": self.weights_label("generator")}
