"""Consistency-model pieces as in Latent Consistency Models (``LCMScheduler``).

The consistency function is parameterised with boundary-condition scalings on the discrete timestep t:

    f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_pred(x_t, t)
    c_skip(t) = sigma_data^2 / ((t * s)^2 + sigma_data^2)
    c_out(t)  = (t * s) / sqrt((t * s)^2 + sigma_data^2)

with ``s = timestep_scaling`` (10 in LCM) so that ``f(x, 0) ~= x`` and ``f ~= x0_pred`` elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fastgen.diffusion.predictions import expand_like
from fastgen.diffusion.schedule import NoiseSchedule

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
Generator = torch.Generator | list[torch.Generator] | None


def consistency_scalings(
    t: torch.Tensor | float | int, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary-condition scalings ``(c_skip, c_out)`` of LCM
    (``LCMScheduler.get_scalings_for_boundary_condition_discrete``):

        c_skip = sigma_data^2 / ((t*s)^2 + sigma_data^2),   c_out = (t*s) / sqrt((t*s)^2 + sigma_data^2)

    ``t`` integer timesteps (any shape); returned in float32, or ``t``'s dtype when it is floating point.
    """
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    scaled = t * timestep_scaling
    denom = scaled**2 + sigma_data**2
    return sigma_data**2 / denom, scaled / denom.sqrt()


def consistency_output(
    x_t: torch.Tensor,
    x0_pred: torch.Tensor,
    t: torch.Tensor | float | int,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """The consistency function ``f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_pred``; ``t`` scalar or [B]."""
    c_skip, c_out = consistency_scalings(torch.as_tensor(t, device=x_t.device), sigma_data, timestep_scaling)
    return expand_like(c_skip, x_t) * x_t + expand_like(c_out, x_t) * x0_pred


def lcm_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
) -> torch.Tensor:
    """The descending timesteps of ``LCMScheduler.set_timesteps(N)`` (default, non-custom path).

    The distillation grid is ``t_n = n * k - 1`` for n = 1..int(original_steps * strength), ``k = T //
    original_steps``; inference takes N of them, reversed, at indices ``floor(linspace(0, len, N, endpoint=False))``.
    """
    N, T, orig = int(num_inference_steps), int(num_train_timesteps), int(original_inference_steps)
    if orig > T:
        raise ValueError(f"original_inference_steps ({orig}) cannot exceed num_train_timesteps ({T}).")
    if N < 1 or N > T:
        raise ValueError(f"num_inference_steps must be in 1..{T}, got {N}.")
    k = T // orig
    grid = np.arange(1, int(orig * strength) + 1) * k - 1
    if len(grid) // N < 1:
        raise ValueError(
            f"original_inference_steps x strength = {orig} x {strength} gives fewer than num_inference_steps = {N} "
            f"timesteps; reduce num_inference_steps below {int(orig * strength) + 1} or raise strength."
        )
    if N > orig:
        raise ValueError(f"num_inference_steps ({N}) cannot exceed original_inference_steps ({orig}).")
    grid = grid[::-1]
    idx = np.floor(np.linspace(0, len(grid), num=N, endpoint=False)).astype(np.int64)
    return torch.from_numpy(grid[idx].astype(np.int64).copy())


def randn_like_diffusers(
    shape: Sequence[int],
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise drawn the way diffusers' ``randn_tensor`` draws it, so seeded runs match.

    A CPU generator draws on the CPU and the result is moved to ``device``; a list of generators draws one
    batch item per generator.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(
                    f"Cannot draw a {device} tensor from a {gen_type} generator; use a cpu or {device} one."
                )
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per sample.")
        parts = [torch.randn((1,) + shape[1:], generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def multistep_consistency_sample(
    denoise_fn: DenoiseFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int] | torch.Tensor,
    generator: Generator = None,
    noise_fn: NoiseFn | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (LCM Algorithm 1, ``LCMScheduler.step`` loop).

    For each t_i in ``timesteps`` (descending): ``x0 = denoise_fn(x, t_i)`` (the consistency function
    f(x_t, t), boundary scalings already applied; ``t_i`` given as a [B] tensor of the schedule's time); if t_i is
    not the last, re-noise to the next timestep ``x = alpha_{i+1} * x0 + sigma_{i+1} * z`` with fresh
    ``z ~ N(0, I)``, drawn as ``noise_fn(x0)`` if given, else like diffusers' ``randn_tensor`` with ``generator``.
    The last step returns the denoised sample.
    """
    ts = list(torch.as_tensor(timesteps).flatten().tolist())
    if not ts:
        raise ValueError("multistep_consistency_sample needs at least one timestep.")
    x = x_T
    x0 = x_T
    for i, t in enumerate(ts):
        t_dtype = torch.long if schedule.kind == "vp" else torch.float32
        t_b = torch.full((x.shape[0],), t, device=x.device, dtype=t_dtype)
        x0 = denoise_fn(x, t_b)
        if i + 1 == len(ts):
            break
        if noise_fn is not None:
            z = noise_fn(x0)
        else:
            z = randn_like_diffusers(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t_next = torch.full_like(t_b, ts[i + 1])
        x = schedule.add_noise(x0, z, t_next)
    return x0


def flux_mu(image_seq_len: int, scheduler_config: dict) -> float:
    """FluxPipeline's resolution shift ``mu`` for ``image_seq_len`` packed tokens (its ``calculate_shift``
    with the scheduler config's ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``)."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return float(image_seq_len * m + (base_shift - m * base_len))


def _shift_flow_sigmas(sigmas: np.ndarray, schedule: NoiseSchedule, mu: float | None) -> np.ndarray:
    """The flow schedulers' shift of float32 ``sigmas`` (static, or exponential with ``mu``), in numpy float32."""
    if schedule.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this flow schedule shifts per resolution: pass mu (fastgen.diffusion.flux_mu)")
        e = math.exp(mu)
        return (e / (e + (1 / sigmas - 1) ** 1.0)).astype(np.float32)
    s = schedule.shift
    return (s * sigmas / (1 + (s - 1) * sigmas)).astype(np.float32)


def pipeline_flow_sigmas(num_inference_steps: int, schedule: NoiseSchedule, mu: float | None = None) -> torch.Tensor:
    """The float32 sigmas a stock FluxPipeline samples at (terminal 0 appended, length N + 1): it passes
    ``linspace(1, 1/N, N)`` to the flow scheduler's ``set_timesteps(sigmas=..., mu=...)``, which shifts them
    (``FlowMatchLCMScheduler`` and ``FlowMatchEulerDiscreteScheduler`` alike)."""
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    sig = _shift_flow_sigmas(np.linspace(1.0, 1 / n, n).astype(np.float32), schedule, mu)
    return torch.cat([torch.from_numpy(sig.copy()), torch.zeros(1)])


def flow_skip_grid(num_steps: int, schedule: NoiseSchedule, mu: float | None = None) -> torch.Tensor:
    """Consistency distillation's grid for a flow teacher, ascending: ``shift(n / N)`` for n = 1..N.

    A pair is (sigma_n, sigma_{n-1}) with sigma_0 = 0. Every stock sampling schedule of N' steps with N' dividing
    N (``shift(k / N')``, see :func:`pipeline_flow_sigmas`) lies on this grid.
    """
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"the flow grid needs at least one step, got {n}")
    sig = _shift_flow_sigmas((np.arange(1, n + 1) / n).astype(np.float32), schedule, mu)
    return torch.from_numpy(sig.copy())
