"""Noise schedules: the forward process ``x_t = alpha_t * x0 + sigma_t * eps`` of a teacher.

Two families are supported:

* ``kind="vp"``: the discrete DDPM family used by DDPM/DDIM/LCM/Euler/DPM-Solver schedulers. Time is an integer
  timestep ``t in {0, ..., T-1}`` and ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` with
  ``abar_t = prod_{s<=t} (1 - beta_s)``. ``t = -1`` denotes the "final alpha" ``abar = 1`` (clean data).
* ``kind="flow"``: rectified flow as in ``FlowMatchEulerDiscreteScheduler``. Time is ``sigma in [0, 1]`` and
  ``x_t = (1 - sigma) * x0 + sigma * eps``; the network is fed ``sigma * T``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastgen.diffusion.predictions import PREDICTION_TYPES, expand_like
from fastgen.errors import ConfigError, ModelLoadError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCHEDULE_KINDS = ("vp", "flow")

# Defaults of the diffusers classes when a key is absent from a config (DDPM/DDIM/Euler/DPM-Solver share them).
_VP_DEFAULTS = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
_VP_DEFAULTS_BY_CLASS = {
    "LCMScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
}
_PREDICTION_ALIASES = {"flow_prediction": "flow"}


def _glide_cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """``squaredcos_cap_v2``: beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999),
    abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)  (Nichol & Dhariwal 2021)."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that abar_{T-1} = 0 (Lin et al. 2023, Algorithm 1):
    sqrt(abar) <- (sqrt(abar) - sqrt(abar_last)) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_last))."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def betas_from_config(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The float32 betas a diffusers DDPM-family scheduler builds from these config values.

    linear: beta = linspace(beta_start, beta_end, T); scaled_linear: beta = linspace(sqrt(beta_start),
    sqrt(beta_end), T)^2; squaredcos_cap_v2: the GLIDE cosine schedule. Computed in float32 like diffusers so
    that the teacher's training schedule is reproduced exactly.
    """
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float32).flatten()
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _glide_cosine_betas(num_train_timesteps)
    else:
        raise ConfigError(
            f"Unsupported beta_schedule {beta_schedule!r}; set beta_schedule to one of "
            f"{', '.join(BETA_SCHEDULES)} (or pass trained_betas)."
        )
    if rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    return betas


@dataclass(eq=False)
class NoiseSchedule:
    """The forward process of a teacher: ``x_t = alpha(t) * x0 + sigma(t) * eps``.

    Attributes:
        kind: ``"vp"`` (discrete DDPM family, integer timesteps) or ``"flow"`` (rectified flow, t = sigma).
        prediction_type: what the teacher network outputs, one of ``PREDICTION_TYPES``.
        num_train_timesteps: T, the number of discrete training timesteps.
        alphas_cumprod: vp only, ``abar`` as a float64 tensor of shape [T].
        shift: flow only, the static shift s in ``s*sigma / (1 + (s-1)*sigma)``.
        use_dynamic_shifting: flow only, whether the sigmas are shifted per resolution with ``mu``.
    """

    kind: str
    prediction_type: str
    num_train_timesteps: int = 1000
    alphas_cumprod: torch.Tensor | None = field(default=None, repr=False)
    shift: float = 1.0
    use_dynamic_shifting: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"Unsupported schedule kind {self.kind!r}; use one of {', '.join(SCHEDULE_KINDS)}.")
        self.prediction_type = _PREDICTION_ALIASES.get(self.prediction_type, self.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"Unsupported prediction_type {self.prediction_type!r}; set prediction_type to one of "
                f"{', '.join(PREDICTION_TYPES)}."
            )
        self.num_train_timesteps = int(self.num_train_timesteps)
        if self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}.")
        if self.kind == "vp":
            if self.prediction_type == "flow":
                raise ConfigError(
                    "prediction_type 'flow' needs a rectified-flow schedule (alpha = 1 - sigma); use kind='flow' "
                    "or one of epsilon, v_prediction, sample for a vp schedule."
                )
            if self.alphas_cumprod is None:
                raise ConfigError(
                    "A vp NoiseSchedule needs alphas_cumprod; build it with NoiseSchedule.from_scheduler_config."
                )
            acp = torch.as_tensor(self.alphas_cumprod).detach().to("cpu", torch.float64).flatten()
            if acp.numel() != self.num_train_timesteps:
                raise ConfigError(
                    f"alphas_cumprod has {acp.numel()} entries but num_train_timesteps is "
                    f"{self.num_train_timesteps}; make them equal."
                )
            self.alphas_cumprod = acp
        else:
            if self.prediction_type == "v_prediction":
                raise ConfigError(
                    "prediction_type 'v_prediction' assumes alpha^2 + sigma^2 = 1, which a flow schedule does not "
                    "satisfy; use 'flow' (or epsilon/sample) for kind='flow'."
                )
            self.shift = float(self.shift)
            if not self.shift > 0:
                raise ConfigError(f"shift must be > 0, got {self.shift}.")
        self._acp_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_scheduler_config(cls, config: Mapping) -> "NoiseSchedule":
        """Build the schedule a diffusers scheduler config describes.

        Accepts a config dict / ``FrozenDict`` (or a scheduler object, whose ``.config`` is used) of
        DDPM/DDIM/LCM/EulerDiscrete/DPMSolver* (vp) or FlowMatch* schedulers (flow). Flow is detected by a
        ``_class_name`` starting with ``FlowMatch``, by ``use_flow_sigmas`` (DPM-Solver/UniPC flow mode, shift =
        ``flow_shift``), or by a ``shift`` key without ``beta_start``.
        """
        if not isinstance(config, Mapping) and hasattr(config, "config"):
            config = config.config
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"from_scheduler_config expects a mapping (a scheduler config), got {type(config).__name__}; "
                "pass scheduler.config or the parsed scheduler_config.json."
            )
        class_name = str(config.get("_class_name") or "")
        T = int(config.get("num_train_timesteps", 1000) or 1000)
        prediction_type = config.get("prediction_type")

        is_flow = (
            class_name.startswith("FlowMatch")
            or bool(config.get("use_flow_sigmas", False))
            or ("shift" in config and "beta_start" not in config)
        )
        if is_flow:
            if config.get("use_flow_sigmas", False) and not class_name.startswith("FlowMatch"):
                shift = config.get("flow_shift", 1.0)
            else:
                shift = config.get("shift", 1.0)
            dynamic = bool(config.get("use_dynamic_shifting", False))
            time_shift_type = config.get("time_shift_type", "exponential") or "exponential"
            if dynamic and time_shift_type != "exponential":
                raise ConfigError(
                    f"Unsupported time_shift_type {time_shift_type!r} for dynamic shifting; only 'exponential' "
                    "is supported: set time_shift_type='exponential' or use_dynamic_shifting=False."
                )
            if prediction_type is None:
                prediction_type = "flow"
            prediction_type = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
            if prediction_type not in ("flow", "epsilon", "sample"):
                raise ConfigError(
                    f"Unsupported prediction_type {prediction_type!r} for a flow-matching scheduler; "
                    "supported: flow (flow_prediction), epsilon, sample."
                )
            return cls(
                kind="flow",
                prediction_type=prediction_type,
                num_train_timesteps=T,
                shift=float(1.0 if shift is None else shift),
                use_dynamic_shifting=dynamic,
            )

        defaults = dict(_VP_DEFAULTS)
        defaults.update(_VP_DEFAULTS_BY_CLASS.get(class_name, {}))

        def get(key: str) -> Any:
            value = config.get(key)
            return defaults[key] if value is None else value

        beta_schedule = get("beta_schedule")
        if beta_schedule not in BETA_SCHEDULES and config.get("trained_betas") is None:
            raise ConfigError(
                f"Unsupported beta_schedule {beta_schedule!r} in the scheduler config; supported beta_schedule "
                f"values: {', '.join(BETA_SCHEDULES)} (or give trained_betas)."
            )
        if prediction_type is None:
            prediction_type = "epsilon"
        vp_types = ("epsilon", "v_prediction", "sample")
        if prediction_type not in vp_types:
            raise ConfigError(
                f"Unsupported prediction_type {prediction_type!r} in the scheduler config; supported "
                f"prediction_type values for a DDPM-family scheduler: {', '.join(vp_types)}."
            )
        betas = betas_from_config(
            num_train_timesteps=T,
            beta_start=float(get("beta_start")),
            beta_end=float(get("beta_end")),
            beta_schedule=beta_schedule,
            trained_betas=config.get("trained_betas"),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )
        # cumprod in float32 exactly as diffusers does, then stored as float64.
        acp = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)
        return cls(kind="vp", prediction_type=prediction_type, num_train_timesteps=acp.numel(), alphas_cumprod=acp)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "NoiseSchedule":
        """Read ``folder/scheduler/scheduler_config.json`` (a pipeline folder) or ``folder/scheduler_config.json``."""
        folder = os.fspath(folder)
        candidates = [
            os.path.join(folder, "scheduler", "scheduler_config.json"),
            os.path.join(folder, "scheduler_config.json"),
        ]
        for path in candidates:
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        config = json.load(f)
                except (OSError, json.JSONDecodeError) as exc:
                    raise ModelLoadError(
                        f"Cannot read scheduler config {path}: {exc}; fix or replace the file."
                    ) from exc
                return cls.from_scheduler_config(config)
        raise ModelLoadError(
            f"No scheduler config found in {folder!r} (looked for {' and '.join(candidates)}); "
            "point to a diffusers pipeline folder or a scheduler folder."
        )

    # ------------------------------------------------------------------ coefficients

    def _acp_on(self, device: torch.device) -> torch.Tensor:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        key = (device, dtype)
        cached = self._acp_cache.get(key)
        if cached is None:
            cached = self.alphas_cumprod.to(device=device, dtype=dtype)
            self._acp_cache[key] = cached
        return cached

    @staticmethod
    def _out_dtype(t: torch.Tensor) -> torch.dtype:
        return t.dtype if t.is_floating_point() else torch.float32

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        """vp: abar_t (float64 where available) with abar = 1 for negative t (the final alpha)."""
        idx = t.round().long() if t.is_floating_point() else t.long()
        acp = self._acp_on(idx.device)
        abar = acp[idx.clamp(min=0)]
        return torch.where(idx < 0, torch.ones_like(abar), abar)

    def alpha_sigma(self, t: torch.Tensor | float | int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` with the shape and device of ``t``.

        vp: ``t`` are integer timesteps in 0..T-1 -> ``(sqrt(abar_t), sqrt(1 - abar_t))``; ``t = -1`` (any
        negative t) is the final alpha ``abar = 1`` -> ``(1, 0)``. Float ``t`` is rounded to the nearest timestep.
        flow: ``t`` is sigma in [0, 1] -> ``(1 - sigma, sigma)``.
        Returned in float32, or in ``t``'s dtype when ``t`` is floating point.
        """
        t = torch.as_tensor(t)
        dtype = self._out_dtype(t)
        if self.kind == "flow":
            s = t.to(dtype)
            return 1.0 - s, s
        abar = self._abar(t)
        return abar.sqrt().to(dtype), (1.0 - abar).sqrt().to(dtype)

    def log_snr(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """``lambda_t = log(alpha_t^2 / sigma_t^2)``; +inf at clean data (vp t = -1, flow sigma = 0).

        vp: log(abar) - log(1 - abar); flow: 2 * (log(1 - sigma) - log(sigma)).
        """
        t = torch.as_tensor(t)
        dtype = self._out_dtype(t)
        if self.kind == "flow":
            s = t.to(torch.float64 if t.device.type != "mps" else torch.float32)
            return (2.0 * (torch.log1p(-s) - torch.log(s))).to(dtype)
        abar = self._abar(t)
        return (torch.log(abar) - torch.log1p(-abar)).to(dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """Forward process ``x_t = alpha_t * x0 + sigma_t * eps``; per-sample ``t`` of shape [B] broadcasts."""
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t, device=x0.device))
        alpha, sigma = alpha.to(x0.dtype), sigma.to(x0.dtype)
        return expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * eps

    def model_timestep(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """The timestep the network is fed (diffusers convention): vp -> ``t``; flow -> ``sigma * T``."""
        t = torch.as_tensor(t)
        if self.kind == "vp":
            return t
        return t.to(self._out_dtype(t)) * self.num_train_timesteps

    def shifted_sigma(self, sigma: torch.Tensor | float, mu: float | None = None) -> torch.Tensor:
        """Flow only: shift sigmas towards noise, as ``FlowMatchEulerDiscreteScheduler`` does.

        static (``use_dynamic_shifting=False``): ``s * sigma / (1 + (s - 1) * sigma)`` (``mu`` is ignored);
        dynamic: ``exp(mu) / (exp(mu) + (1/sigma - 1))`` (the exponential time shift; ``mu`` is required).
        """
        if self.kind != "flow":
            raise ConfigError("shifted_sigma applies to flow schedules only; this schedule is kind='vp'.")
        sigma = torch.as_tensor(sigma)
        if not sigma.is_floating_point():
            sigma = sigma.float()
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError(
                    "This flow schedule uses dynamic shifting: pass mu (from the image sequence length) to "
                    "shifted_sigma."
                )
            return time_shift_exponential(sigma, mu)
        return static_shift(sigma, self.shift)

    def training_sigma(self, u: torch.Tensor) -> torch.Tensor:
        """Flow only: the training sigma of a draw ``u ~ U(0, 1]`` (one per sample), from the teacher's training grid.

        * dynamic shifting (e.g. FLUX.1-dev): the scheduler's *unshifted* training grid, indexed uniformly as the
          diffusers flow-matching training scripts do (``timesteps[int(u * T)] / T``): ``sigma = g[min(int(u * T),
          T - 1)]`` with ``g = linspace(1, T, T)[::-1] / T`` in float32, i.e. exactly the values
          ``FlowMatchEulerDiscreteScheduler.sigmas`` holds after ``__init__`` (no shift is applied there when
          ``use_dynamic_shifting=True``). Uniform over ``{1/T, ..., 1}``; no resolution shift (``mu``) enters.
        * static shift: ``shifted_sigma(u)`` = ``s * u / (1 + (s - 1) * u)``, continuous in ``u`` (the shift of the
          scheduler's own training grid); with ``shift = 1`` this is ``u`` bit for bit.

        Returned in ``u``'s floating dtype (float32 for an integer ``u``) on ``u``'s device. Raises ``ValueError``
        for a vp schedule (its training times are integer timesteps, not sigmas).
        """
        if self.kind != "flow":
            raise ConfigError(
                "training_sigma applies to flow schedules only; this schedule is kind='vp' (draw integer "
                "timesteps in 0..num_train_timesteps-1 instead)."
            )
        u = torch.as_tensor(u)
        if not u.is_floating_point():
            u = u.float()
        if not self.use_dynamic_shifting:
            return self.shifted_sigma(u, None)
        T = self.num_train_timesteps
        index = (u * T).long().clamp(0, T - 1)
        return self.training_sigma_grid().to(u.device)[index].to(u.dtype)

    def training_sigma_grid(self) -> torch.Tensor:
        """Flow only: the float32 sigmas of the scheduler's training grid, descending (``FlowMatchEulerDiscreteScheduler
        .sigmas`` after ``__init__``): ``linspace(1, T, T)[::-1] / T``, statically shifted unless the schedule shifts
        dynamically (then unshifted)."""
        if self.kind != "flow":
            raise ConfigError("training_sigma_grid applies to flow schedules only; this schedule is kind='vp'.")
        T = self.num_train_timesteps
        grid = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
        if not self.use_dynamic_shifting:
            grid = static_shift(grid, self.shift)
        return grid

def static_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Static flow shift: ``s * sigma / (1 + (s - 1) * sigma)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def time_shift_exponential(sigma: torch.Tensor, mu: float, power: float = 1.0) -> torch.Tensor:
    """Resolution-dependent shift: ``exp(mu) / (exp(mu) + (1/sigma - 1)^power)``."""
    e = math.exp(mu)
    return e / (e + (1 / sigma - 1) ** power)
