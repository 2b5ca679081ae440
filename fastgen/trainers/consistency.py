"""What every consistency-distillation method shares (LCD, RG-LCD, SCott): the networks and the loss.

:class:`ConsistencyStudent` holds the frozen teacher, the student (a full UNet copy with an
embedded guidance ``w``, or LoRA adapters on the teacher's own UNet) and its target (an EMA of
the full student; the LoRA student itself under ``no_grad``), samples with LCM's multistep
consistency sampler exactly as the exported pipeline does, and declares the export (a stock
pipeline with an ``LCMScheduler``, or LoRA weights).

:func:`consistency_distillation_loss` is LCD's loss for explicit randomness; methods compose it.

**Guidance convention.** ``w`` is the LCM-paper form ``x_c + w (x_c - x_u)`` = Imagen/diffusers CFG
with scale ``w + 1``: the teacher is called with ``guidance = w + 1``. Stock diffusers pipelines
embed ``guidance_scale - 1`` for a UNet with ``time_cond_proj_dim``, so an exported full student
run at ``guidance_scale = g`` reproduces training ``w = g - 1``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from fastgen.diffusion import ddim_step, flow_skip_grid, flux_mu, skip_grid
from fastgen.errors import ConfigError
from fastgen.losses import consistency_loss
from fastgen.models import PromptEmbeds
from fastgen.models.denoisers import ConsistencyDenoiser, with_flux_guidance_embedding, with_guidance_embedding
from fastgen.models.lora import LoRA
from fastgen.models.spec import LoadedTeacher, load_teacher, lower_precision
from fastgen.data.sources import build_dataset
from fastgen.pipelines.consistency import student_export_plan
from fastgen.trainers.engine.ema import ema_update_
from fastgen.trainers.method import Method

__all__ = ["ConsistencyMethod", "ConsistencyStudent", "TeacherMove", "consistency_distillation_loss", "consistency_setup"]

#: ``move(predict, x_start, t_start, t_end) -> x_end``: how the teacher crosses one skip interval
TeacherMove = Callable[[Callable, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ConsistencyStudent(torch.nn.Module):
    """Teacher + consistency student + target (see the module docstring).

    DDPM-family UNet teachers (SD, SDXL) distil on LCD's DDIM skip grid with LCM's consistency function
    and export with ``LCMScheduler``. Flow-matching Flux teachers distil on the grid ``shift(n / N)`` with
    the teacher's Euler step as the solver and ``f = x - sigma v`` as the consistency function, and
    export with ``FlowMatchLCMScheduler``; the full student is the transformer with a guidance embedding
    (FluxPipeline's ``guidance_scale`` = the teacher's CFG scale ``w + 1``). A guidance-distilled teacher
    (FLUX.1-dev, ``guidance_embeds``) is itself guided through that embedding: one forward, no CFG.

    Args:
        loaded: the teacher (:func:`fastgen.models.spec.load_teacher`).
        cfg: the method's options (an ``LCDConfig`` or a dataclass with its fields).
        section: recipe section for error messages (``lcd``, ``rg_lcd``).
    """

    def __init__(self, loaded: LoadedTeacher, cfg: Any, section: str):
        super().__init__()
        teacher = loaded.teacher
        self.flow = teacher.schedule.kind == "flow"
        if self.flow and teacher.family != "flux":
            raise ConfigError(
                f"{section} distils flow-matching teachers of the Flux layout; '{loaded.name}' is a {teacher.family} "
                f"({teacher.pipeline_class}) pipeline"
            )
        if self.flow and cfg.lora:
            raise ConfigError(f"{section}.lora with a flow-matching (Flux) teacher is not supported yet; set {section}.lora=false")
        self.teacher, self.loaded, self.cfg, self.section = teacher, loaded, cfg, section
        self.resolution = loaded.resolution
        T = int(teacher.schedule.num_train_timesteps)
        if cfg.num_ddim_timesteps > T:
            raise ConfigError(f"{section}.num_ddim_timesteps ({cfg.num_ddim_timesteps}) exceeds the teacher's {T} training timesteps")
        self.mu = None
        if self.flow:
            lat = teacher.latent_shape(1, self.resolution, self.resolution)
            self.mu = flux_mu((lat[-2] // 2) * (lat[-1] // 2), dict(teacher.pipeline().scheduler.config))
            grid = flow_skip_grid(cfg.num_ddim_timesteps, teacher.schedule, self.mu)
        else:
            grid = skip_grid(T, cfg.num_ddim_timesteps)
        self.register_buffer("ddim_grid", grid, persistent=False)
        net = teacher.net
        self.lora: LoRA | None = None
        if self.flow:
            self.student = with_flux_guidance_embedding(net).requires_grad_(True).train()
            self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        elif cfg.lora:
            self.lora = LoRA(net, list(cfg.lora_target_modules), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.seed, section)
            object.__setattr__(self, "student", net)  # the teacher's own UNet: registered once, as teacher.net
            self.target = None
        else:
            self.student = with_guidance_embedding(net, cfg.w_embedding_dim, f"{section}.w_embedding_dim").requires_grad_(True).train()
            self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        lower_precision(teacher, loaded.low_dtype, keep=LoRA.is_adapter)
        self.denoiser = ConsistencyDenoiser(teacher, cfg.timestep_scaling, None if cfg.lora else cfg.w_embedding_dim)
        self._uncond_cpu = teacher.encode_prompt([""])
        self._uncond: dict[str, PromptEmbeds] = {}

    # ------------------------------------------------------------------ networks
    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    def adapters_disabled(self):
        """LoRA mode: the shared UNet runs as the plain teacher inside this block."""
        return self.lora.disabled() if self.lora is not None else contextlib.nullcontext()

    def train(self, mode: bool = True) -> "ConsistencyStudent":
        super().train(mode)
        if self.target is not None:
            self.target.eval()
        elif self.lora is not None:
            self.student.train(mode)  # LoRA dropout / gradient checkpointing act in training
        return self

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.lora.parameters() if self.lora is not None else [p for p in self.student.parameters() if p.requires_grad]

    def target_net(self) -> torch.nn.Module:
        return self.student if self.target is None else self.target

    def sampling_net(self, weights: str = "target") -> torch.nn.Module:
        return self.student if (self.target is None or weights == "online") else self.target

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        if self.target is not None:
            ema_update_(self.target.parameters(), self.student.parameters(), decay)

    def uncond(self, device: torch.device) -> PromptEmbeds:
        key = str(device)
        if key not in self._uncond:
            self._uncond[key] = self._uncond_cpu.to(device)
        return self._uncond[key]

    def guidance(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-sample ``w`` (LCM form): fixed ``lora_guidance`` in LoRA mode when set, else U[w_min, w_max]."""
        cfg = self.cfg
        if self.is_lora and cfg.lora_guidance is not None:
            return torch.full((batch,), float(cfg.lora_guidance), device=device)
        return (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch)).to(device)

    def f(self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, w: torch.Tensor | None) -> torch.Tensor:
        """The consistency function of ``net`` (``w`` ignored by a LoRA student, whose guidance is baked in)."""
        return self.denoiser(net, x_t, t, embeds, None if self.is_lora else w)

    # ------------------------------------------------------------------ data
    def encode_batch(self, batch: dict[str, Any], vae_sample: bool = False) -> tuple[torch.Tensor, PromptEmbeds]:
        """``(latents float32, embeddings)`` of a batch (:meth:`fastgen.models.Teacher.encode_batch`)."""
        return self.teacher.encode_batch(batch, vae_sample=vae_sample, what=self.section)

    # ------------------------------------------------------------------ state (fastgen.trainers.consistency_io)
    def state(self) -> dict[str, torch.Tensor]:
        from fastgen.trainers.consistency_io import student_state

        return student_state(self)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        from fastgen.trainers.consistency_io import load_student_state

        load_student_state(self, state)

    # ------------------------------------------------------------------ use
    def default_guidance_scale(self, sample_guidance: float | None) -> float:
        """Pipeline ``guidance_scale`` of samples and the model card (LoRA: 1.0)."""
        if self.is_lora:
            return 1.0
        if sample_guidance is not None:
            return float(sample_guidance)
        return 1.0 + 0.5 * (self.cfg.w_min + self.cfg.w_max)

    def sample(self, prompts: list[str], num_steps: int, generator: torch.Generator, guidance_scale: float,
               weights: str = "target", resolution: int | None = None) -> torch.Tensor:
        """Images in [0, 1] as the exported pipeline samples them (:func:`fastgen.trainers.consistency_io.sample_student`)."""
        from fastgen.trainers.consistency_io import sample_student

        return sample_student(self, prompts, num_steps, generator, guidance_scale, weights, resolution)


