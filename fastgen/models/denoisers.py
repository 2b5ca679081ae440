"""Precondition wrappers around a raw denoiser network, as EDM's ``*Precond``: the network knows
nothing of the parameterisation; the wrapper turns its output into what a method trains.

* :class:`ConsistencyDenoiser`: the consistency function ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0``
  of LCM for eps, v and flow teachers; the network runs through :meth:`Teacher.forward(net=...)
  <fastgen.models.Teacher.forward>`, so a student copy gets exactly the teacher's conditioning.
* :func:`guidance_embedding` / :func:`with_guidance_embedding`: LCM's embedded guidance ``w``
  (``timestep_cond`` of a UNet with ``time_cond_proj_dim``); :func:`with_flux_guidance_embedding`: the
  same for a Flux transformer (``guidance_embeds``, the guidance-distilled FLUX.1-dev layout).
"""

from __future__ import annotations

import math

import torch

from fastgen.diffusion import consistency_output, to_x0
from fastgen.errors import ConfigError, ModelLoadError
from fastgen.models.teacher import PromptEmbeds, Teacher

__all__ = ["ConsistencyDenoiser", "guidance_embedding", "with_flux_guidance_embedding", "with_guidance_embedding"]

_COND_PROJ_KEY = "time_embedding.cond_proj.weight"


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of guidance weights ``w`` [B] -> [B, dim], as diffusers' pipelines build
    ``timestep_cond``: ``1000 w`` times ``exp(-log(1e4) j/(h-1))``, sin then cos, zero-padded for odd ``dim``."""
    w = torch.as_tensor(w).reshape(-1).to(torch.float32) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


def with_guidance_embedding(net: torch.nn.Module, dim: int, option: str = "w_embedding_dim") -> torch.nn.Module:
    """A float32 copy of a UNet with ``time_cond_proj_dim=dim`` and the teacher's weights; the new
    ``time_embedding.cond_proj`` is zero, so the copy starts exactly as the teacher."""
    existing = net.config.get("time_cond_proj_dim")
    if existing is not None and int(existing) != dim:
        raise ConfigError(
            f"the teacher UNet already has a guidance embedding of size {existing} but {option} is {dim}; set {option}={existing}"
        )
    student = type(net).from_config(net.config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(net.state_dict(), strict=False)
    if unexpected or set(missing) - {_COND_PROJ_KEY}:
        raise ModelLoadError(
            f"could not copy the teacher UNet into the student: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}; the teacher folder's unet/ may be corrupt"
        )
    if _COND_PROJ_KEY in missing:
        with torch.no_grad():
            student.time_embedding.cond_proj.weight.zero_()
    return student.to(dtype=torch.float32)


_FLUX_GUIDANCE_PREFIX = "time_text_embed.guidance_embedder."


def with_flux_guidance_embedding(net: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of a Flux transformer with a guidance embedding (``guidance_embeds=True``).

    A transformer that has one (FLUX.1-dev) is copied as it is; otherwise the new
    ``guidance_embedder``'s output layer is zero, so the copy starts exactly as the teacher and the
    embedded scale (FluxPipeline's ``guidance_scale``) is learnt in distillation.
    """
    if bool(net.config.get("guidance_embeds", False)):
        import copy

        return _float32(copy.deepcopy(net))
    student = type(net).from_config(net.config, guidance_embeds=True)
    missing, unexpected = student.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith(_FLUX_GUIDANCE_PREFIX) for k in missing):
        raise ModelLoadError(
            f"could not copy the teacher transformer into the student: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}; the teacher folder's transformer/ may be corrupt"
        )
    with torch.no_grad():
        last = student.time_text_embed.guidance_embedder.linear_2
        last.weight.zero_()
        last.bias.zero_()
    return _float32(student)


def _float32(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` in float32 (cast only when it is not: diffusers warns about casts of modules it keeps in float32)."""
    return net if next(net.parameters()).dtype == torch.float32 else net.to(dtype=torch.float32)


class ConsistencyDenoiser:
    """The consistency function ``f(x_t, t)`` of a student network, in float32.

    * DDPM-family teachers (LCM): ``f = c_skip(t) x_t + c_out(t) x0(net(x_t, t, c, w))``, ``x0`` from the
      network's output in the teacher's prediction type (eps or v), with LCM's boundary scalings
      (``sigma_data = 0.5``, ``timestep_scaling``) on the integer timestep, so ``f(x, 0) = x``.
    * Flow teachers: ``f = x_t - sigma v(x_t, sigma)``, the clean latent of the velocity, which is what
      ``FlowMatchLCMScheduler`` reads from the network; ``f(x, 0) = x`` holds by construction. ``w`` goes
      to the transformer's guidance embedding as the CFG scale ``w + 1`` (FluxPipeline's ``guidance_scale``).

    Args:
        teacher: supplies the conditioning conventions, schedule and prediction type.
        timestep_scaling: ``s`` of the scalings (10 in LCM).
        w_embedding_dim: size of an embedded guidance (full LCM students); ``None``: no embedding.
    """

    def __init__(self, teacher: Teacher, timestep_scaling: float = 10.0, w_embedding_dim: int | None = None):
        self.teacher = teacher
        self.timestep_scaling = float(timestep_scaling)
        self.w_embedding_dim = w_embedding_dim

    def __call__(
        self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        if w is not None and self.w_embedding_dim and self.teacher.schedule.kind != "flow":
            embeds = PromptEmbeds(
                hidden=embeds.hidden,
                pooled=embeds.pooled,
                extra={**embeds.extra, "timestep_cond": guidance_embedding(w, self.w_embedding_dim).to(x_t.device).expand(x_t.shape[0], -1)},
            )
        flow = self.teacher.schedule.kind == "flow"
        guidance = (w + 1.0) if (flow and w is not None) else None
        out = self.teacher.forward(x_t, t, embeds, guidance_embed=guidance, net=net).float()
        x = x_t.float()
        t = t.to(x.device)
        alpha, sigma = self.teacher.schedule.alpha_sigma(t)
        x0 = to_x0(out, x, alpha.to(x.device), sigma.to(x.device), self.teacher.prediction_type)
        if flow:
            return x0
        return consistency_output(x, x0, t, timestep_scaling=self.timestep_scaling)
