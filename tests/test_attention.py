"""CLEAR attention: the mask, FLOP accounting, token permutation and the three backends.

The triton kernel runs in Triton's CPU interpreter: the backend reads ``TRITON_INTERPRET`` when it
is called (and builds the interpreted or the native kernel then), so the tests that need it set the
variable with ``monkeypatch.setenv`` and every other test runs without it.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.attention import (
    BackendUnavailable,
    block_occupancy,
    clear_attention,
    clear_block_mask,
    clear_mask_predicate,
    dense_clear_mask,
    executed_block_fraction,
    flop_fraction,
    normalize_radius,
    permute_tokens,
    pool_kv,
    radius_bound,
    tile_permutation,
    triton_executed_fraction,
    window_extent,
    unpermute_tokens,
    window_count,
)
from fastgen.attention import backends as backends_mod
from fastgen.attention import triton_kernel as tk
from fastgen.errors import ConfigError, FastgenError

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def brute_mask(height, width, text_len, radius, down_factor=1):
    """The CLEAR definition, one (query, key) pair at a time."""
    n = text_len + height * width
    p = (height // down_factor) * (width // down_factor) if down_factor >= 2 else 0
    m = torch.zeros(n, n + p, dtype=torch.bool)
    for q in range(n):
        for k in range(n + p):
            if q < text_len:  # text query: all text + image, no pooled
                ok = k < n
            elif k < text_len or k >= n:  # image query: all text, all pooled
                ok = True
            else:
                yq, xq = divmod(q - text_len, width)
                yk, xk = divmod(k - text_len, width)
                ok = (yq - yk) ** 2 + (xq - xk) ** 2 < radius**2
            m[q, k] = ok
    return m


def brute_pool(x, height, width, text_len, f, w):
    b, h, _, d = x.shape
    out = torch.zeros(b, h, (height // f) * (width // f), d, dtype=x.dtype)
    for py in range(height // f):
        for px in range(width // f):
            acc = 0
            for dy in range(f):
                for dx in range(f):
                    acc = acc + w[dy, dx] * x[:, :, text_len + (py * f + dy) * width + px * f + dx]
            out[:, :, py * (width // f) + px] = acc
    return out


def naive_attention(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def qkv(b, h, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))


def reference(q, k, v, **kw):
    return clear_attention(q.float(), k.float(), v.float(), backend="reference", **kw)


# ----------------------------------------------------------------------------------------------
# mask, counts, permutation
# ----------------------------------------------------------------------------------------------

GRIDS = [
    # height, width, text_len, radius, down_factor
    (5, 7, 0, 1, 1),
    (5, 7, 3, 2, 1),
    (5, 7, 3, 3, 1),
    (5, 7, 0, 4, 1),
    (7, 5, 3, 4, 1),
    (4, 6, 3, 2, 2),
    (6, 6, 0, 3, 3),
    (5, 7, 3, 2.2, 1),  # non-integer radii: windows between the integer ones
    (7, 5, 0, 1.5, 1),
    (6, 6, 2, 2.9, 2),
]


@pytest.mark.parametrize("height,width,text_len,radius,f", GRIDS)
def test_predicate_matches_bruteforce(height, width, text_len, radius, f):
    expected = brute_mask(height, width, text_len, radius, f)
    assert torch.equal(dense_clear_mask(height, width, text_len, radius, f), expected)
    # the predicate itself on scattered index tensors (mask_mod-style call with 0-d/1-d inputs)
    n_kv = expected.shape[1]
    p = n_kv - (text_len + height * width)
    q_idx = torch.randint(0, expected.shape[0], (200,))
    kv_idx = torch.randint(0, n_kv, (200,))
    got = clear_mask_predicate(q_idx, kv_idx, height=height, width=width, text_len=text_len, radius=radius, num_pooled=p)
    assert torch.equal(got, expected[q_idx, kv_idx])


def test_window_count():
    assert [window_count(r) for r in (8, 16, 32)] == [193, 793, 3205]
    assert [window_count(r) for r in (2, 2.2, 2.25, 3)] == [9, 13, 21, 25]
    for r in [*range(1, 7), 1.01, 1.5, 2.2, 2.24, 2.237, 3.5, 4.99, 7.3]:
        e = math.ceil(r)
        brute = sum(1 for dy in range(-e, e + 1) for dx in range(-e, e + 1) if dy * dy + dx * dx < r * r)
        assert window_count(r) == brute, r
        assert radius_bound(r) == min(d for d in range(1, 100) if d >= r * r)
        assert window_extent(r) == max(dy for dy in range(e + 1) if dy * dy < r * r)


def test_radius_normalisation():
    assert normalize_radius(2.0) == 2 and type(normalize_radius(2.0)) is int
    assert normalize_radius(2.2) == 2.2 and normalize_radius(3) == 3
    for bad in (0.5, 0, -2, float("nan"), float("inf"), "2", True, None):
        with pytest.raises(ConfigError, match="radius"):
            normalize_radius(bad)


@pytest.mark.parametrize("height,width,text_len,radius,f", GRIDS + [(8, 8, 4, 8, 2)])
def test_flop_fraction_matches_count(height, width, text_len, radius, f):
    m = brute_mask(height, width, text_len, radius, f)
    n = text_len + height * width
    ff = flop_fraction(height, width, text_len, radius, f)
    assert ff["allowed_pairs"] == int(m.sum())
    assert ff["full_pairs"] == n * n
    assert ff["ideal"] == pytest.approx(int(m.sum()) / (n * n))
    assert ff["reduction"] == pytest.approx(1 - ff["ideal"])


def test_flop_fraction_large_grid_figures():
    # per-image-query figure quoted for 8K images (r=16 + 512 text tokens at 512x512): 0.50%
    assert flop_fraction(512, 512, 512, 16)["image_row_fraction"] == pytest.approx(0.00498, abs=5e-5)
    # exact fraction (dense text rows and clipped windows included) is somewhat larger
    assert 0.005 < flop_fraction(512, 512, 512, 16)["ideal"] < 0.008


def _dense_occupancy(mask, block):
    nq, nk = mask.shape
    bq, bk = -(-nq // block), -(-nk // block)
    pad = torch.zeros(bq * block, bk * block, dtype=torch.bool)
    pad[:nq, :nk] = mask
    return pad.view(bq, block, bk, block).any(dim=3).any(dim=1)


@pytest.mark.parametrize("height,width,text_len,radius,f", [(5, 7, 3, 2, 1), (7, 5, 0, 1, 1), (6, 10, 4, 3, 2), (9, 11, 5, 4, 1),
                                                          (9, 11, 5, 2.2, 1)])
@pytest.mark.parametrize("block", [4, 16])
def test_block_occupancy_matches_dense(height, width, text_len, radius, f, block):
    m = dense_clear_mask(height, width, text_len, radius, f)
    assert torch.equal(block_occupancy(height, width, text_len, radius, block, "raster", down_factor=f), _dense_occupancy(m, block))
    tile = (2, 3)  # does not divide 5x7 / 7x5 / 9x11: partial tiles at the edges
    perm, _ = tile_permutation(height, width, tile)
    n = text_len + height * width
    order = torch.cat([torch.arange(text_len), text_len + perm, torch.arange(n, m.shape[1])])
    m_tiled = m[order[:n]][:, order]
    assert torch.equal(
        block_occupancy(height, width, text_len, radius, block, "tiled", tile=tile, down_factor=f),
        _dense_occupancy(m_tiled, block),
    )


def test_executed_block_fraction_known_values():
    # 1024^2 image = 64x64 tokens + 512 text tokens, 128-blocks: raster vs 8x16 tiles
    assert executed_block_fraction(64, 64, 512, 8) == pytest.approx(0.4167, abs=1e-4)
    assert executed_block_fraction(64, 64, 512, 8, order="tiled") == pytest.approx(0.3796, abs=1e-4)
    assert executed_block_fraction(64, 64, 512, 16) == pytest.approx(0.5741, abs=1e-4)
    assert executed_block_fraction(64, 64, 512, 16, order="tiled") == pytest.approx(0.4722, abs=1e-4)


@pytest.mark.parametrize("height,width,tile", [(8, 16, (8, 16)), (5, 7, (2, 3)), (16, 32, (8, 16)), (9, 20, (8, 16))])
def test_tile_permutation(height, width, tile):
    perm, inv = tile_permutation(height, width, tile)
    hw = height * width
    assert torch.equal(torch.sort(perm).values, torch.arange(hw))
    assert torch.equal(perm[inv], torch.arange(hw))
    # consecutive permuted tokens fill one tile before the next
    th, tw = tile
    tiles_w = -(-width // tw)
    tile_id = (perm // width // th) * tiles_w + (perm % width) // tw
    assert torch.all(tile_id[1:] >= tile_id[:-1])
    # inside a tile: raster order
    y, x = perm // width, perm % width
    same = tile_id[1:] == tile_id[:-1]
    assert torch.all(((y[1:] > y[:-1]) | ((y[1:] == y[:-1]) & (x[1:] > x[:-1])))[same])
    # permute / unpermute round trip with text tokens in front and extra tokens behind
    x_seq = torch.randn(2, 3, 4 + hw + 5, 8)
    xp = permute_tokens(x_seq, 4, perm)
    assert torch.equal(xp[:, :, :4], x_seq[:, :, :4]) and torch.equal(xp[:, :, -5:], x_seq[:, :, -5:])
    assert torch.equal(xp[:, :, 4 : 4 + hw], x_seq[:, :, 4 + perm])
    assert torch.equal(unpermute_tokens(xp, 4, inv), x_seq)


# ----------------------------------------------------------------------------------------------
# reference backend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width,text_len,radius,f", [(5, 7, 3, 2, 1), (4, 6, 0, 3, 2), (8, 8, 4, 3, 2)])
def test_reference_matches_naive(height, width, text_len, radius, f):
    n = text_len + height * width
    q, k, v = qkv(2, 3, n, 16)
    w = torch.rand(f, f) if f >= 2 else None
    scale = 0.3
    out = clear_attention(q, k, v, height=height, width=width, text_len=text_len, radius=radius, down_factor=f,
                          spatial_weight=w, scale=scale, backend="reference")
    mask = brute_mask(height, width, text_len, radius, f)
    if f >= 2:
        k = torch.cat([k, brute_pool(k, height, width, text_len, f, w)], dim=2)
        v = torch.cat([v, brute_pool(v, height, width, text_len, f, w)], dim=2)
    expected = naive_attention(q, k, v, mask, scale)
    assert (out - expected).abs().max().item() < 1e-5


def test_pool_kv_default_is_average():
    q, k, v = qkv(1, 2, 3 + 16, 8)
    pk, pv = pool_kv(k, v, height=4, width=4, text_len=3, down_factor=2)
    img = k[:, :, 3:].reshape(1, 2, 2, 2, 2, 2, 8)
    assert torch.allclose(pk, img.mean(dim=(3, 5)).reshape(1, 2, 4, 8), atol=1e-6)
    # CLEAR's parameter shape (1,1,1,f,1,f,1) is accepted
    w = torch.rand(1, 1, 1, 2, 1, 2, 1)
    pk2, _ = pool_kv(k, v, height=4, width=4, text_len=3, down_factor=2, spatial_weight=w)
    assert torch.allclose(pk2, brute_pool(k, 4, 4, 3, 2, w.reshape(2, 2)), atol=1e-6)


def test_reference_gradients_flow_including_spatial_weight():
    height, width, text_len, radius, f = 4, 4, 2, 2, 2
    n = text_len + height * width
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 2, n, 4))
    w = torch.full((f, f), 1.0 / (f * f), dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, w):
        return clear_attention(q, k, v, height=height, width=width, text_len=text_len, radius=radius,
                               down_factor=f, spatial_weight=w, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-5)
    out = fn(q, k, v, w)
    out.square().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    # "auto" on CPU runs the reference backend when a gradient is needed, so it trains as well
    out_auto = clear_attention(q, k, v, height=height, width=width, text_len=text_len, radius=radius, down_factor=f,
                               spatial_weight=w, backend="auto")
    assert out_auto.requires_grad and torch.allclose(out_auto, out)


# ----------------------------------------------------------------------------------------------
# flex backend
# ----------------------------------------------------------------------------------------------

FLEX_CASES = [
    # height, width, text_len, radius, down_factor, permute, block_size
    (8, 8, 0, 2, 1, False, 16),
    (8, 8, 4, 3, 1, True, 16),
    (6, 10, 4, 4, 1, False, 32),
    (6, 10, 0, 2, 1, True, 16),
    (7, 5, 4, 3, 1, True, 16),
    (7, 5, 0, 1, 1, False, None),
    (8, 8, 4, 3, 2, False, 16),
    (8, 8, 0, 5, 2, True, 32),
    (8, 8, 4, 2.2, 1, True, 16),  # non-integer radius
]


@pytest.mark.parametrize("height,width,text_len,radius,f,permute,block", FLEX_CASES)
def test_flex_eager_matches_reference(height, width, text_len, radius, f, permute, block):
    n = text_len + height * width
    q, k, v = qkv(1, 2, n, 16)
    w = torch.rand(f, f) if f >= 2 else None
    kw = dict(height=height, width=width, text_len=text_len, radius=radius, down_factor=f, spatial_weight=w)
    out = clear_attention(q, k, v, backend="flex", compiled=False, permute=permute, tile=(2, 4), block_size=block, **kw)
    assert (out - reference(q, k, v, **kw)).abs().max().item() < 1e-4


def test_flex_block_mask_cached_and_matches_occupancy():
    bm = clear_block_mask(7, 5, 4, 3, device="cpu", permute=True, tile=(2, 4), block_size=8)
    assert clear_block_mask(7, 5, 4, 3, device="cpu", permute=True, tile=(2, 4), block_size=8) is bm
    assert clear_block_mask(7, 5, 4, 3, device="cpu", permute=False, block_size=8) is not bm
    dense = bm.to_dense()[0, 0].bool()
    assert torch.equal(dense, block_occupancy(7, 5, 4, 3, 8, "tiled", tile=(2, 4)))
    # the compiled construction path gives the same block structure
    bm_c = clear_block_mask(8, 8, 4, 3, 2, device="cpu", block_size=16, compile_mask=True)
    assert torch.equal(bm_c.to_dense()[0, 0].bool(), block_occupancy(8, 8, 4, 3, 16, down_factor=2))


def test_flex_compiled_matches_reference():
    # one small compiled case (a few seconds of C++ compilation on CPU), permuted + pooled tokens, a non-integer radius
    height, width, text_len, radius, f = 8, 8, 4, 2.6, 2
    q, k, v = qkv(1, 2, text_len + height * width, 16)
    kw = dict(height=height, width=width, text_len=text_len, radius=radius, down_factor=f)
    out = clear_attention(q, k, v, backend="flex", compiled=True, permute=True, tile=(4, 4), block_size=16, **kw)
    assert (out - reference(q, k, v, **kw)).abs().max().item() < 1e-4


def test_flex_requires_grad_on_cpu_is_a_clear_error():
    q, k, v = qkv(1, 1, 4 + 16, 8)
    q.requires_grad_()
    with pytest.raises(ConfigError, match="backend='reference'"):
        clear_attention(q, k, v, height=4, width=4, text_len=4, radius=2, backend="flex")
    with torch.no_grad():  # no gradient needed: fine
        clear_attention(q, k, v, height=4, width=4, text_len=4, radius=2, backend="flex", compiled=False)


# ----------------------------------------------------------------------------------------------
# triton backend (interpreter)
# ----------------------------------------------------------------------------------------------

TRITON_CASES = [
    # height, width, text_len, radius, down_factor, head_dim, block_size, skip_blocks
    (8, 8, 4, 3, 1, 16, None, None),  # default interpreter tiles 32x32
    (7, 5, 0, 2, 1, 32, 16, None),  # odd grid, no text
    (5, 7, 3, 1, 1, 16, 64, None),  # radius 1 + large tiles: rows with no allowed key in a tile
    (9, 9, 0, 1, 1, 16, 32, True),  # fully masked tiles with no text to fall back on
    (8, 8, 3, 2, 2, 16, (16, 32), None),  # pooled tokens
    (6, 10, 0, 4, 2, 32, 16, None),  # pooled, no text
    (4, 40, 3, 3, 1, 16, 16, True),  # rows longer than a query block: bounding-box skipping
    (12, 12, 20, 4, 1, 16, 16, None),  # several text tiles, text/image boundary inside a tile
    (8, 8, 4, 2.2, 1, 16, 16, True),  # non-integer radius: a 13-key window, band of 2 rows either side
    (4, 40, 3, 2.5, 2, 16, 16, True),  # non-integer radius with pooled tokens and bounding-box skipping
]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("height,width,text_len,radius,f,d,block,skip", TRITON_CASES)
def test_triton_fp32_matches_reference(interpret, height, width, text_len, radius, f, d, block, skip):
    n = text_len + height * width
    assert n <= 300
    q, k, v = qkv(1, 2, n, d)
    w = torch.rand(f, f) if f >= 2 else None
    kw = dict(height=height, width=width, text_len=text_len, radius=radius, down_factor=f, spatial_weight=w)
    out = clear_attention(q, k, v, backend="triton", block_size=block, kernel_options={"skip_blocks": skip}, **kw)
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    assert (out - reference(q, k, v, **kw)).abs().max().item() < 1e-4


@pytest.mark.parametrize("height,width,text_len,radius,f,d,block", [
    (8, 8, 4, 3, 1, 32, None),
    (7, 5, 0, 1, 1, 16, 32),
    (8, 8, 0, 3, 2, 16, 16),
])
def test_triton_fp16_matches_reference(interpret, height, width, text_len, radius, f, d, block):
    q, k, v = qkv(2, 2, text_len + height * width, d, dtype=torch.float16)
    kw = dict(height=height, width=width, text_len=text_len, radius=radius, down_factor=f)
    out = clear_attention(q, k, v, backend="triton", block_size=block, scale=0.2, **kw)
    assert out.dtype == torch.float16 and not torch.isnan(out).any()
    assert (out.float() - reference(q, k, v, scale=0.2, **kw)).abs().max().item() < 2e-3


def test_triton_bf16_is_upcast_in_the_interpreter(interpret):
    q, k, v = qkv(1, 1, 3 + 20, 16, dtype=torch.bfloat16)
    kw = dict(height=4, width=5, text_len=3, radius=2)
    out = clear_attention(q, k, v, backend="triton", **kw)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference(q, k, v, **kw)).abs().max().item() < 2e-2


@pytest.mark.parametrize("height,width,text_len,radius,block,skip", [
    (9, 11, 5, 3, (16, 16), False),
    (9, 11, 5, 3, (16, 16), True),
    (4, 40, 0, 4, (16, 32), True),
    (6, 64, 7, 5, (32, 16), True),
    (9, 11, 5, 2.2, (16, 16), True),
    (6, 64, 7, 3.7, (32, 16), True),
])
def test_triton_schedule_covers_every_allowed_key(height, width, text_len, radius, block, skip):
    """The Python replica of the kernel's KV loop never skips an allowed (query, key) pair."""
    bm, bn = block
    n = text_len + height * width
    hw = height * width
    mask = dense_clear_mask(height, width, text_len, radius)[:, text_len:]  # image keys only
    for pid, starts in enumerate(tk.band_schedule(n, text_len, height, width, radius, bm, bn, skip)):
        rows = mask[pid * bm : (pid + 1) * bm]
        covered = torch.zeros(hw, dtype=torch.bool)
        for s in starts:
            covered[s : s + bn] = True
        assert not (rows & ~covered).any()
    frac = triton_executed_fraction(height, width, text_len, radius, block_size=block, skip_blocks=skip)
    assert 0 < frac["fraction"] <= 1


