"""SCott: stochastic consistency distillation (LCD with an SDE teacher solver + an adversarial loss).

One iteration, composing LCD's loss (:func:`fastgen.trainers.lcd.lcd_step`)::

    eta_n = eta (constant) or linear eta -> eta_end over eta_decay_steps         (noise-strength schedule)
    x_e   = M DDIM-eta sub-steps of the guided teacher over t_s -> t_e            (sde_teacher_move)
            eta = 0, M = 1: LCD's deterministic DDIM step exactly
    (L_CD, zhat = f_theta(x_s, t_s)) = lcd_step(student, EMA target, teacher; z0, c, move)
    adversarial (weight lambda > 0, from adv_start_step on):
        zgen = zhat, or f_theta(q(z0, t_g), t_g) with t_g from adv_timesteps        (the sampler's timesteps)
        t' ~ U{disc_t_min..disc_t_max};  fake = q(zgen, t'),  real = q(z0, t')      (re-noised latents)
        L_student = L_CD + lambda * G(D(fake, t', c))                             (hinge: -D; ns: softplus(-D))
        every disc_update_every-th step:
        L_disc = Dloss(D(real, t', c), D(fake.detach(), t', c)) + r1/2 * ||grad_real D||^2

``D`` is :class:`~fastgen.models.discriminator.LatentDiscriminator`: a frozen copy of the teacher UNet's
down/mid blocks (never the LoRA student's adapters; optionally a LoRA of its own) with small heads
conditioned on the timestep and the text. It is its own parameter group (``discriminator``) with its
own optimizer spec. Export is LCD's: a stock pipeline + ``LCMScheduler`` folder (or LoRA weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from fastgen.diffusion import sde_teacher_move
from fastgen.errors import ConfigError, ModelLoadError
from fastgen.losses import ADVERSARIAL_LOSSES, discriminator_loss, generator_loss, r1_penalty
from fastgen.models.discriminator import LatentDiscriminator, feature_layer_names
from fastgen.trainers.consistency import ConsistencyMethod
from fastgen.trainers.engine.optim import OptimizerSpec
from fastgen.trainers.lcd import LCDConfig, lcd_step
from fastgen.trainers.method import StepOutput, register_method

__all__ = ["SCott", "SCottConfig"]

DISC = "discriminator"


@dataclass
class SCottConfig(LCDConfig):
    """SCott options (the ``scott:`` section): LCD's options (same names) plus

    Attributes:
        eta: noise strength of the teacher's DDIM-eta sub-steps, in [0, 1] (0 = deterministic DDIM).
        eta_schedule: ``constant`` or ``linear`` (eta -> eta_end over eta_decay_steps, then eta_end).
        eta_end, eta_decay_steps: end of the linear schedule; ``eta_decay_steps: null`` = ``train.max_steps``.
        num_substeps: M teacher sub-steps between t_s and t_e (each a guided teacher call).
        adv_weight: lambda of the adversarial term (0: no discriminator is built).
        adv_start_step: first iteration (0-based) with the adversarial term; must be < ``train.max_steps``.
        adv_loss: ``hinge`` or ``non-saturating``.
        adv_timesteps: where the generated latents come from. ``null``: the consistency rows' own output
            ``f_theta(x_s, t_s)`` (no extra forward); a list of timesteps: one more student call on the batch
            re-noised to a timestep drawn from the list (e.g. the 1-4 step sampler's ``[999, 759, 499, 259]``),
            which aims the adversarial term at the few-step sampler's inputs.
        r1_weight: R1 penalty on real inputs (0: none).
        disc_layers: tapped teacher-UNet blocks (``down_blocks.<i>``, ``mid_block``); null = all of them.
        disc_head_channels: width of each head.
        disc_lora_rank, disc_lora_target_modules: LoRA of the discriminator's own backbone copy (0: frozen).
        disc_update_every: the discriminator steps every k-th iteration once the adversarial term is on.
        disc_t_min, disc_t_max: range of the re-noising timestep t' seen by the discriminator.
    """

    section: ClassVar[str] = "scott"

    eta: float = 0.2
    eta_schedule: Literal["constant", "linear"] = "constant"
    eta_end: float = 0.0
    eta_decay_steps: int | None = None
    num_substeps: int = 3
    adv_weight: float = 0.4
    adv_start_step: int = 0
    adv_loss: Literal["hinge", "non-saturating"] = "hinge"
    adv_timesteps: list[int] | None = None
    r1_weight: float = 0.0
    disc_layers: list[str] | None = None
    disc_head_channels: int = 64
    disc_lora_rank: int = 0
    disc_lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    disc_update_every: int = 1
    disc_t_min: int = 0
    disc_t_max: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.section
        checks = [
            (0.0 <= self.eta <= 1.0, f"{s}.eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM noise), got {self.eta}"),
            (0.0 <= self.eta_end <= 1.0, f"{s}.eta_end must be in [0, 1], got {self.eta_end}"),
            (self.eta_schedule in ("constant", "linear"), f"{s}.eta_schedule must be 'constant' or 'linear', got {self.eta_schedule!r}"),
            (self.eta_decay_steps is None or self.eta_decay_steps >= 1, f"{s}.eta_decay_steps must be >= 1 or null, got {self.eta_decay_steps}"),
            (self.num_substeps >= 1, f"{s}.num_substeps must be >= 1 (1 = one teacher step per skip interval, as LCD), got {self.num_substeps}"),
            (self.adv_weight >= 0, f"{s}.adv_weight must be >= 0 (0 turns the adversarial loss off), got {self.adv_weight}"),
            (self.adv_start_step >= 0, f"{s}.adv_start_step must be >= 0, got {self.adv_start_step}"),
            (self.adv_loss in ADVERSARIAL_LOSSES, f"{s}.adv_loss must be one of {', '.join(ADVERSARIAL_LOSSES)}, got {self.adv_loss!r}"),
            (self.r1_weight >= 0, f"{s}.r1_weight must be >= 0 (0 = no R1 penalty), got {self.r1_weight}"),
            (self.disc_head_channels >= 4, f"{s}.disc_head_channels must be >= 4, got {self.disc_head_channels}"),
            (self.disc_lora_rank >= 0, f"{s}.disc_lora_rank must be >= 0 (0 = frozen backbone), got {self.disc_lora_rank}"),
            (self.disc_update_every >= 1, f"{s}.disc_update_every must be >= 1, got {self.disc_update_every}"),
            (0 <= self.disc_t_min <= self.disc_t_max, f"{s}.disc_t_min / disc_t_max must satisfy 0 <= min <= max, "
                                                      f"got {self.disc_t_min} / {self.disc_t_max}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@register_method
class SCott(ConsistencyMethod):
    """Stochastic consistency distillation; see the module docstring for the algorithm."""

    name = "scott"
    config_class = SCottConfig
    label = "SCott"
    flow_teachers = False  # its SDE sub-steps are written for DDPM-family schedules

    def __init__(self, config: SCottConfig, **shared: Any):
        super().__init__(config, **shared)  # the teacher, student and EMA target (self.nets)
        self.max_steps: int | None = None
        self.disc: LatentDiscriminator | None = None
        if config.adv_weight > 0:
            T = int(self.nets.teacher.schedule.num_train_timesteps)
            if config.disc_t_max >= T:
                raise ConfigError(f"scott.disc_t_max ({config.disc_t_max}) must be below the teacher's {T} training timesteps")
            bad = [t for t in (config.adv_timesteps or []) if not 0 <= int(t) < T]
            if bad or config.adv_timesteps == []:
                raise ConfigError(f"scott.adv_timesteps must be null or a non-empty list of timesteps in 0..{T - 1}, got "
                                  f"{config.adv_timesteps}")
            teacher = self.nets.teacher
            layers = list(config.disc_layers) if config.disc_layers is not None else feature_layer_names(teacher.net)
            self.disc = LatentDiscriminator(teacher, layers, config.disc_head_channels, config.disc_lora_rank,
                                            list(config.disc_lora_target_modules), config.seed, "scott")
            self.disc.to(self.nets.device)

    def configure_training(self, max_steps: int, run_dir: Any = None) -> None:
        cfg = self.config
        if cfg.adv_weight > 0 and cfg.adv_start_step >= max_steps:
            raise ConfigError(f"scott.adv_start_step ({cfg.adv_start_step}) is not below train.max_steps ({max_steps}): the "
                              "adversarial loss would never start; lower scott.adv_start_step or set scott.adv_weight: 0")
        self.max_steps = int(max_steps)

    # ---- schedules ---------------------------------------------------------------------------
    def eta_at(self, step: int) -> float:
        """The noise strength at iteration ``step`` (constant, or linear from eta to eta_end)."""
        cfg = self.config
        if cfg.eta_schedule == "constant":
            return float(cfg.eta)
        length = cfg.eta_decay_steps or self.max_steps
        if not length:
            raise ConfigError("scott.eta_schedule=linear needs scott.eta_decay_steps (or a run's train.max_steps)")
        frac = min(max(step, 0) / length, 1.0)
        return float(cfg.eta + (cfg.eta_end - cfg.eta) * frac)

    def adversarial_at(self, step: int) -> bool:
        return self.disc is not None and step >= self.config.adv_start_step

    # ---- what trains -------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        groups = super().parameter_groups()
        if self.disc is not None:
            groups[DISC] = self.disc.trainable()
        return groups

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        # GAN-style Adam for the discriminator (our choice); the recipe's train.optimizers.discriminator overrides
        return {DISC: OptimizerSpec(optimizer="adam", betas=(0.0, 0.99))} if self.disc is not None else {}

    def inactive_groups(self) -> tuple[str, ...]:
        return (DISC,) if self.disc is None else ()

    def optimizers_to_step(self, step: int) -> list[str]:
        disc_now = self.adversarial_at(step) and (step - self.config.adv_start_step) % self.config.disc_update_every == 0
        return ["student", DISC] if disc_now else ["student"]

    def teacher_move(self, eta: float):
        """The stochastic teacher solver: M DDIM-eta sub-steps, fresh Gaussian noise per sub-step."""
        cfg = self.config

        def move(predict, x, t_from, t_to):
            noises = [torch.randn_like(x) for _ in range(cfg.num_substeps)] if eta > 0 else None
            return sde_teacher_move(predict, x, t_from, t_to, self.nets.teacher.schedule, cfg.num_substeps, eta, noises)

        return move

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        nets, cfg = self.nets, self.config
        latents, embeds = nets.encode_batch(batch, self.data_config.vae_sample)
        # 1-2. LCD's loss with the stochastic teacher move: zhat = f_theta(x_s, t_s)
        eta = self.eta_at(step)
        out = lcd_step(nets, cfg, latents, embeds, move=self.teacher_move(eta))
        student_loss = out["loss"]
        logs = {"cd_loss": float(out["loss"].detach()), "eta": eta, "w_mean": float(out["w"].mean())}
        losses = {}
        # 3. adversarial term on re-noised latents (student output vs real)
        if self.adversarial_at(step):
            b, sched = latents.shape[0], nets.teacher.schedule
            generated = out["pred"]
            if cfg.adv_timesteps is not None:  # the student's output from the sampler's timesteps
                pool = torch.tensor([int(t) for t in cfg.adv_timesteps])
                t_g = pool[torch.randint(0, len(pool), (b,))].to(latents.device)
                x_g = sched.add_noise(latents, torch.randn_like(latents), t_g)
                generated = nets.f(nets.student, x_g, t_g, embeds, out["w"])
            t_d = torch.randint(cfg.disc_t_min, cfg.disc_t_max + 1, (b,)).to(latents.device)
            fake = sched.add_noise(generated.float(), torch.randn_like(latents), t_d)
            g_loss = generator_loss(self.disc(fake, t_d, embeds), cfg.adv_loss)
            student_loss = student_loss + cfg.adv_weight * g_loss
            logs["g_loss"] = float(g_loss.detach())
            if DISC in self.optimizers_to_step(step):
                real = sched.add_noise(latents, torch.randn_like(latents), t_d).requires_grad_(cfg.r1_weight > 0)
                logits = self.disc(torch.cat([real, fake.detach()]), torch.cat([t_d, t_d]), embeds.cat(embeds),
                                   double_backward=cfg.r1_weight > 0)
                real_logits, fake_logits = logits.chunk(2)
                d_loss = discriminator_loss(real_logits, fake_logits, cfg.adv_loss)
                logs.update(d_loss=float(d_loss.detach()), d_real=float(real_logits.detach().mean()),
                            d_fake=float(fake_logits.detach().mean()))
                if cfg.r1_weight > 0:
                    r1 = r1_penalty(real_logits, real)
                    d_loss = d_loss + 0.5 * cfg.r1_weight * r1
                    logs["r1"] = float(r1.detach())
                losses[DISC] = d_loss
        losses["student"] = student_loss
        logs["loss"] = float(student_loss.detach())
        return StepOutput(losses=losses, logs=logs)

    # ---- state -------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().checkpoint_state_dict()
        if self.disc is not None:
            state.update({f"disc.{k}": v for k, v in self.disc.state_dict().items() if not k.startswith("backbone.")
                          or "lora_" in k})
        return state

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        disc_state = {k[5:]: v for k, v in state.items() if k.startswith("disc.")}
        super().load_checkpoint_state_dict({k: v for k, v in state.items() if not k.startswith("disc.")})
        if self.disc is None:
            return
        if not disc_state:
            raise ModelLoadError("this checkpoint has no discriminator (a run with scott.adv_weight=0?); resume it with "
                                 "scott.adv_weight: 0, or start a new run")
        own = {k for k in self.disc.state_dict() if not k.startswith("backbone.") or "lora_" in k}
        missing, unexpected = sorted(own - set(disc_state)), sorted(set(disc_state) - own)
        if missing or unexpected:
            raise ModelLoadError(f"the checkpoint's discriminator does not fit the recipe's (disc_layers, disc_head_channels, "
                                 f"disc_lora_rank): missing {missing[:3]}, unexpected {unexpected[:3]}; use the run's settings")
        try:
            self.disc.load_state_dict(disc_state, strict=False)
        except RuntimeError as exc:
            raise ModelLoadError(f"the checkpoint's discriminator does not fit the recipe's: {str(exc)[:300]}; use the "
                                 "run's disc_head_channels / disc_lora_rank") from exc

    # ---- export ------------------------------------------------------------------------------
    def export_extra(self) -> dict[str, Any]:
        cfg = self.config
        return {"method_title": "Stochastic Consistency Distillation (SCott)", "eta": cfg.eta, "eta_schedule": cfg.eta_schedule,
                "num_substeps": cfg.num_substeps, "adv_weight": cfg.adv_weight, "adv_loss": cfg.adv_loss}

