"""Few-step samplers as small pure functions: DDIM (deterministic and with eta) and rectified-flow Euler.

All steps work in the ``(x0, eps)`` parameterisation of ``x_t = alpha_t * x0 + sigma_t * eps``; turn a network
output into ``(x0, eps)`` with :func:`fastgen.diffusion.predictions.to_x0_eps` first. Coefficients may be python
floats, 0-d tensors or per-sample tensors of shape [B].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fastgen.diffusion.predictions import Coef, expand_like, to_x0_eps
from fastgen.diffusion.schedule import NoiseSchedule, static_shift, time_shift_exponential
from fastgen.errors import ConfigError

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _coef(c: Coef, x: torch.Tensor) -> torch.Tensor:
    """A coefficient as a tensor on ``x``'s device, broadcastable against ``x``."""
    if not isinstance(c, torch.Tensor):
        c = torch.as_tensor(c, dtype=x.dtype if x.is_floating_point() else torch.float32)
    return expand_like(c, x)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_to: Coef, sigma_to: Coef) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): ``x_to = alpha_to * x0 + sigma_to * eps``.

    For a flow schedule (alpha = 1 - sigma) this is exactly the Euler step of the rectified-flow ODE.
    """
    return expand_like(alpha_to, x0) * x0 + expand_like(sigma_to, x0) * eps


def ddim_sde_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_from: Coef,
    sigma_from: Coef,
    alpha_to: Coef,
    sigma_to: Coef,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DDIM with stochasticity ``eta`` (Song et al. 2021, eq. 12; ``DDIMScheduler.step(eta=...)``).

        var   = (sigma_to^2 / sigma_from^2) * (1 - alpha_from^2 / alpha_to^2)
        std   = eta * sqrt(var)
        x_to  = alpha_to * x0 + sqrt(sigma_to^2 - std^2) * eps + std * noise

    ``eta = 0`` is deterministic DDIM (``noise`` may be None), ``eta = 1`` is DDPM ancestral sampling.
    """
    a_f, s_f = _coef(alpha_from, x0), _coef(sigma_from, x0)
    a_t, s_t = _coef(alpha_to, x0), _coef(sigma_to, x0)
    var = (s_t**2 / s_f**2) * (1 - a_f**2 / a_t**2)
    std = eta * var.sqrt()
    direction = (s_t**2 - std**2).clamp(min=0).sqrt()
    x_to = a_t * x0 + direction * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_sde_step with eta > 0 needs noise (e.g. torch.randn_like(x0)).")
        x_to = x_to + std * noise
    return x_to


XPredictor = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def substep_grid(t_from: torch.Tensor, t_to: torch.Tensor, substeps: int) -> list[torch.Tensor]:
    """``substeps + 1`` integer timesteps per sample, evenly splitting ``t_from -> t_to`` (both ends kept).

    ``u_j = t_from - round(j * (t_from - t_to) / M)``; spans shorter than ``M`` repeat a timestep (a zero-length
    sub-step, which leaves ``x`` unchanged).
    """
    if substeps < 1:
        raise ConfigError(f"the number of sub-steps must be >= 1, got {substeps}")
    t_from, t_to = t_from.long(), t_to.long()
    span = (t_from - t_to).double()
    return [t_from - torch.round(span * j / substeps).long() for j in range(substeps + 1)]