def test_triton_unavailable_names_fallback(monkeypatch):
    q, k, v = qkv(1, 1, 2 + 16, 16)
    kw = dict(height=4, width=4, text_len=2, radius=2, backend="triton")
    monkeypatch.setattr(backends_mod, "_triton_available", lambda device=None: False)
    with pytest.raises(BackendUnavailable, match="backend='flex'.*backend='reference'") as info:
        clear_attention(q, k, v, **kw)
    assert isinstance(info.value, FastgenError)
    monkeypatch.undo()
    # the real condition here: CPU tensors without the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        clear_attention(q, k, v, **kw)


def test_triton_rejects_grad_and_permute(interpret):
    q, k, v = qkv(1, 1, 2 + 16, 16)
    kw = dict(height=4, width=4, text_len=2, radius=2, backend="triton")
    with pytest.raises(ConfigError, match="permute"):
        clear_attention(q, k, v, permute=True, **kw)
    q.requires_grad_()
    with pytest.raises(ConfigError, match="forward-only"):
        clear_attention(q, k, v, **kw)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_configs_raise_config_error():
    q, k, v = qkv(1, 1, 2 + 16, 8)
    base = dict(height=4, width=4, text_len=2)
    with pytest.raises(ConfigError, match="full attention"):
        clear_attention(q, k, v, radius=5, **base)
    with pytest.raises(ConfigError, match="full attention"):
        dense_clear_mask(5, 7, 0, 8)
    with pytest.raises(ConfigError, match=">= 1"):
        clear_attention(q, k, v, radius=0, **base)
    with pytest.raises(ConfigError, match="divide"):
        clear_attention(q, k, v, radius=2, down_factor=3, **base)
    with pytest.raises(ConfigError, match="sequence length"):
        clear_attention(q, k, v, height=4, width=5, text_len=2, radius=2)
    with pytest.raises(ConfigError, match="unknown backend"):
        clear_attention(q, k, v, radius=2, backend="natten", **base)
    with pytest.raises(ConfigError, match="spatial_weight"):
        clear_attention(q, k, v, radius=2, down_factor=2, spatial_weight=torch.ones(3, 3), **base)
    # radius equal to the grid size is still a (large) window, and odd grids work
    out = clear_attention(q, k, v, radius=4, **base)
    assert out.shape == q.shape and math.isfinite(out.abs().max().item())


