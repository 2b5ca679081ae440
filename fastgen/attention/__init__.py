"""CLEAR-style local attention for joint text/image sequences (mask, FLOP accounting, kernels).

See :func:`clear_attention` for the entry point and :mod:`fastgen.attention.mask` for the pattern.
"""

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
    num_pooled_tokens,
    permute_tokens,
    tile_permutation,
    unpermute_tokens,
    validate_clear_config,
    window_count,
)

__all__ = [
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
]