def sde_teacher_move(
    predict: XPredictor,
    x: torch.Tensor,
    t_from: torch.Tensor,
    t_to: torch.Tensor,
    schedule: NoiseSchedule,
    substeps: int = 1,
    eta: float = 0.0,
    noises: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Move ``x`` from ``t_from`` to ``t_to`` (vp timesteps, per sample) in ``substeps`` DDIM-eta steps.

    Each sub-step asks ``predict(x_u, u) -> (x0, eps)`` (e.g. the teacher with CFG) and applies
    :func:`ddim_sde_step` with stochasticity ``eta`` and ``noises[j]``: ``M`` applications of
    ``DDIMScheduler.step(eta=eta, variance_noise=noises[j])``. ``eta = 0`` with one sub-step is LCD's
    deterministic DDIM move (no noise drawn or needed).
    """
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta (the noise strength of the SDE solver) must be in [0, 1], got {eta}")
    grid = substep_grid(t_from, t_to, substeps)
    if eta > 0 and (noises is None or len(noises) < substeps):
        raise ValueError(f"sde_teacher_move with eta > 0 needs {substeps} noise tensors, got {0 if noises is None else len(noises)}")
    x = x.float()
    for j in range(substeps):
        u, v = grid[j].to(x.device), grid[j + 1].to(x.device)
        x0, eps = predict(x, u)
        a_u, s_u = schedule.alpha_sigma(u)
        a_v, s_v = schedule.alpha_sigma(v)
        dev = x.device
        if eta > 0:
            x = ddim_sde_step(x0.float(), eps.float(), a_u.to(dev), s_u.to(dev), a_v.to(dev), s_v.to(dev), eta, noises[j].float())
        else:
            x = ddim_step(x0.float(), eps.float(), a_v.to(dev), s_v.to(dev))
    return x


def euler_flow_step(x_t: torch.Tensor, velocity: torch.Tensor, sigma_from: Coef, sigma_to: Coef) -> torch.Tensor:
    """Euler step of the rectified-flow ODE ``dx/dsigma = v``: ``x_to = x_t + (sigma_to - sigma_from) * v``.

    Computed in at least float32 (like ``FlowMatchEulerDiscreteScheduler``) and returned in ``x_t``'s dtype.
    """
    work = torch.promote_types(x_t.dtype, torch.float32)
    x = x_t.to(work)
    dt = _coef(sigma_to, x) - _coef(sigma_from, x)
    return (x + dt * velocity).to(x_t.dtype)


def ddim_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    timestep_spacing: str = "leading",
) -> torch.Tensor:
    """The descending timesteps ``DDIMScheduler.set_timesteps`` produces.

    leading:  t_i = i * (T // N) + steps_offset, i = N-1..0
    trailing: t = round(arange(T, 0, -T/N)) - 1
    linspace: t = round(linspace(0, T-1, N)) reversed
    (as in diffusers, ``steps_offset`` only applies to "leading").
    """
    N, T = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T} (num_train_timesteps), got {N}.")
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = T // N
        ts = (np.arange(0, N) * ratio).round()[::-1].astype(np.int64) + int(steps_offset)
    elif timestep_spacing == "trailing":
        ratio = T / N
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ConfigError(
            f"Unsupported timestep_spacing {timestep_spacing!r}; use one of {', '.join(TIMESTEP_SPACINGS)}."
        )
    return torch.from_numpy(ts.copy())


def flow_sigmas(
    num_inference_steps: int,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    mu: float | None = None,
    use_dynamic_shifting: bool = False,
) -> torch.Tensor:
    """The float32 sigmas ``FlowMatchEulerDiscreteScheduler.set_timesteps(N, mu=mu)`` produces, terminal 0 included.

    sigma_max, sigma_min are the (shifted, unless dynamic) ends of the training grid ``{1/T, ..., 1}``;
    ``sigma_i = linspace(sigma_max, sigma_min, N)`` are then shifted with ``static_shift(., shift)`` or, with
    dynamic shifting, ``exp(mu) / (exp(mu) + 1/sigma - 1)``; finally 0 is appended (length N + 1).
    """
    N, T = int(num_inference_steps), int(num_train_timesteps)
    if N < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {N}.")
    if use_dynamic_shifting and mu is None:
        raise ValueError("flow_sigmas with use_dynamic_shifting=True needs mu (from the image sequence length).")
    grid = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
    if not use_dynamic_shifting:
        grid = static_shift(grid, shift)
    sigma_max, sigma_min = grid[0].item(), grid[-1].item()
    sig = np.linspace(sigma_max * T, sigma_min * T, N) / T
    if use_dynamic_shifting:
        sig = time_shift_exponential(sig, mu)
    else:
        sig = static_shift(sig, shift)
    sig = torch.from_numpy(np.asarray(sig)).to(torch.float32)
    return torch.cat([sig, torch.zeros(1)])


def skip_grid(num_train_timesteps: int = 1000, num_ddim_steps: int = 50) -> torch.Tensor:
    """LCD's DDIM skip grid, ascending: ``t_n = (n + 1) * k - 1`` for n = 0..N-1, ``k = T // N``.

    E.g. T=1000, N=50 -> [19, 39, ..., 999]; a consistency-distillation pair is (t_n, t_{n-1}) on this grid.
    """
    T, N = int(num_train_timesteps), int(num_ddim_steps)
    if not 1 <= N <= T:
        raise ValueError(f"num_ddim_steps must be in 1..{T} (num_train_timesteps), got {N}.")
    k = T // N
    return torch.arange(1, N + 1, dtype=torch.long) * k - 1


def _time_batch(t: torch.Tensor | float | int, x: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    if schedule.kind == "vp":
        t = t.long()
    elif not t.is_floating_point():
        t = t.float()
    return t.expand(x.shape[0]).clone() if t.ndim == 0 else t


def sample_ddim(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor | int,
    final_alpha_one: bool = False,
    *,
    num_inference_steps: int | None = None,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """Deterministic DDIM sampling from ``x_T``, stepping exactly like ``DDIMScheduler`` (eta = 0).

    ``timesteps``: the descending timesteps the network is evaluated at (e.g. ``DDIMScheduler.timesteps``), or an
    int N, in which case they are ``ddim_timesteps(N, T, steps_offset, timestep_spacing)``.
    ``model_fn(x_t, t) -> raw network output`` (of ``schedule.prediction_type``), where ``t`` is the schedule's
    time as a [B] tensor (vp: long timesteps; flow: sigma; wrap with ``schedule.model_timestep`` if the network
    expects diffusers timesteps). Each step: ``(x0, eps) = to_x0_eps(out)``, ``x <- alpha_prev * x0 +
    sigma_prev * eps``.

    vp: like ``DDIMScheduler.step``, the step from ``t`` goes to ``prev = t - T // num_inference_steps`` (T the
    schedule's ``num_train_timesteps``; ``num_inference_steps`` defaults to ``len(timesteps)``; pass the full
    count when ``timesteps`` is a tail of a longer schedule, as img2img does), which is *not* always the next
    listed timestep ("linspace" spacing, or "trailing" when N does not divide T). A ``prev < 0`` goes to
    ``abar = 1`` if ``final_alpha_one`` (``set_alpha_to_one=True``) else to ``abar_0``.
    flow: the step goes to the next listed sigma, and the last one to sigma = 0 (the Euler step of the ODE).
    Returns the final sample. Gradients flow through; wrap in ``torch.no_grad()`` for plain inference.
    """
    if isinstance(timesteps, int):
        if schedule.kind != "vp":
            raise ValueError(
                "sample_ddim with an int step count builds DDIM timesteps, which need a vp schedule; for a flow "
                "schedule pass the sigmas (e.g. flow_sigmas(n)[:-1])."
            )
        timesteps = ddim_timesteps(timesteps, schedule.num_train_timesteps, steps_offset, timestep_spacing)
    ts = list(torch.as_tensor(timesteps).flatten().tolist())
    if not ts:
        raise ValueError("sample_ddim needs at least one timestep.")
    if schedule.kind == "vp":
        n = len(ts) if num_inference_steps is None else int(num_inference_steps)
        if not 1 <= n <= schedule.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in 1..{schedule.num_train_timesteps} (num_train_timesteps), got {n}."
            )
        step = schedule.num_train_timesteps // n
        final = -1 if final_alpha_one else 0
        prevs = [int(t) - step if int(t) - step >= 0 else final for t in ts]
    else:
        prevs = ts[1:] + [0.0]
    x = x_T
    for t, prev in zip(ts, prevs):
        t_b = _time_batch(t, x, schedule)
        t_prev = _time_batch(prev, x, schedule)
        alpha, sigma = schedule.alpha_sigma(t_b)
        out = model_fn(x, t_b)
        x0, eps = to_x0_eps(out, x, alpha, sigma, schedule.prediction_type)
        alpha_p, sigma_p = schedule.alpha_sigma(t_prev)
        x = ddim_step(x0, eps, alpha_p, sigma_p)
    return x


def sample_flow_euler(model_fn: ModelFn, x_T: torch.Tensor, sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Euler sampling of the rectified-flow ODE along ``sigmas`` (descending, terminal 0 included).

    ``model_fn(x_t, sigma) -> velocity`` with ``sigma`` a float [B] tensor (multiply by T for diffusers
    transformers); ``x <- x + (sigma_{i+1} - sigma_i) * v`` for each consecutive pair.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if sig.numel() < 2:
        raise ValueError("sample_flow_euler needs at least two sigmas (start and end, e.g. flow_sigmas(...)).")
    x = x_T
    for i in range(sig.numel() - 1):
        s_from, s_to = sig[i].to(x.device), sig[i + 1].to(x.device)
        v = model_fn(x, s_from.expand(x.shape[0]).clone())
        x = euler_flow_step(x, v, s_from, s_to)
    return x