def test_triton_kernel_compiles_natively_for_sm90():
    """Code generation for the GPU path (PTX + cubin via triton's bundled ptxas), no GPU needed."""
    pytest.importorskip("triton.backends.nvidia")
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if not isinstance(tl.max, JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET set: its language is in interpreter mode")
    try:
        compiled = tk.compile_for_target("bfloat16", head_dim=64, block_m=64, block_n=32, has_pooled=True,
                                         skip_blocks=True, num_warps=4, num_stages=2)
    except (FileNotFoundError, RuntimeError) as exc:  # no ptxas in this triton build
        if "ptxas" in str(exc).lower():
            pytest.skip(f"no ptxas: {exc}")
        raise
    assert "_clear_attn_fwd" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0


def test_benchmark_quick_smoke(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "clear_attention.py"
    spec = importlib.util.spec_from_file_location("clear_attention_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "clear_attention_quick.json").read_text())
    status = {(r["backend"], r["radius"]): r["status"] for r in data["rows"]}
    assert status[("sdpa_full", None)] == "ok"
    assert status[("reference", 4)] == status[("flex_raster", 4)] == status[("flex_tiled", 4)] == "ok"
    assert status[("triton", 4)] == "not run: interpreter"
    flex = next(r for r in data["rows"] if r["backend"] == "flex_tiled")
    assert flex["median_ms"] > 0 and flex["first_call_s"] > 0 and 0 < flex["ideal_flop_fraction"] < 1
    assert (tmp_path / "clear_attention_quick.md").read_text().startswith("# CLEAR attention latency")


def test_flux_clear_speed_tiny_cpu(tmp_path):
    """benchmarks/gpu/flux_clear_speed.py: the tiny FLUX architecture on CPU, full vs CLEAR (reference)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "flux_clear_speed.py"
    spec = importlib.util.spec_from_file_location("flux_clear_speed_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--tiny", "--device", "cpu", "--resolutions", "256", "--backends", "full,reference,triton",
                       "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "flux_clear_speed.json").read_text())
    rows = {r["case"]: r for r in data["rows"]}
    assert rows["full"]["status"] == "ok" and rows["full"]["speedup_vs_full"] == 1.0
    assert rows["reference"]["status"] == "ok" and rows["reference"]["median_ms"] > 0
    assert rows["triton"]["status"].startswith("not run")
    # 16x16 image tokens + 32 text tokens, r = 4: the ideal attention fraction is the exact pair count
    assert rows["reference"]["attn_ideal_fraction"] == pytest.approx(flop_fraction(16, 16, 32, 4)["ideal"])
    assert 0 < rows["triton"]["model_flop_fraction"] < 1 and data["settings"]["config"]["num_layers"] == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--resolutions", "1000"])  # not a multiple of 16


# --------------------------------------------------------------------------- auto on CPU


def test_cpu_table_is_the_measured_winners():
    """The shipped table is what benchmarks/clear_attention.py derived from its committed results, and each
    case's choice is its fastest measured exact backend."""
    import json
    from pathlib import Path

    from fastgen.attention import crossover

    results = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/clear_attention.json").read_text())
    want = crossover.cases_from_rows(results["rows"], results["protocol"]["text_len"])
    assert list(crossover.load_table()) == want and want
    for case in want:
        assert case["median_ms"][case["best"]] == min(case["median_ms"].values())
    picks = {crossover.CHOICES[c["best"]] for c in want}
    assert ("reference", False) in picks and len(picks) > 1  # the measured crossovers move the choice


def test_auto_picks_from_the_table_and_matches_the_reference(tmp_path, monkeypatch):
    import json

    from fastgen.attention import crossover

    table = tmp_path / "cpu_backends.json"
    table.write_text(json.dumps({"cases": [
        {"grid": "4x4", "text_len": 3, "radius": 2, "tokens": 19, "ideal_flop_fraction": 0.5, "best": "reference"},
        {"grid": "8x8", "text_len": 3, "radius": 2, "tokens": 67, "ideal_flop_fraction": 0.2, "best": "flex_tiled"},
    ]}))
    monkeypatch.setattr(crossover, "TABLE", table)
    crossover.load_table.cache_clear()
    try:
        assert crossover.pick_cpu_backend(8, 8, 3, 2, needs_grad=False) == ("flex", True)
        assert crossover.pick_cpu_backend(4, 4, 3, 2, needs_grad=False) == ("reference", False)
        assert crossover.pick_cpu_backend(8, 8, 3, 2, needs_grad=True) == ("reference", False)
        calls = []
        real_flex = backends_mod._flex
        monkeypatch.setattr(backends_mod, "_flex", lambda *a: calls.append(a[11]) or real_flex(*a[:13], False, *a[14:]))  # eager
        q, k, v = qkv(1, 2, 3 + 64, 16)
        with torch.no_grad():
            auto = clear_attention(q, k, v, height=8, width=8, text_len=3, radius=2, backend="auto")
            ref = clear_attention(q, k, v, height=8, width=8, text_len=3, radius=2, backend="reference")
        assert calls == [True]  # flex, tile-permuted, as the table says
        assert torch.allclose(auto, ref, atol=1e-5)
    finally:
        crossover.load_table.cache_clear()
    monkeypatch.setattr(crossover, "TABLE", tmp_path / "missing.json")
    assert crossover.pick_cpu_backend(128, 128, 512, 8, needs_grad=False) == ("reference", False)
