"""Attention backends of diffusers UNets (SD1.x/2.x, SDXL): PyTorch SDPA or xFormers.

:func:`set_unet_attention` swaps every attention processor of a UNet in place:

* ``"sdpa"``: ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``; ``AttnAddedKVProcessor2_0``
  for added-KV attention blocks). Works everywhere.
* ``"xformers"``: ``XFormersAttnProcessor`` (``XFormersAttnAddedKVProcessor``) with xFormers'
  ``memory_efficient_attention``. Needs the ``xformers`` package and a CUDA device; otherwise
  :class:`~fastgen.attention.BackendUnavailable` names the fallback ``'sdpa'``.
"""

from __future__ import annotations

import torch

from fastgen.errors import ConfigError

from .backends import BackendUnavailable

__all__ = ["UNET_BACKENDS", "set_unet_attention"]

UNET_BACKENDS = ("sdpa", "xformers")


def _xformers_problem(device: torch.device) -> str | None:
    try:
        from diffusers.utils import is_xformers_available
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return "diffusers is not importable"
    if not is_xformers_available():
        return "the xformers package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device is available (xFormers kernels run on CUDA only)"
    if device.type != "cuda":
        return f"the UNet is on {device}, not on a CUDA device (xFormers kernels run on CUDA only)"
    return None


def set_unet_attention(unet: torch.nn.Module, backend: str = "sdpa") -> list[str]:
    """Use ``backend`` (``"sdpa"`` or ``"xformers"``) for every attention block of ``unet``.

    Returns the processor names that were set.

    Raises:
        ConfigError: unknown backend, or a model without diffusers attention processors.
        BackendUnavailable: ``"xformers"`` without the package or without CUDA (use ``"sdpa"``).
    """
    if backend not in UNET_BACKENDS:
        raise ConfigError(f"unknown UNet attention backend {backend!r}; choose one of {UNET_BACKENDS}")
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise ConfigError(
            f"{type(unet).__name__} has no diffusers attention processors; set_unet_attention takes a diffusers "
            "UNet (UNet2DConditionModel and friends)"
        )
    from diffusers.models import attention_processor as ap

    current = unet.attn_processors
    if not current:
        raise ConfigError(f"{type(unet).__name__} has no attention blocks to configure")
    if backend == "xformers":
        try:
            device = next(unet.parameters()).device
        except StopIteration:  # pragma: no cover
            device = torch.device("cpu")
        problem = _xformers_problem(device)
        if problem is not None:
            raise BackendUnavailable(
                f"UNet attention backend 'xformers' is unavailable: {problem}; use backend='sdpa' "
                "(PyTorch scaled_dot_product_attention, the fallback that runs everywhere)"
            )
        plain, added = ap.XFormersAttnProcessor, ap.XFormersAttnAddedKVProcessor
    else:
        plain, added = ap.AttnProcessor2_0, ap.AttnAddedKVProcessor2_0
    added_kinds = tuple(ap.ADDED_KV_ATTENTION_PROCESSORS)
    processors = {name: (added() if isinstance(proc, added_kinds) else plain()) for name, proc in current.items()}
    unet.set_attn_processor(processors)
    return list(current)
