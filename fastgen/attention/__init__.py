"""CLEAR-style local attention for joint text/image sequences (mask, FLOP accounting, kernels).

See :func:`clear_attention` for the entry point and :mod:`fastgen.attention.mask` for the pattern.
The diffusers integrations (:mod:`.flux`: CLEAR processors for Flux transformers; :mod:`.unet`:
SDPA / xFormers for UNets) import diffusers and are loaded lazily on first access.
"""

import importlib as _importlib

from .backends import (
    BACKENDS,
    BackendUnavailable,
    clear_attention,
    clear_block_mask,
    clear_block_mask_cache_clear,
    clear_mask_mod,
    pool_kv,
    triton_executed_fraction,
)
from .mask import (
    block_occupancy,
    clear_mask_predicate,
    dense_clear_mask,
    executed_block_fraction,
    flop_fraction,
    normalize_radius,
    num_pooled_tokens,
    permute_tokens,
    radius_bound,
    tile_permutation,
    unpermute_tokens,
    validate_clear_config,
    window_count,
    window_extent,
    window_info,
)

_LAZY = {
    "ClearFluxAttnProcessor": "flux",
    "ClearFluxTransformer2DModel": "flux",
    "RecordingFluxAttnProcessor": "flux",
    "apply_clear": "flux",
    "clear_grid": "flux",
    "UNET_BACKENDS": "unet",
    "set_unet_attention": "unet",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ClearFluxAttnProcessor",
    "ClearFluxTransformer2DModel",
    "RecordingFluxAttnProcessor",
    "UNET_BACKENDS",
    "apply_clear",
    "clear_grid",
    "set_unet_attention",
    "BACKENDS",
    "BackendUnavailable",
    "block_occupancy",
    "clear_attention",
    "clear_block_mask",
    "clear_block_mask_cache_clear",
    "clear_mask_mod",
    "clear_mask_predicate",
    "dense_clear_mask",
    "executed_block_fraction",
    "flop_fraction",
    "num_pooled_tokens",
    "permute_tokens",
    "pool_kv",
    "tile_permutation",
    "triton_executed_fraction",
    "unpermute_tokens",
    "validate_clear_config",
    "window_count",
    "window_extent",
    "normalize_radius",
    "radius_bound",
    "window_info",
]