def consistency_distillation_loss(
    nets: ConsistencyStudent,
    latents: torch.Tensor,
    embeds: PromptEmbeds,
    index: torch.Tensor,
    noise: torch.Tensor,
    w: torch.Tensor,
    kind: str = "huber",
    huber_c: float = 0.001,
    move: TeacherMove | None = None,
) -> dict[str, torch.Tensor]:
    """LCD's loss for explicit randomness: grid ``index`` [B], ``noise`` like ``latents``, ``w`` [B] (LCM form).

    ``move(predict, x_s, t_s, t_e) -> x_e`` replaces the teacher's one deterministic DDIM step (SCott's
    stochastic sub-steps); ``predict(x, t) -> (x0, eps)`` is the guided teacher. Returns ``loss`` and the
    intermediates ``t_start``, ``t_end``, ``x_start``, ``x_end``, ``pred``, ``target``.
    """
    sched, device = nets.teacher.schedule, latents.device
    # 1. a grid pair t_s = tau_i, t_e = tau_{i-1} (0 for i = 0; vp: t_s - k), and x_s ~ q(x_s | z0)
    grid, index = nets.ddim_grid.to(device), index.to(device)
    t_start = grid[index]
    t_end = torch.where(index > 0, grid[(index - 1).clamp(min=0)], torch.zeros_like(t_start))
    x_start = sched.add_noise(latents, noise, t_start)
    # a guidance-distilled teacher (FLUX.1-dev) reads w + 1 from its embedding: one forward, no CFG
    uncond = None if nets.teacher.guidance_embeds else nets.uncond(device)

    # 2. the guided teacher moves t_s -> t_e: one DDIM/Euler step (cond and uncond in one batched forward), or `move`
    def predict(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with nets.adapters_disabled():
            return nets.teacher.predict(x, t, embeds, uncond, guidance=(w + 1.0).to(device))

    with torch.no_grad():
        if move is None:
            x0_t, eps_t = predict(x_start, t_start)
            a_e, s_e = sched.alpha_sigma(t_end)
            x_end = ddim_step(x0_t.float(), eps_t.float(), a_e.to(device), s_e.to(device))
        else:
            x_end = move(predict, x_start, t_start, t_end)
    # 3. the student's consistency output at t_s, the target's at t_e (no grad)
    pred = nets.f(nets.student, x_start, t_start, embeds, w)
    with torch.no_grad():
        target = nets.f(nets.target_net(), x_end, t_end, embeds, w)
    # 4. pseudo-Huber (or L2) distance
    loss = consistency_loss(pred, target, kind, huber_c)
    return {"loss": loss, "t_start": t_start, "t_end": t_end, "x_start": x_start, "x_end": x_end, "pred": pred, "target": target}


def consistency_setup(method: Method, label: str) -> ConsistencyStudent:
    """Teacher + student networks of a consistency method from its shared sections (LCD, RG-LCD, SCott)."""
    cfg = method.config
    families = ("sd", "sdxl", "flux") if method.flow_teachers else ("sd", "sdxl")
    loaded = load_teacher(method.teacher_config, method.default_teacher, families, label)
    if method.sample_steps > cfg.num_ddim_timesteps:
        raise ConfigError(f"sample.steps must be in 1..{cfg.section}.num_ddim_timesteps ({cfg.num_ddim_timesteps}), got {method.sample_steps}")
    return ConsistencyStudent(loaded, cfg, cfg.section)


class ConsistencyMethod(Method):
    """What LCD, RG-LCD and SCott share around their loss: the networks (``self.nets``), data, state,
    sampling and export (no train_step). ``label`` names the method in error messages."""

    label: ClassVar[str] = "LCD"
    #: whether the method distils flow-matching (Flux) teachers as well as SD-family UNets
    flow_teachers: ClassVar[bool] = True

    def __init__(self, config: Any, **shared: Any):
        super().__init__(config, **shared)
        self.nets: ConsistencyStudent = consistency_setup(self, self.label)

    def is_digits_world(self) -> bool:
        return self.nets.loaded.digits

    @property
    def teacher(self):
        return self.nets.teacher

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"student": self.nets.trainable()}

    def after_optimizer_step(self, name: str, step: int) -> None:
        if name == "student":
            self.nets.update_target(self.config.ema_decay)

    def train_dataset(self) -> torch.utils.data.Dataset:
        loaded = self.nets.loaded
        tokenizer = loaded.teacher.pipeline().tokenizer  # long captions are truncated by it: counted and reported once
        return build_dataset(self.data_config, resolution=loaded.resolution, teacher=loaded.teacher, teacher_id=str(loaded.path.resolve()),
                             count_tokens=lambda c: len(tokenizer(c).input_ids), max_caption_tokens=int(tokenizer.model_max_length))

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        return self.nets.state()

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.nets.load_state(state)

    def guidance_scale(self) -> float:
        return self.nets.default_guidance_scale(self.sample_config.guidance_scale)

    @torch.no_grad()
    def sample(self, prompts: list[str], num_steps: int, generator: torch.Generator, guidance_scale: float | None = None) -> torch.Tensor:
        g = self.guidance_scale() if guidance_scale is None else guidance_scale
        return self.nets.sample(prompts, num_steps, generator, g, weights=self.export_config.weights)

    def export_name(self) -> str:
        return self.name

    def export_extra(self) -> dict[str, Any]:
        return {}

    def export_plan(self):
        return student_export_plan(self.nets, self.export_name(), asdict(self.config), self.sample_steps, self.guidance_scale(),
                                   self.export_config.weights, self.export_extra())
