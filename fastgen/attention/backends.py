"""CLEAR attention: one entry point, :func:`clear_attention`, over three backends.

* ``reference``: pooled KV appended, then ``F.scaled_dot_product_attention`` with the dense boolean
  mask of :func:`~fastgen.attention.mask.dense_clear_mask` (cached, 4 entries). Exact, differentiable
  on every device (including ``spatial_weight``); memory ``N * N_kv`` bytes for the mask, so for
  moderate ``N``.
  This is the backend for training on CPU.
* ``flex``: ``torch.nn.attention.flex_attention`` with a cached ``BlockMask`` (``create_block_mask``
  over the CLEAR ``mask_mod``), eager or ``torch.compile``-d (``compiled=True``, the default),
  optionally with the image tokens permuted into 2D tiles (``permute=True``) so that the 128-token
  blocks are compact squares of the grid instead of row slices (fewer partially used blocks).
* ``triton``: the fused band-limited forward kernel of :mod:`.triton_kernel` (forward only). Native
  on CUDA; on CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
* ``auto``: on CUDA, ``triton`` for inference (no gradient needed and no ``permute``) and ``flex``
  otherwise; on a CPU, ``reference`` when a gradient is needed (FlexAttention has no CPU backward) and
  otherwise the exact backend measured fastest for the nearest shape (:mod:`.crossover`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

from fastgen.errors import ConfigError, FastgenError

from . import triton_kernel as _tk
from .mask import (
    _check_tile,
    clear_mask_predicate,
    dense_clear_mask,
    num_pooled_tokens,
    permute_tokens,
    tile_permutation,
    unpermute_tokens,
    validate_clear_config,
)

__all__ = [
    "BackendUnavailable",
    "BACKENDS",
    "clear_attention",
    "pool_kv",
    "clear_block_mask",
    "clear_mask_mod",
    "clear_block_mask_cache_clear",
    "triton_executed_fraction",
]

BACKENDS = ("reference", "flex", "triton", "auto")
_LOCK = threading.Lock()  # guards the mask caches


class BackendUnavailable(FastgenError, RuntimeError):
    """The requested attention backend cannot run here; the message names the fallback."""


# ----------------------------------------------------------------------------------------------
# pooled KV
# ----------------------------------------------------------------------------------------------


def pool_kv(k, v, *, height, width, text_len, down_factor, spatial_weight=None):
    """Pool the image keys/values over non-overlapping ``f x f`` cells.

    ``k``/``v``: ``[B, heads, T + H*W, D]`` (post-RoPE, as given to attention). ``spatial_weight``:
    ``(f, f)`` (any shape with ``f*f`` elements, e.g. CLEAR's ``1x1x1xfx1xfx1``) with
    ``pooled = sum_{dy,dx} w[dy, dx] * k[y*f + dy, x*f + dx]``; ``None`` means ``1/f^2`` (average
    pooling, the initial value of the learnable weight). Returns ``(pk, pv)`` of shape
    ``[B, heads, (H/f)*(W/f), D]`` in the dtype of ``k``/``v``; differentiable.
    """
    f = int(down_factor)
    bsz, heads, _, d = k.shape
    if spatial_weight is None:
        w = torch.full((f, f), 1.0 / (f * f), dtype=k.dtype, device=k.device)
    else:
        if spatial_weight.numel() != f * f:
            raise ConfigError(
                f"CLEAR attention: spatial_weight must have {f}x{f} = {f * f} elements for down_factor={f}, "
                f"got shape {tuple(spatial_weight.shape)}"
            )
        w = spatial_weight.reshape(f, f)
    hp, wp = height // f, width // f

    def pool(x):
        img = x[:, :, text_len : text_len + height * width, :].reshape(bsz, heads, hp, f, wp, f, d)
        ww = w.to(device=x.device, dtype=x.dtype).view(1, 1, 1, f, 1, f, 1)
        return (img * ww).sum(dim=(3, 5)).reshape(bsz, heads, hp * wp, d)

    return pool(k), pool(v)


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _check_qkv(q, k, v, n_expected):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ConfigError(f"CLEAR attention: {name} must be a 4-D tensor [batch, heads, tokens, dim]")
    if q.shape != k.shape[:2] + q.shape[2:] or k.shape != v.shape:
        raise ConfigError(
            f"CLEAR attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share "
            "[batch, heads, tokens, dim] (self-attention over the joint sequence)"
        )
    if q.shape[2] != n_expected:
        raise ConfigError(
            f"CLEAR attention: sequence length {q.shape[2]} != text_len + height*width = {n_expected}"
        )
    if not (q.device == k.device == v.device):
        raise ConfigError("CLEAR attention: q, k and v must be on the same device")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------


_DENSE_MASKS: OrderedDict = OrderedDict()
_DENSE_MASK_CACHE_SIZE = 4  # N * N_kv bytes each: keep only a few


def _dense_mask_cached(height, width, text_len, radius, down_factor, device):
    if torch.compiler.is_compiling():  # a constant of the graph: no cache, no lock
        return dense_clear_mask(height, width, text_len, radius, down_factor, device=device)
    key = (height, width, text_len, radius, down_factor, str(device))
    with _LOCK:
        if key in _DENSE_MASKS:
            _DENSE_MASKS.move_to_end(key)
            return _DENSE_MASKS[key]
    mask = dense_clear_mask(height, width, text_len, radius, down_factor, device=device)
    with _LOCK:
        _DENSE_MASKS[key] = mask
        while len(_DENSE_MASKS) > _DENSE_MASK_CACHE_SIZE:
            _DENSE_MASKS.popitem(last=False)
    return mask


def _reference(q, k, v, pk, pv, height, width, text_len, radius, down_factor, scale):
    if pk is not None:
        k = torch.cat([k, pk], dim=2)
        v = torch.cat([v, pv], dim=2)
    mask = _dense_mask_cached(height, width, text_len, radius, down_factor, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------------------------
# flex
# ----------------------------------------------------------------------------------------------

_BLOCK_MASKS: OrderedDict = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 16
_COMPILED_FLEX = None
# one compiled graph per shape/mask; the benchmark alone sweeps more than dynamo's default of 8
_RECOMPILE_LIMIT = 64


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as fa
    except Exception as exc:  # pragma: no cover - torch < 2.5
        raise BackendUnavailable(
            f"CLEAR attention: torch.nn.attention.flex_attention is unavailable ({exc}); "
            "use backend='reference' instead"
        ) from exc
    return fa


@contextlib.contextmanager
def _dynamo_limits():
    import torch._dynamo.config as dcfg

    limit = max(int(getattr(dcfg, "recompile_limit", 8)), _RECOMPILE_LIMIT)
    with dcfg.patch(recompile_limit=limit):
        yield


def clear_mask_mod(height, width, text_len, radius, down_factor=1, lookup=None):
    """The CLEAR predicate as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``.

    ``lookup`` (int64, length ``N_kv``) maps sequence positions to raster positions (for
    permuted tokens); ``None`` = raster order.
    """
    num_pooled = num_pooled_tokens(height, width, down_factor)

    if lookup is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return clear_mask_predicate(
                q_idx, kv_idx, height=height, width=width, text_len=text_len, radius=radius, num_pooled=num_pooled
            )

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return clear_mask_predicate(
                lookup[q_idx], lookup[kv_idx],
                height=height, width=width, text_len=text_len, radius=radius, num_pooled=num_pooled,
            )

    return mask_mod


def _position_lookup(height, width, text_len, num_pooled, tile, device):
    """Sequence position -> raster position for the tile-permuted order (text/pooled unchanged)."""
    perm, _ = tile_permutation(height, width, tile)
    hw = height * width
    lookup = torch.cat(
        [torch.arange(text_len), text_len + perm, torch.arange(text_len + hw, text_len + hw + num_pooled)]
    )
    return lookup.to(device)


def _normalize_block(block_size):
    if block_size is None:
        return 128
    if isinstance(block_size, int):
        return int(block_size)
    bq, bk = (int(b) for b in block_size)
    return (bq, bk) if bq != bk else bq


def clear_block_mask(height, width, text_len, radius, down_factor=1, *, device="cpu", permute=False,
                     tile=(8, 16), block_size=128, compile_mask=None):
    """The FlexAttention ``BlockMask`` of the CLEAR pattern, cached (LRU, 16 entries).

    The key is ``(height, width, text_len, radius, down_factor, permute, tile, device, block_size)``.
    ``compile_mask=None`` builds it with ``create_block_mask(..., _compile=True)`` (compiled mask
    construction: no dense ``N x N_kv`` mask in memory) once the mask has more than 2^24 elements
    and eagerly below (a few ms; no compile cost); ``True``/``False`` force either.
    """
    height, width, text_len, radius, down_factor = validate_clear_config(height, width, text_len, radius, down_factor)
    tile = _check_tile(tile)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    block = _normalize_block(block_size)
    key = (height, width, text_len, radius, down_factor, bool(permute), tile if permute else None, str(device), block)
    with _LOCK:
        if key in _BLOCK_MASKS:
            _BLOCK_MASKS.move_to_end(key)
            return _BLOCK_MASKS[key]
    fa = _flex_module()
    n = text_len + height * width
    p = num_pooled_tokens(height, width, down_factor)
    lookup = _position_lookup(height, width, text_len, p, tile, device) if permute else None
    mask_mod = clear_mask_mod(height, width, text_len, radius, down_factor, lookup=lookup)
    if compile_mask is None:
        compile_mask = n * (n + p) > (1 << 24)
    kwargs = {"BLOCK_SIZE": block}
    if compile_mask and "_compile" in inspect.signature(fa.create_block_mask).parameters:
        kwargs["_compile"] = True
    with warnings.catch_warnings(), (_dynamo_limits() if compile_mask else contextlib.nullcontext()):
        warnings.simplefilter("ignore", DeprecationWarning)  # "_compile" is deprecated in favour of compile()
        if compile_mask and "_compile" not in kwargs:
            bm = torch.compile(fa.create_block_mask)(mask_mod, None, None, n, n + p, device, block)
        else:
            bm = fa.create_block_mask(mask_mod, None, None, n, n + p, device=device, **kwargs)
    with _LOCK:
        _BLOCK_MASKS[key] = bm
        while len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
            _BLOCK_MASKS.popitem(last=False)
    return bm


def clear_block_mask_cache_clear():
    """Drop the cached BlockMasks and dense reference masks."""
    with _LOCK:
        _BLOCK_MASKS.clear()
        _DENSE_MASKS.clear()


def _compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        fa = _flex_module()
        _COMPILED_FLEX = torch.compile(fa.flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _flex(q, k, v, pk, pv, height, width, text_len, radius, down_factor, scale, permute, tile, compiled,
          block_size, compile_mask):
    if q.device.type == "cpu" and _needs_grad(q, k, v, pk, pv):
        raise ConfigError(
            "CLEAR attention: FlexAttention has no backward pass on CPU; use backend='reference' for "
            "training on CPU (or run flex under torch.no_grad() / on CUDA)"
        )
    if q.device.type == "cpu":
        # no gradient is needed (checked above), but CPU flex refuses any input with requires_grad
        q, k, v = q.detach(), k.detach(), v.detach()
        pk = pk.detach() if pk is not None else None
        pv = pv.detach() if pv is not None else None
    fa = _flex_module()
    if permute:
        perm, inv = tile_permutation(height, width, tile, device=q.device)
        q, k, v = (permute_tokens(t, text_len, perm) for t in (q, k, v))
    if pk is not None:
        k = torch.cat([k, pk], dim=2)
        v = torch.cat([v, pv], dim=2)
    bm = clear_block_mask(height, width, text_len, radius, down_factor, device=q.device, permute=permute,
                          tile=tile, block_size=block_size, compile_mask=compile_mask)
    if compiled:
        with _dynamo_limits():
            out = _compiled_flex()(q, k, v, block_mask=bm, scale=scale)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # eager flex warns that it is unfused
            out = fa.flex_attention(q, k, v, block_mask=bm, scale=scale)
    if permute:
        out = unpermute_tokens(out, text_len, inv)
    return out


# ----------------------------------------------------------------------------------------------
# triton
# ----------------------------------------------------------------------------------------------


def _triton_available(device=None) -> bool:
    """Whether the triton backend can run for tensors on ``device``.

    Needs an importable triton and either a CUDA device or ``TRITON_INTERPRET=1`` (the CPU
    interpreter; slow, meant for tests).
    """
    if not _tk.triton_importable():
        return False
    if _tk.interpret_requested():
        return True
    device = torch.device(device) if device is not None else None
    return device is not None and device.type == "cuda" and torch.cuda.is_available()


def _triton_unavailable_message(device) -> str:
    if not _tk.triton_importable():
        why = "triton is not installed/importable"
    else:
        why = f"tensors are on {device} and TRITON_INTERPRET is not set (the kernel needs CUDA or Triton's interpreter)"
    return (
        f"CLEAR attention: backend='triton' is unavailable: {why}; use backend='flex' "
        "(FlexAttention, compiled) or backend='reference' (SDPA with a dense mask) instead"
    )


def _triton(q, k, v, pk, pv, height, width, text_len, radius, scale, block_size, kernel_options):
    if not _triton_available(q.device):
        raise BackendUnavailable(_triton_unavailable_message(q.device))
    if _needs_grad(q, k, v, pk, pv):
        raise ConfigError(
            "CLEAR attention: the triton backend is forward-only (no backward); use backend='flex' "
            "(CUDA) or backend='reference' for training, or call it under torch.no_grad()"
        )
    supported = (torch.float32, torch.float16, torch.bfloat16)
    if q.dtype not in supported:
        raise ConfigError(f"CLEAR attention: the triton backend supports {supported}, got {q.dtype}")
    interpret = _tk.interpret_requested()
    out_dtype = q.dtype
    if interpret and q.dtype == torch.bfloat16:
        # Triton's interpreter multiplies raw bf16 bit patterns in tl.dot: compute in fp32 there
        q, k, v = q.float(), k.float(), v.float()
        pk = pk.float() if pk is not None else None
        pv = pv.float() if pv is not None else None
    elif k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if pk is not None:
        pk, pv = pk.to(q.dtype), pv.to(q.dtype)
    d = q.shape[-1]
    bm, bn, warps, stages = _tk.default_blocks(d, interpret)
    if block_size is not None:
        bm, bn = (block_size, block_size) if isinstance(block_size, int) else (int(block_size[0]), int(block_size[1]))
    for b_ in (bm, bn):
        if b_ < 16 or b_ & (b_ - 1):
            raise ConfigError(f"CLEAR attention: triton block sizes must be powers of two >= 16, got {block_size!r}")
    opts = dict(kernel_options or {})
    warps = int(opts.pop("num_warps", warps))
    stages = int(opts.pop("num_stages", stages))
    skip = opts.pop("skip_blocks", None)
    if skip is None:
        skip = width > bm  # bounding-box skipping pays only when a grid row is longer than a query block
    if opts:
        raise ConfigError(f"CLEAR attention: unknown triton kernel_options {sorted(opts)}")
    out = _tk.launch_clear_forward(
        q, k, v, pk, pv, height=height, width=width, text_len=text_len, radius=radius, scale=scale,
        block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, skip_blocks=skip, interpret=interpret,
    )
    return out.to(out_dtype)


def triton_executed_fraction(height, width, text_len, radius, down_factor=1, *, head_dim=128, block_size=None,
                             interpret=False, skip_blocks=None) -> dict:
    """KV tiles the triton kernel visits, ``visited / total`` (Python replica of its schedule).

    ``total`` is what the same tiling would run for dense attention over ``T + HW + P`` keys; also
    returns ``element_fraction = visited * BLOCK_M * BLOCK_N / N^2`` (comparable to
    :func:`~fastgen.attention.mask.executed_block_fraction`).
    """
    height, width, text_len, radius, down_factor = validate_clear_config(height, width, text_len, radius, down_factor)
    bm, bn, _, _ = _tk.default_blocks(head_dim, interpret)
    if block_size is not None:
        bm, bn = (block_size, block_size) if isinstance(block_size, int) else (int(block_size[0]), int(block_size[1]))
    if skip_blocks is None:
        skip_blocks = width > bm
    n = text_len + height * width
    res = _tk.band_visits(n, text_len, height, width, radius, num_pooled_tokens(height, width, down_factor),
                          bm, bn, skip_blocks)
    res["element_fraction"] = res["visited"] * bm * bn / (n * n)
    res["skip_blocks"] = bool(skip_blocks)
    return res


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def _resolve_auto(q, k, v, spatial_weight, permute, height, width, text_len, radius):
    """``(backend, permute)`` of ``auto``: on CUDA triton for inference, flex otherwise; on other devices the
    fastest exact backend measured for the nearest shape (:func:`.crossover.pick_cpu_backend`)."""
    if q.device.type == "cuda":
        if not permute and not _needs_grad(q, k, v, spatial_weight) and _triton_available(q.device):
            return "triton", permute
        return "flex", permute
    from .crossover import pick_cpu_backend

    backend, tiled = pick_cpu_backend(height, width, text_len, radius, _needs_grad(q, k, v, spatial_weight))
    return backend, (permute or tiled) if backend == "flex" else permute


def clear_attention(q, k, v, *, height, width, text_len, radius, down_factor=1, spatial_weight=None,
                    backend="reference", scale=None, permute=False, tile=(8, 16), compiled=True,
                    block_size=None, kernel_options=None, compile_mask=None):
    """CLEAR attention over the joint ``[text | image]`` sequence.

    Args:
        q, k, v: ``[B, heads, N, D]`` with ``N = text_len + height * width`` (image tokens in raster
            order, post-RoPE).
        height, width: image token grid; text_len: number of leading text tokens; radius: window
            radius ``r`` (image keys with ``dy^2 + dx^2 < r^2``).
        down_factor: ``f >= 2`` appends ``(H/f)*(W/f)`` pooled image KV tokens (seen by image
            queries only) weighted by ``spatial_weight`` (``(f, f)``; ``None`` = average pooling).
        backend: ``"reference" | "flex" | "triton" | "auto"`` (see the module docstring).
        scale: softmax scale, default ``1/sqrt(D)``.
        permute: flex only: run on the image tokens permuted into 2D tiles of ``tile = (rows, cols)``
            (the output is returned in raster order). The reference backend ignores it (same math);
            the triton kernel walks raster rows and rejects it.
        compiled: flex only: ``torch.compile``-d flex_attention (cached, ``dynamic=False``; one compile
            per shape) instead of the eager, unfused path.
        block_size: flex: ``BLOCK_SIZE`` of the BlockMask (default 128); triton: ``BLOCK_M``/``BLOCK_N``
            (int or pair, powers of two >= 16; default 128x64 on GPU, 32x32 in the interpreter).
        kernel_options: triton only: ``num_warps``, ``num_stages``, ``skip_blocks``.
        compile_mask: flex only: see :func:`clear_block_mask`.

    Returns the attention output ``[B, heads, N, D]`` in raster order.
    """
    height, width, text_len, radius, down_factor = validate_clear_config(height, width, text_len, radius, down_factor)
    if backend not in BACKENDS:
        raise ConfigError(f"CLEAR attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    _check_qkv(q, k, v, text_len + height * width)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "auto":
        backend, permute = _resolve_auto(q, k, v, spatial_weight, permute, height, width, text_len, radius)
    if backend == "triton" and permute:
        raise ConfigError(
            "CLEAR attention: permute=True is not supported by the triton backend (its KV loop walks raster "
            "rows of the grid); use backend='flex' for tile-permuted tokens"
        )
    pk = pv = None
    if down_factor >= 2:
        pk, pv = pool_kv(k, v, height=height, width=width, text_len=text_len, down_factor=down_factor,
                         spatial_weight=spatial_weight)
    elif spatial_weight is not None:
        raise ConfigError("CLEAR attention: spatial_weight is only used with down_factor >= 2")
    if backend == "reference":
        return _reference(q, k, v, pk, pv, height, width, text_len, radius, down_factor, scale)
    if backend == "flex":
        return _flex(q, k, v, pk, pv, height, width, text_len, radius, down_factor, scale, permute, tile,
                     compiled, block_size, compile_mask)
    return _triton(q, k, v, pk, pv, height, width, text_len, radius, scale, block_size, kernel_options)
