"""BOOT: data-free one-step distillation by bootstrapping in signal space.

The student ``g`` (a copy of the teacher network, its output read as a signal) reads a fixed noise
``eps``, a time ``t`` and the prompt, and emits the signal ``y_t = (x_t - sigma_t eps) / alpha_t`` of
the guided teacher's deterministic trajectory started at ``eps`` (:mod:`fastgen.diffusion.signal`).
One iteration, on prompts only (no image, no VAE encoder)::

    grid t_0 = 0 < ... < t_N = T   uniform in lambda = log(sigma / alpha)       (signal_grid; flow: sigma 0 .. 1)
    i ~ U{delta..N};  t = t_i,  s = t_{i-delta};  eps ~ N(0, I);  c = prompts
    no grad:  y_t   = g(eps, t, c)
              x_t   = alpha_t y_t + sigma_t eps
              f     = teacher x0-estimate at (x_t, t), CFG folded in (cond + uncond in one batched call)
              dl    = 1 - exp(lambda_s - lambda_t)                          (the exact DDIM coefficient)
              target = y_t + dl (f - y_t)                                   (one DDIM step in signal space)
    L_BS = mean( ||g(eps, s, c) - target||^2 / max(dl, min_dlambda)^2 )     (gradient through g(eps, s) only)
    L_BC = ||g(eps, T, c) - f(eps, T, c)||^2                               (boundary: at T the signal is the
                                                                            teacher's x0-estimate from pure noise)
    L = L_BS + boundary_weight * L_BC

The two student calls with gradient (at ``s`` and at ``T``) run as one batch, and so do the two teacher
calls. Sampling is one call: ``y_0 = g(eps, 0, c)``, decoded.

**The boundary** (``boundary``). With ``x0`` (the paper's, above) the student's trajectory starts at
``x_T = alpha_T f(eps, T) + sigma_T eps``: pure noise only where ``alpha_T = 0`` (flow teachers, zero
terminal SNR). SD's schedule has ``alpha_T = 0.068``, and that start moves the trajectory's end: the
teacher's own 32-interval signal-space DDIM on the digits world gives digits-FID 90.0 from it, 70.2 from
``x_T = eps``. With ``start`` the trajectory starts at ``x_T = eps`` exactly, whose signal
``(1 - sigma_T) / alpha_T eps`` is known: rows with ``t = T`` use it instead of the student, and the
boundary term reads the student at ``t_{N - delta}`` against the teacher's own first step from ``eps``,
weighted like a bootstrapping row.

Export: the teacher's pipeline with the student as its network and a one-step ``DDIMScheduler``
(``prediction_type="sample"``, timestep 0), :mod:`fastgen.pipelines.one_step`; stock
``DiffusionPipeline.from_pretrained`` runs it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fastgen.diffusion.signal import point_from_signal, signal_coefficient, signal_ddim_step, signal_grid
from fastgen.errors import ConfigError, ModelLoadError
from fastgen.models.spec import lower_precision
from fastgen.trainers.method import StepOutput, register_method
from fastgen.trainers.one_step import OneStepMethod

__all__ = ["BOOT", "BOOTConfig"]

#: teacher outputs that convert to an x0-estimate (``fastgen.diffusion.to_x0``)
X0_PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


@dataclass
class BOOTConfig:
    """BOOT's algorithm options (the ``boot:`` section).

    Attributes:
        guidance_scale: the teacher's classifier-free guidance folded into every target (pipeline convention,
            ``u + g (c - u)``; 1 = none). The student is conditioned on the prompt only and samples without CFG.
        num_intervals: N, intervals of the lambda-uniform grid between the read-out (t = 0) and the boundary T.
        delta: grid intervals between ``s`` and ``t`` (1 <= delta <= N): one teacher step spans ``delta`` of them.
        min_dlambda: floor of the coefficient in the ``1 / dlambda^2`` weight (it vanishes where the grid is dense).
        boundary: ``x0`` (the paper's): ``g(eps, T) = f(eps, T)``, the trajectory starts at ``alpha_T g + sigma_T eps``;
            ``start``: the trajectory starts at ``x_T = eps`` exactly (the sampler's start; differs from ``x0`` where
            ``alpha_T > 0``, as in SD's schedule): the student is never read at T, the rows with ``t = T`` and the
            boundary term target the teacher's own first step from ``eps``.
        boundary_weight: weight of the boundary term (0: none).
        t_max: the boundary time T (vp: a timestep, default T - 1; flow: a sigma, default 1).
        ema_decay: EMA of the student used for samples and export with ``export.weights: target`` (0: none).
        gradient_checkpointing: trade compute for memory in the student network.
    """

    section: ClassVar[str] = "boot"

    guidance_scale: float = 3.0
    num_intervals: int = 32
    delta: int = 1
    min_dlambda: float = 0.02
    boundary: Literal["x0", "start"] = "start"
    boundary_weight: float = 1.0
    t_max: float | None = None
    ema_decay: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.guidance_scale >= 1.0, f"boot.guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}"),
            (self.num_intervals >= 1, f"boot.num_intervals must be >= 1, got {self.num_intervals}; use e.g. 32"),
            (1 <= self.delta <= self.num_intervals, f"boot.delta ({self.delta}) is outside the grid: it counts grid intervals "
                                                    f"between s and t and must be in 1..boot.num_intervals ({self.num_intervals})"),
            (0.0 < self.min_dlambda <= 1.0, f"boot.min_dlambda must be in (0, 1], got {self.min_dlambda}; use e.g. 0.02"),
            (self.boundary in ("x0", "start"), f"boot.boundary must be 'x0' or 'start', got {self.boundary!r}"),
            (self.boundary_weight >= 0, f"boot.boundary_weight must be >= 0, got {self.boundary_weight}"),
            (0.0 <= self.ema_decay < 1.0, f"boot.ema_decay must be in [0, 1), got {self.ema_decay}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@register_method
class BOOT(OneStepMethod):
    """BOOT; see the module docstring for the algorithm."""

    name = "boot"
    config_class = BOOTConfig
    label = "BOOT"

    def __init__(self, config: BOOTConfig, **shared: Any):
        super().__init__(config, **shared)  # the teacher (self.loaded, self.teacher)
        cfg, loaded, teacher = config, self.loaded, self.teacher
        sched = teacher.schedule
        self.register_buffer("grid", signal_grid(sched, cfg.num_intervals, cfg.t_max), persistent=False)
        alpha_top = float(sched.alpha_sigma(self.grid[-1])[0])
        if teacher.prediction_type not in X0_PREDICTIONS:
            raise ConfigError(f"teacher '{loaded.name}' predicts '{teacher.prediction_type}', which gives no x0-estimate; BOOT "
                              f"needs one of {', '.join(X0_PREDICTIONS)}")
        if teacher.prediction_type == "epsilon" and alpha_top < 1e-4:
            raise ConfigError(f"teacher '{loaded.name}' predicts epsilon and its schedule has alpha = {alpha_top:.2g} at the "
                              f"boundary t = {float(self.grid[-1]):g}: x0 = (x - sigma eps) / alpha gives no x0-estimate there "
                              "(zero terminal SNR); set boot.t_max below it, or distil a v-prediction / sample / flow teacher")
        self.student = copy.deepcopy(teacher.net).requires_grad_(True).train()
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        lower_precision(teacher, loaded.low_dtype)
        self.keep_ema(cfg.ema_decay, "student")

    # ---- what trains -------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"student": [p for p in self.student.parameters() if p.requires_grad]}

    # ---- the networks --------------------------------------------------------------------------
    def signal(self, eps: torch.Tensor, t: torch.Tensor, embeds: Any, net: torch.nn.Module | None = None) -> torch.Tensor:
        """The student's signal ``g(eps, t, c)``: the network's output, in float32."""
        return self.teacher.forward(eps, t, embeds, net=self.student if net is None else net).float()

    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, embeds: Any) -> torch.Tensor:
        """The teacher's x0-estimate with the run's guidance (one batched call for cond and uncond)."""
        g, teacher = float(self.config.guidance_scale), self.teacher
        uncond = None if (teacher.guidance_embeds or g == 1.0) else self.uncond(x_t.device)
        with torch.no_grad():
            return teacher.predict(x_t, t, embeds, uncond, guidance=g)[0].float()

    def coefficient(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The signal-space DDIM coefficient ``1 - exp(lambda_s - lambda_t)`` per sample, float32."""
        (a_t, s_t), (a_s, s_s) = self.teacher.schedule.alpha_sigma(t), self.teacher.schedule.alpha_sigma(s)
        return signal_coefficient(a_t.double(), s_t.double(), a_s.double(), s_s.double()).float().to(t.device)

    def start_signal(self, eps: torch.Tensor) -> torch.Tensor:
        """The signal of the trajectory's start ``x_T = eps``: ``(1 - sigma_T) / alpha_T eps`` (0 where alpha_T = 0,
        a flow teacher's sigma = 1, where the step from T does not depend on it)."""
        a, s = (float(v) for v in self.teacher.schedule.alpha_sigma(self.grid[-1]))
        return eps * ((1.0 - s) / a) if a > 0 else torch.zeros_like(eps)

    def boot_loss(self, eps: torch.Tensor, embeds: Any, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """BOOT's loss for explicit randomness: starting noise ``eps`` [B, C, h, w] and grid ``index`` [B] of ``t``."""
        cfg, device, n = self.config, eps.device, len(self.grid) - 1
        grid, start, bc = self.grid.to(device), cfg.boundary == "start", cfg.boundary_weight > 0
        t, s, top = grid[index], grid[index - cfg.delta], grid[-1:].expand(len(index))
        s_top = grid[n - cfg.delta].expand(len(index)) if start else top  # where the boundary term reads the student
        coef = self.coefficient(t, s)
        a_t, sig_t = (v.to(device).float() for v in self.teacher.schedule.alpha_sigma(t))
        # 1. the target: the student's signal at t (the exact start x_T = eps at T with boundary "start"), one guided
        #    teacher DDIM step t -> s in signal space (no grad); the boundary's teacher call at (eps, T) rides along
        with torch.no_grad():
            y_t = self.signal(eps, t, embeds)
            y_start = self.start_signal(eps) if start else None
            if start:
                y_t = torch.where((index == n).view(-1, 1, 1, 1), y_start, y_t)
            x_t = point_from_signal(y_t, eps, a_t, sig_t)
            both = embeds.cat(embeds) if bc else embeds
            x0 = self.teacher_x0(torch.cat([x_t, eps]) if bc else x_t, torch.cat([t, top]) if bc else t, both)
            f_t, f_top = x0.chunk(2) if bc else (x0, None)
            target = signal_ddim_step(y_t, f_t, coef)
            if bc and start:  # the teacher's own first step from x_T = eps, weighted like a bootstrapping row
                c_top = self.coefficient(top, s_top)
                f_top, w_top = signal_ddim_step(y_start, f_top, c_top), c_top.clamp(min=cfg.min_dlambda).pow(-2)
            else:  # the paper's: g(eps, T) = f(eps, T)
                w_top = torch.ones(len(index), device=device)
        # 2. the student at s (and at the boundary) with gradient, one batched call
        out = self.signal(torch.cat([eps, eps]), torch.cat([s, s_top]), both) if bc else self.signal(eps, s, embeds)
        y_s, y_top = out.chunk(2) if bc else (out, None)
        loss_bs = (coef.clamp(min=cfg.min_dlambda).pow(-2) * (y_s - target).pow(2).flatten(1).mean(1)).mean()
        loss_bc = (w_top * (y_top - f_top).pow(2).flatten(1).mean(1)).mean() if bc else torch.zeros((), device=device)
        return {"loss": loss_bs + cfg.boundary_weight * loss_bc, "loss_bs": loss_bs, "loss_bc": loss_bc, "t": t, "s": s,
                "coefficient": coef, "target": target, "y_s": y_s}

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        embeds = self.teacher.encode_prompt(list(batch["caption"]))
        b, res = len(embeds), self.loaded.resolution
        eps = torch.randn(self.teacher.latent_shape(b, res, res), device=self.teacher.device)
        index = torch.randint(self.config.delta, self.config.num_intervals + 1, (b,)).to(eps.device)
        out = self.boot_loss(eps, embeds, index)
        return StepOutput(losses={"student": out["loss"]}, logs={
            "loss": float(out["loss"].detach()), "loss/bs": float(out["loss_bs"].detach()),
            "loss/bc": float(out["loss_bc"].detach()), "t_mean": float(out["t"].float().mean())})

    # ---- state -------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"student.{k}": v for k, v in self.student.state_dict().items()}, **self.ema_state()}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        sub = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        try:
            self.student.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"the checkpoint's student does not fit a copy of teacher '{self.loaded.name}': {str(exc)[:300]}; "
                                 "use the teacher the run was trained with") from exc
        self.load_ema_state(state)

    # ---- use ---------------------------------------------------------------------------------
    def trained_network(self) -> torch.nn.Module:
        return self.student

    def one_step(self, z: torch.Tensor, embeds: Any, net: torch.nn.Module) -> torch.Tensor:
        """``y_0 = g(eps, t_0, c)``: the signal at the read-out time is the sample."""
        return self.signal(z, self.grid[:1].to(z.device).expand(len(embeds)), embeds, net)

    def export_readout(self) -> tuple[int, str, dict[str, Any]]:
        return int(self.grid[0]), "sample", {"weights_label": self.weights_label("online student"),
                                             "grid": [float(t) for t in self.grid]}
