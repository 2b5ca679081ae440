"""The CLEAR attention pattern: predicate, dense mask, token permutation and FLOP accounting.

Token layout of the joint sequence (length ``N = T + H*W``)::

    [ T text tokens | H*W image tokens in raster order (row-major over the H x W grid) ]

optionally followed, on the key/value side only, by ``P = (H/f)*(W/f)`` pooled image tokens
(``down_factor = f``), so ``N_kv = N + P``.

Predicate ``M(q, k)``:

* text query (``q < T``): every text and image key; **not** the pooled keys;
* image query at grid position ``(yq, xq)``: every text key, the image keys ``(yk, xk)`` with
  ``(yq - yk)^2 + (xq - xk)^2 < r^2`` (a circle, strict inequality, simply clipped at the
  borders) and every pooled key.

The radius ``r`` is a real number ``>= 1`` (an integer in CLEAR's own settings: 8 / 16 / 32). On the
token lattice only ``r^2`` rounded up matters (:func:`radius_bound`): ``dy^2 + dx^2 < r^2`` holds
exactly when ``dy^2 + dx^2 < ceil(r^2)``, so every kernel compares integers. A non-integer radius
reaches window sizes between integer radii: on an interior query ``r = 2`` keeps 9 image keys,
``r = 2.2`` 13 and ``r = 3`` 25.

Everything here is pure PyTorch / Python; the attention kernels live in :mod:`.backends` and
:mod:`.triton_kernel`.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastgen.errors import ConfigError

__all__ = [
    "validate_clear_config",
    "normalize_radius",
    "radius_bound",
    "window_extent",
    "num_pooled_tokens",
    "clear_mask_predicate",
    "dense_clear_mask",
    "window_count",
    "flop_fraction",
    "tile_permutation",
    "permute_tokens",
    "unpermute_tokens",
    "executed_block_fraction",
    "block_occupancy",
]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _as_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"CLEAR attention: {name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ConfigError(f"CLEAR attention: {name} must be >= {minimum}, got {value}")
    return value


def normalize_radius(radius) -> int | float:
    """A CLEAR window radius as a plain ``int`` (integral values) or ``float``.

    Raises :class:`fastgen.errors.ConfigError` for a non-number, a non-finite value or ``radius < 1``.
    """
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise ConfigError(f"CLEAR attention: radius must be a number of tokens (e.g. 2, 2.2 or 16), got {radius!r}")
    value = float(radius)
    if not math.isfinite(value) or value < 1:
        raise ConfigError(
            f"CLEAR attention: radius must be a finite number >= 1 (a query must at least see its own token), got {radius!r}"
        )
    return int(value) if value.is_integer() else value


def radius_bound(radius) -> int:
    """``ceil(r^2)``: on integer offsets, ``dy^2 + dx^2 < r^2`` exactly when ``dy^2 + dx^2 < radius_bound(r)``.

    ``r^2`` is the float64 product (what ``dy * dy + dx * dx < r * r`` compares against); ``r = 2.2``
    gives 5, an integer ``r`` gives ``r^2``.
    """
    radius = normalize_radius(radius)
    return radius * radius if isinstance(radius, int) else math.ceil(radius * radius)


def window_extent(radius) -> int:
    """The largest ``|dy|`` (or ``|dx|``) inside the window: ``isqrt(ceil(r^2) - 1)`` (``r - 1`` for an integer ``r``)."""
    return math.isqrt(radius_bound(radius) - 1)


def validate_clear_config(height, width, text_len, radius, down_factor=1) -> tuple[int, int, int, int | float, int]:
    """Check a CLEAR configuration and return it as plain numbers (the radius as :func:`normalize_radius`).

    Raises :class:`fastgen.errors.ConfigError` for a non-integer or non-positive grid, a negative
    ``text_len``, ``radius < 1``, a radius larger than the grid (``radius > max(height, width)``:
    the window would cover the whole image, so full attention is the right tool), or a
    ``down_factor`` that does not divide the grid.
    """
    height = _as_int("height", height, 1)
    width = _as_int("width", width, 1)
    text_len = _as_int("text_len", text_len, 0)
    radius = normalize_radius(radius)
    if radius > max(height, width):
        raise ConfigError(
            f"CLEAR attention: radius {radius} is larger than the {height}x{width} token grid: the window "
            "would cover the whole image, use full attention (F.scaled_dot_product_attention) instead"
        )
    down_factor = _as_int("down_factor", down_factor, 1)
    if down_factor >= 2 and (height % down_factor or width % down_factor):
        raise ConfigError(
            f"CLEAR attention: down_factor {down_factor} must divide the {height}x{width} token grid "
            "(pooled KV uses non-overlapping f x f cells); pick a divisor or use down_factor=1"
        )
    return height, width, text_len, radius, down_factor


def num_pooled_tokens(height: int, width: int, down_factor: int = 1) -> int:
    """Number of pooled KV tokens appended for ``down_factor`` (0 when ``down_factor < 2``)."""
    if down_factor < 2:
        return 0
    return (height // down_factor) * (width // down_factor)


# ----------------------------------------------------------------------------------------------
# the predicate
# ----------------------------------------------------------------------------------------------


def clear_mask_predicate(q_idx, kv_idx, *, height, width, text_len, radius, num_pooled=0):
    """``True`` where query ``q_idx`` may attend to key ``kv_idx`` (broadcasting tensors).

    Tensor ops only (no Python branching on values), so the body works as a FlexAttention
    ``mask_mod`` (``lambda b, h, q, kv: clear_mask_predicate(q, kv, ...)``) and on broadcast
    ``arange`` grids for a dense mask. Indices are positions in the joint sequence; keys
    ``N <= kv_idx < N + num_pooled`` are the pooled tokens. ``height``/``width``/``text_len`` may be
    Python ints or 0-d integer tensors, ``radius`` a Python number or 0-d tensor (on integer offsets
    ``< radius * radius`` is the same test as ``< radius_bound(radius)``).
    """
    hw = height * width
    n = text_len + hw
    q_text = q_idx < text_len
    q_img = (q_idx >= text_len) & (q_idx < n)
    kv_text = kv_idx < text_len
    kv_img = (kv_idx >= text_len) & (kv_idx < n)
    kv_pool = (kv_idx >= n) & (kv_idx < n + num_pooled)

    qi = (q_idx - text_len).clamp(min=0)
    ki = (kv_idx - text_len).clamp(min=0)
    dy = qi // width - ki // width
    dx = qi % width - ki % width
    disk = dy * dy + dx * dx < radius * radius

    return (
        (kv_text & (q_text | q_img))
        | (q_text & kv_img)
        | (q_img & kv_img & disk)
        | (q_img & kv_pool)
    )


def dense_clear_mask(height, width, text_len, radius, down_factor=1, device=None) -> torch.Tensor:
    """The CLEAR mask as a dense boolean ``[N, N_kv]`` tensor (``True`` = attend).

    ``N = text_len + height*width``; ``N_kv = N + (height/f)*(width/f)`` with pooled tokens
    (``down_factor = f >= 2``), else ``N``. Memory is ``N * N_kv`` bytes, so this is for tests and
    the ``reference`` backend at moderate sizes.
    """
    height, width, text_len, radius, down_factor = validate_clear_config(height, width, text_len, radius, down_factor)
    n = text_len + height * width
    p = num_pooled_tokens(height, width, down_factor)
    q = torch.arange(n, device=device).unsqueeze(1)
    kv = torch.arange(n + p, device=device).unsqueeze(0)
    return clear_mask_predicate(
        q, kv, height=height, width=width, text_len=text_len, radius=radius, num_pooled=p
    )


# ----------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------


def _disk_offsets(radius) -> list[tuple[int, int]]:
    r2, ext = radius_bound(radius), window_extent(radius)
    out = []
    for dy in range(-ext, ext + 1):
        half = math.isqrt(r2 - 1 - dy * dy)  # largest |dx| with dy^2 + dx^2 <= ceil(r^2) - 1
        out.extend((dy, dx) for dx in range(-half, half + 1))
    return out


def window_count(radius) -> int:
    """Lattice points ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2`` (keys seen by an interior query).

    193 / 793 / 3205 for radius 8 / 16 / 32; 9 / 13 / 25 for radius 2 / 2.2 / 3. 0 below radius 1.
    """
    if not isinstance(radius, bool) and isinstance(radius, numbers.Real) and radius < 1:
        return 0
    return len(_disk_offsets(radius))


def flop_fraction(height, width, text_len, radius, down_factor=1) -> dict:
    """Exact attention-FLOP accounting of the CLEAR pattern versus full attention.

    Counts allowed (query, key) pairs exactly, border clipping included (each allowed pair costs the
    same ``4*D`` FLOPs in QK^T and PV, so the ratio is the FLOP ratio). Returns a dict:

    * ``ideal``: allowed pairs / ``N^2`` (``N = T + H*W``; full attention of the teacher has no
      pooled tokens, so with ``down_factor >= 2`` the numerator includes the pooled pairs and the
      denominator stays ``N^2``);
    * ``reduction``: ``1 - ideal``;
    * ``allowed_pairs``, ``full_pairs``;
    * ``window_tokens``: interior window size (:func:`window_count`);
    * ``mean_image_window``: mean number of image keys per image query (clipped windows);
    * ``interior_estimate``: the border-free estimate ``(T*N + HW*(T + K_r + P)) / N^2``;
    * ``image_row_fraction``: ``(T + K_r + P) / N``, the fraction of one interior image query's row
      (the per-query figure often quoted, e.g. 0.50% for r=16 at 512x512 + 512 text tokens; it
      ignores the dense text rows and the border clipping).
    """
    height, width, text_len, radius, down_factor = validate_clear_config(height, width, text_len, radius, down_factor)
    hw = height * width
    n = text_len + hw
    p = num_pooled_tokens(height, width, down_factor)
    # clipped disk pairs: every offset (dy, dx) occurs (H - |dy|)(W - |dx|) times inside the grid
    image_pairs = sum(
        max(height - abs(dy), 0) * max(width - abs(dx), 0) for dy, dx in _disk_offsets(radius)
    )
    allowed = text_len * n + hw * text_len + image_pairs + hw * p
    full = n * n
    k_r = window_count(radius)
    return {
        "ideal": allowed / full,
        "reduction": 1.0 - allowed / full,
        "allowed_pairs": allowed,
        "full_pairs": full,
        "window_tokens": k_r,
        "mean_image_window": image_pairs / hw,
        "interior_estimate": (text_len * n + hw * (text_len + k_r + p)) / full,
        "image_row_fraction": (text_len + k_r + p) / n,
    }


# ----------------------------------------------------------------------------------------------
# 2D tile permutation of the image tokens
# ----------------------------------------------------------------------------------------------


def _check_tile(tile) -> tuple[int, int]:
    try:
        th, tw = (int(t) for t in tile)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"CLEAR attention: tile must be a pair (rows, cols), got {tile!r}") from exc
    if th < 1 or tw < 1:
        raise ConfigError(f"CLEAR attention: tile sizes must be >= 1, got {tile!r}")
    return th, tw


def tile_permutation(height: int, width: int, tile=(8, 16), device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder the ``height x width`` image tokens into 2D tiles of ``tile = (rows, cols)``.

    Tiles are visited in raster order over the tile grid, tokens in raster order inside a tile;
    grids not divisible by the tile get partial tiles at the right/bottom edges. Returns
    ``(perm, inv)`` (int64, length ``H*W``): position ``i`` of the permuted sequence holds raster
    token ``perm[i]``, and raster token ``j`` sits at permuted position ``inv[j]``. Text tokens are
    not part of it (they stay first, untouched).
    """
    th, tw = _check_tile(tile)
    height, width = int(height), int(width)
    y = torch.arange(height).repeat_interleave(width)
    x = torch.arange(width).repeat(height)
    tiles_w = -(-width // tw)
    key = ((y // th) * tiles_w + x // tw) * (th * tw) + (y % th) * tw + (x % tw)
    perm = torch.argsort(key)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    if device is not None:
        perm, inv = perm.to(device), inv.to(device)
    return perm, inv


def permute_tokens(x: torch.Tensor, text_len: int, perm: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """``x`` (joint sequence along ``dim``) with its image tokens in permuted order (text first, as is).

    Tokens after ``text_len + len(perm)`` (e.g. pooled ones) are kept as they are.
    """
    dim = dim % x.dim()
    hw = perm.numel()
    text = x.narrow(dim, 0, text_len)
    image = x.narrow(dim, text_len, hw).index_select(dim, perm.to(x.device))
    rest_len = x.shape[dim] - text_len - hw
    parts = [text, image]
    if rest_len:
        parts.append(x.narrow(dim, text_len + hw, rest_len))
    return torch.cat(parts, dim=dim)


def unpermute_tokens(x: torch.Tensor, text_len: int, inv: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Inverse of :func:`permute_tokens` (pass the ``inv`` of :func:`tile_permutation`)."""
    return permute_tokens(x, text_len, inv, dim=dim)


# ----------------------------------------------------------------------------------------------
# block-sparse accounting
# ----------------------------------------------------------------------------------------------


def _block_segments(raster_pos: torch.Tensor, width: int, block: int):
    """Cut the image tokens (raster positions, in sequence order) into blocks of ``block`` and
    describe each block as row segments ``(y, x0, x1)`` (padded with empty segments).

    Returns ``seg [nb, S, 3]`` (int64) and ``valid [nb, S]``.
    """
    n = raster_pos.numel()
    nb = -(-n // block)
    pad = nb * block - n
    big = torch.iinfo(torch.int64).max // 4
    pos = torch.cat([raster_pos.long(), torch.full((pad,), big, dtype=torch.int64)]).view(nb, block)
    pos, _ = pos.sort(dim=1)
    real = pos < big
    prev = torch.cat([torch.full((nb, 1), -10, dtype=torch.int64), pos[:, :-1]], dim=1)
    y, x = pos // width, pos % width
    starts = real & ((pos != prev + 1) | (x == 0))  # new run: gap in raster order or a new row
    seg_id = starts.long().cumsum(dim=1) - 1  # segment index of each token inside its block
    s_max = int(starts.sum(dim=1).max().item()) if n else 1
    seg = torch.zeros(nb, s_max, 3, dtype=torch.int64)
    valid = torch.zeros(nb, s_max, dtype=torch.bool)
    rows = torch.arange(nb).unsqueeze(1).expand(nb, block)
    r_idx, s_idx = rows[real], seg_id[real]
    seg[r_idx, s_idx, 0] = y[real]
    # x0 = min x of the run, x1 = max x: scatter with amin/amax
    flat = r_idx * s_max + s_idx
    x0 = torch.full((nb * s_max,), big, dtype=torch.int64).scatter_reduce(0, flat, x[real], "amin")
    x1 = torch.full((nb * s_max,), -1, dtype=torch.int64).scatter_reduce(0, flat, x[real], "amax")
    seg[..., 1] = x0.view(nb, s_max)
    seg[..., 2] = x1.view(nb, s_max)
    valid[r_idx, s_idx] = True
    return seg, valid


def block_occupancy(height, width, text_len, radius, block=128, order="raster", tile=(8, 16), down_factor=1) -> torch.Tensor:
    """Which ``block x block`` tiles of the ``[N, N_kv]`` CLEAR mask hold at least one allowed element.

    ``order="raster"`` uses the raster image-token order, ``"tiled"`` the :func:`tile_permutation`
    order with ``tile``. Exact (segment-to-segment distances, no dense mask), so it scales to
    8K-image grids. Returns a bool tensor ``[cdiv(N, block), cdiv(N_kv, block)]``.
    """
    height, width, text_len, radius, down_factor = validate_clear_config(height, width, text_len, radius, down_factor)
    if order not in ("raster", "tiled"):
        raise ConfigError(f"CLEAR attention: order must be 'raster' or 'tiled', got {order!r}")
    block = _as_int("block", block, 1)
    hw = height * width
    n = text_len + hw
    p = num_pooled_tokens(height, width, down_factor)
    n_kv = n + p
    nbq, nbk = -(-n // block), -(-n_kv // block)

    def spans(lo, hi, nblocks):  # per block: does it intersect [lo, hi)?
        starts = torch.arange(nblocks) * block
        return (starts < hi) & (starts + block > lo) & (lo < hi)

    q_has_text = spans(0, text_len, nbq)
    q_has_img = spans(text_len, n, nbq)
    k_has_text = spans(0, text_len, nbk)
    k_has_img = spans(text_len, n, nbk)
    k_has_pool = spans(n, n_kv, nbk)

    occ = k_has_text.unsqueeze(0) & torch.ones(nbq, 1, dtype=torch.bool)
    occ |= q_has_text.unsqueeze(1) & k_has_img.unsqueeze(0)
    occ |= q_has_img.unsqueeze(1) & k_has_pool.unsqueeze(0)

    # image-image part: blocks are cut over the whole sequence, so the image tokens start at
    # offset text_len inside block text_len // block. Pad the front with dummies to align.
    if order == "raster":
        raster = torch.arange(hw)
    else:
        raster, _ = tile_permutation(height, width, tile)
    lead = text_len % block
    first = text_len // block
    big = torch.iinfo(torch.int64).max // 4
    aligned = torch.cat([torch.full((lead,), big, dtype=torch.int64), raster.long()])
    seg, valid = _block_segments(aligned, width, block)
    nbi = seg.shape[0]
    r2 = radius_bound(radius)
    img_occ = torch.zeros(nbi, nbi, dtype=torch.bool)
    chunk = max(1, 2_000_000 // max(1, nbi * seg.shape[1] * seg.shape[1]))
    for c0 in range(0, nbi, chunk):
        a = seg[c0 : c0 + chunk, None, :, None, :]  # [c, 1, S, 1, 3]
        b = seg[None, :, None, :, :]  # [1, nbi, 1, S, 3]
        dy = (a[..., 0] - b[..., 0]).abs()
        gap = torch.clamp(torch.maximum(b[..., 1] - a[..., 2], a[..., 1] - b[..., 2]), min=0)
        hit = (dy * dy + gap * gap < r2) & valid[c0 : c0 + chunk, None, :, None] & valid[None, :, None, :]
        img_occ[c0 : c0 + chunk] = hit.flatten(2).any(dim=2)
    occ[first : first + nbi, first : first + nbi] |= img_occ
    return occ


def executed_block_fraction(height, width, text_len, radius, block=128, order="raster", tile=(8, 16), down_factor=1) -> float:
    """What a ``block x block`` block-sparse kernel executes, as a fraction of full attention.

    ``(number of blocks with at least one allowed element) * block^2 / N^2`` with
    ``N = T + H*W`` (the full-attention cost; pooled key blocks count in the numerator). See
    :func:`block_occupancy` for ``order`` / ``tile``.
    """
    occ = block_occupancy(height, width, text_len, radius, block=block, order=order, tile=tile, down_factor=down_factor)
    n = int(text_len) + int(height) * int(width)
    return int(occ.sum().item()) * int(block) ** 2 / (n * n)


def window_info(height: int, width: int, text_len: int, radius: int | float, down_factor: int = 1) -> dict:
    """Window size and attention-FLOP fraction of a CLEAR pattern on a ``height x width`` token grid
    (what exports and reports state about a CLEAR model).

    ``window_tokens`` / ``window_fraction`` count the image keys of an interior window; ``pooled_tokens``
    the pooled KV tokens every image query also sees (``down_factor >= 2``); ``image_query_keys`` /
    ``image_query_key_fraction`` the two together, as a share of the image tokens (text keys excluded).
    """
    ff = flop_fraction(height, width, text_len, radius, down_factor)
    k = window_count(radius)
    p = num_pooled_tokens(height, width, down_factor)
    hw = height * width
    return {
        "grid": [height, width],
        "image_tokens": hw,
        "text_tokens": text_len,
        "window_tokens": k,
        "window_fraction": round(k / hw, 6),
        "pooled_tokens": p,
        "image_query_keys": k + p,
        "image_query_key_fraction": round((k + p) / hw, 6),
        "mean_image_window": round(float(ff["mean_image_window"]), 3),
        "attention_flop_fraction": round(float(ff["ideal"]), 6),
    }
