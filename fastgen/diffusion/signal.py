"""Signal coordinates of a deterministic trajectory with a fixed starting noise (BOOT's signal-ODE).

For a trajectory of the teacher's probability-flow ODE started at the noise ``eps``, the *signal* at
time ``t`` is ``y_t = (x_t - sigma_t * eps) / alpha_t``: the point ``x_t`` with the starting noise
taken out. ``y`` is a low-frequency image all the way (``y_0`` is the sample), which is what a
one-step student can emit.

**The DDIM step in signal coordinates.** A DDIM step from ``t`` to ``s < t`` with the teacher's
x0-estimate ``f = f(x_t, t)`` is ``x_s = alpha_s f + sigma_s eps_hat`` with
``eps_hat = (x_t - alpha_t f) / sigma_t``. With ``x_t = alpha_t y_t + sigma_t eps`` this is
``eps_hat = eps + (alpha_t / sigma_t) (y_t - f)``, so the fixed ``eps`` cancels and::

    y_s = y_t + c(t, s) * (f - y_t),      c(t, s) = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)
                                                  = 1 - exp(lambda_s - lambda_t),  lambda = log(sigma / alpha)

Nothing in it depends on how ``alpha`` and ``sigma`` are related, so the same step holds for
variance-preserving teachers (eps, v or sample prediction: they differ only in how ``f`` is
obtained) and for rectified-flow teachers (``alpha = 1 - sigma``), where the DDIM step *is* the
Euler step ``x_s = x_t + (sigma_s - sigma_t) v`` of ``FlowMatchEulerDiscreteScheduler``
(``v = eps_hat - f``). At a flow teacher's ``sigma_t = 1`` (``alpha_t = 0``) the coefficient is 1:
the step lands on ``f(eps, 1)`` whatever ``y_t`` is; at ``sigma_s = 0`` it is 1 too (``y_0 = f``).

:func:`signal_grid` places the bootstrapping times uniformly in ``lambda`` (uniform in log-SNR),
where the coefficient of neighbouring grid points is the same everywhere.
"""

from __future__ import annotations

import torch

from fastgen.diffusion.predictions import expand_like
from fastgen.diffusion.schedule import NoiseSchedule
from fastgen.errors import ConfigError

__all__ = ["point_from_signal", "signal_coefficient", "signal_ddim_step", "signal_from_point", "signal_grid"]


def signal_from_point(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """``y_t = (x_t - sigma_t eps) / alpha_t`` (per-sample ``alpha_t``, ``sigma_t`` of shape [B] broadcast)."""
    return (x_t - expand_like(sigma_t, x_t) * eps) / expand_like(alpha_t, x_t)


def point_from_signal(y_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """``x_t = alpha_t y_t + sigma_t eps``: the trajectory's point at ``t`` from its signal."""
    return expand_like(alpha_t, y_t) * y_t + expand_like(sigma_t, y_t) * eps


def signal_coefficient(alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """``c(t, s) = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)`` of the signal-space DDIM step ``t -> s``
    (``s < t``), computed in float64 where the inputs allow; ``alpha_t = 0`` or ``sigma_s = 0`` give 1."""
    dtype = torch.float64 if alpha_t.device.type != "mps" else torch.float32
    a_t, s_t, a_s, s_s = (v.to(dtype) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    return (1.0 - (s_s * a_t) / (a_s * s_t)).to(alpha_t.dtype)


def signal_ddim_step(y_t: torch.Tensor, x0: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """``y_s = y_t + c (x0 - y_t)``: the DDIM step in signal coordinates with the teacher's x0-estimate
    ``x0`` at ``(x_t, t)`` and the per-sample coefficient ``c`` of :func:`signal_coefficient`."""
    return y_t + expand_like(coefficient.to(y_t.dtype), y_t) * (x0 - y_t)


def _vp_grid(schedule: NoiseSchedule, n: int, t_max: int) -> torch.Tensor:
    """``n + 1`` distinct integer timesteps ``0 = t_0 < ... < t_n = t_max``, as uniform in log-SNR as integers allow."""
    if n > t_max:
        raise ConfigError(f"a grid of {n} intervals needs {n + 1} distinct timesteps but 0..{t_max} has only {t_max + 1}; "
                          f"use at most {t_max} intervals")
    steps = torch.arange(t_max + 1)
    snr = schedule.log_snr(steps).to(torch.float64)  # decreasing in t
    targets = torch.linspace(float(snr[0]), float(snr[-1]), n + 1, dtype=torch.float64)
    # nearest timestep of each target (log-SNR is monotone: search on its negative, increasing)
    idx = torch.searchsorted(-snr, -targets).clamp(max=t_max)
    lower = (idx - 1).clamp(min=0)
    nearest = torch.where((snr[lower] - targets).abs() < (snr[idx] - targets).abs(), lower, idx)
    grid = [0]
    for i in range(1, n + 1):  # strictly increasing: where the spacing is below one timestep, take the next one
        grid.append(max(int(nearest[i]), grid[-1] + 1))
    for i in range(n, 0, -1):  # ... and end exactly at t_max
        grid[i] = min(grid[i], t_max - (n - i))
    grid[n] = t_max
    return torch.tensor(grid, dtype=torch.long)


def signal_grid(schedule: NoiseSchedule, num_intervals: int, t_max: float | int | None = None) -> torch.Tensor:
    """The bootstrapping grid ``t_0 < t_1 < ... < t_N`` (N = ``num_intervals``), ascending, uniform in log-SNR.

    vp teachers: integer timesteps from 0 (the read-out) to ``t_max`` (default ``T - 1``, the boundary); near
    ``t = 0``, where one timestep spans more log-SNR than a grid interval, consecutive timesteps are used.
    flow teachers: sigmas from 0 (the sample) to ``t_max`` (default 1, pure noise); the interior points are
    uniform in log-SNR between the teacher's smallest and largest training sigma (``1/T`` and ``1 - 1/T``).
    """
    n = int(num_intervals)
    if n < 1:
        raise ConfigError(f"the grid needs at least 1 interval, got {n}")
    T = int(schedule.num_train_timesteps)
    if schedule.kind == "vp":
        top = T - 1 if t_max is None else int(t_max)
        if not 1 <= top <= T - 1:
            raise ConfigError(f"the boundary timestep must be in 1..{T - 1}, got {t_max}")
        return _vp_grid(schedule, n, top)
    top = 1.0 if t_max is None else float(t_max)
    if not 0.0 < top <= 1.0:
        raise ConfigError(f"the boundary sigma of a flow teacher must be in (0, 1], got {t_max}")
    lo, hi = 1.0 / T, min(1.0 - 1.0 / T, top)
    if n == 1:
        return torch.tensor([0.0, top], dtype=torch.float64)
    snr = torch.linspace(float(schedule.log_snr(torch.tensor(lo, dtype=torch.float64))),
                         float(schedule.log_snr(torch.tensor(hi, dtype=torch.float64))), n - 1, dtype=torch.float64)
    interior = torch.sigmoid(-snr / 2.0)  # log-SNR = 2 log((1 - s) / s)  ->  s = sigmoid(-snr / 2)
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), interior, torch.tensor([top], dtype=torch.float64)])
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ConfigError(f"the flow grid of {n} intervals below sigma {top} is not increasing; use a larger t_max")
    return grid
