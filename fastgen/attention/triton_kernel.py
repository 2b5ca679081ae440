"""A fused flash-style forward kernel for CLEAR attention, written in Triton.

One program handles ``BLOCK_M`` consecutive queries of one (batch, head) and walks three key
segments with an online softmax (fp32 running max / sum / accumulator):

1. the text prefix ``[0, T)`` (every query sees it);
2. the image keys of the *row band* of the query block: for a block whose image queries cover
   grid rows ``yq_min..yq_max`` only keys on rows ``max(0, yq_min - E) .. min(H-1, yq_max + E)``
   can be inside a disk of radius ``r`` (``E`` = :func:`~.mask.window_extent`, ``r - 1`` for an
   integer radius; raster order makes that a contiguous key range). Blocks that contain a text
   query walk all image keys. With ``SKIP_BLOCKS`` a key block inside the band is also skipped
   when the bounding boxes of the query block and the key block are at least ``r`` apart (useful
   when a grid row is longer than a query block);
3. the pooled keys (``down_factor >= 2``), only for blocks that contain image queries.

Inside each visited tile the exact element-level CLEAR predicate is applied, on integers:
``dy^2 + dx^2 < R2`` with ``R2 = ceil(r^2)`` (:func:`~.mask.radius_bound`). Rows that have no
allowed key yet in a tile keep a running max of ``-inf``; the max is replaced by 0 before the
exponentials so such tiles contribute exactly 0 instead of NaN.

The kernel body is a plain Python function; :func:`get_kernel` wraps it either as a native
``JITFunction`` (CUDA) or, when ``TRITON_INTERPRET=1`` is set at call time, as Triton's
CPU interpreter (``InterpretedFunction``), so the choice does not depend on when this module was
imported. The interpreter cannot multiply bfloat16 in ``tl.dot``; :mod:`.backends` upcasts
bfloat16 inputs to float32 in that mode.
"""

from __future__ import annotations

import contextlib
import os

from .mask import radius_bound, window_extent

try:  # triton is optional (the reference and flex backends do not need it)
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "triton_importable",
    "interpret_requested",
    "get_kernel",
    "launch_clear_forward",
    "band_schedule",
    "band_visits",
    "default_blocks",
    "compile_for_target",
]

LOG2E = 1.4426950408889634


def triton_importable() -> bool:
    return triton is not None


def interpret_requested() -> bool:
    """``TRITON_INTERPRET`` is set to a true value (read at call time, like Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _clear_attn_fwd(
    Q, K, V, PK, PV, O,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, N, T, H, W, R2, E, P, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_POOLED: tl.constexpr,
    SKIP_BLOCKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    HW = H * W
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < N
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    q_text = offs_m < T
    q_img = (offs_m >= T) & row_ok
    qi = tl.maximum(offs_m - T, 0)
    yq = qi // W
    xq = qi % W

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    # ---- 1. text keys ------------------------------------------------------------------------
    for start in range(0, T, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ok = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # ---- 2. image keys in the row band -------------------------------------------------------
    has_text = m0 < T
    q_first = tl.maximum(m0 - T, 0)
    q_last = tl.minimum(m0 + BLOCK_M, N) - 1 - T  # < 0 when the block holds text queries only
    q_last_c = tl.maximum(q_last, 0)
    yq_min = q_first // W
    yq_max = q_last_c // W
    band_lo = tl.maximum(yq_min - E, 0) * W
    band_hi = tl.minimum(yq_max + E + 1, H) * W
    img_lo = tl.where(has_text, 0, band_lo)
    img_hi = tl.where(has_text, HW, band_hi)
    q_one_row = yq_min == yq_max
    xq_min = tl.where(q_one_row, q_first % W, 0)
    xq_max = tl.where(q_one_row, q_last_c % W, W - 1)
    for start in range(img_lo, img_hi, BLOCK_N):
        visit = True
        if SKIP_BLOCKS:
            k_last = tl.minimum(start + BLOCK_N, img_hi) - 1
            ky0 = start // W
            ky1 = k_last // W
            k_one_row = ky0 == ky1
            kx0 = tl.where(k_one_row, start % W, 0)
            kx1 = tl.where(k_one_row, k_last % W, W - 1)
            gy = tl.maximum(tl.maximum(ky0 - yq_max, yq_min - ky1), 0)
            gx = tl.maximum(tl.maximum(kx0 - xq_max, xq_min - kx1), 0)
            visit = has_text | (gy * gy + gx * gx < R2)
        if visit:
            offs_n = start + tl.arange(0, BLOCK_N)
            k_ok = offs_n < img_hi
            k = tl.load(k_base + (T + offs_n)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_base + (T + offs_n)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            yk = offs_n // W
            xk = offs_n % W
            dy = yq[:, None] - yk[None, :]
            dx = xq[:, None] - xk[None, :]
            allowed = k_ok[None, :] & (q_text[:, None] | (dy * dy + dx * dx < R2))
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

    # ---- 3. pooled keys (image queries only) -------------------------------------------------
    if HAS_POOLED:
        pk_base = PK + b * stride_pkb + h * stride_pkh
        pv_base = PV + b * stride_pvb + h * stride_pvh
        p_hi = tl.where(q_last >= 0, P, 0)
        for start in range(0, p_hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k_ok = offs_n < P
            k = tl.load(pk_base + offs_n[:, None] * stride_pkn + offs_d[None, :] * stride_pkd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(pv_base + offs_n[:, None] * stride_pvn + offs_d[None, :] * stride_pvd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            allowed = k_ok[None, :] & q_img[:, None]
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_KERNELS: dict = {}

# triton.language functions the kernel body calls that are themselves ``@triton.jit`` functions
# (not builtins). When triton was imported without TRITON_INTERPRET they are JITFunctions, which
# the interpreter refuses to call; :func:`_interpreter_stdlib` swaps in interpreted versions for the
# duration of a launch. Each call runs under its own language-patch scope that is restored
# afterwards (an interpreted stdlib call would otherwise leave ``triton.language.core`` patched,
# which breaks later native compilations in the same process).
_STDLIB_JIT_NAMES = ("max", "sum")


class _ScopedInterpreted:
    def __init__(self, jit_fn):
        from triton.runtime.interpreter import InterpretedFunction

        self._inner = InterpretedFunction(jit_fn.fn)

    def __call__(self, *args, **kwargs):
        from triton.runtime.interpreter import _patch_lang

        scope = _patch_lang(self._inner.fn)
        try:
            return self._inner.rewrite()(*args, **kwargs)
        finally:
            scope.restore()


@contextlib.contextmanager
def _interpreter_stdlib():
    from triton.runtime.jit import JITFunction

    saved = {}
    try:
        for name in _STDLIB_JIT_NAMES:
            obj = getattr(tl, name)
            if isinstance(obj, JITFunction):
                saved[name] = obj
                setattr(tl, name, _ScopedInterpreted(obj))
        yield
    finally:
        for name, obj in saved.items():
            setattr(tl, name, obj)


def get_kernel(interpret: bool):
    """The kernel as Triton's CPU interpreter (``interpret=True``) or as a native JIT function."""
    if triton is None:  # pragma: no cover
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    kernel = _KERNELS.get(interpret)
    if kernel is None:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            kernel = InterpretedFunction(_clear_attn_fwd)
        else:
            from triton.runtime.jit import JITFunction

            kernel = JITFunction(_clear_attn_fwd)
        _KERNELS[interpret] = kernel
    return kernel


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def default_blocks(head_dim: int, interpret: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` used when the caller gives none.

    GPU: 128 x 64 tiles (the usual flash-attention forward shape), 8 warps for head dim >= 128,
    4 below. Interpreter: 32 x 32 (small tiles keep the per-op numpy work low).
    """
    if interpret:
        return 32, 32, 4, 1
    if head_dim >= 128:
        return 128, 64, 8, 2
    return 128, 64, 4, 3


def band_schedule(n_queries: int, text_len: int, height: int, width: int, radius: int | float,
                  block_m: int, block_n: int, skip_blocks: bool) -> list[list[int]]:
    """The image-key tiles the kernel visits, recomputed in Python (same integer logic).

    Returns, per query block, the list of tile starts ``s`` (image-token index; the tile covers image
    keys ``[s, min(s + BLOCK_N, band_end))``). Text and pooled tiles are always visited (pooled ones
    only by blocks holding an image query).
    """
    hw = height * width
    r2, ext = radius_bound(radius), window_extent(radius)
    out = []
    for pid in range(-(-n_queries // block_m)):
        m0 = pid * block_m
        has_text = m0 < text_len
        q_first = max(m0 - text_len, 0)
        q_last_c = max(min(m0 + block_m, n_queries) - 1 - text_len, 0)
        yq_min, yq_max = q_first // width, q_last_c // width
        if has_text:
            lo, hi = 0, hw
        else:
            lo = max(yq_min - ext, 0) * width
            hi = min(yq_max + ext + 1, height) * width
        one_row = yq_min == yq_max
        xq_min = q_first % width if one_row else 0
        xq_max = q_last_c % width if one_row else width - 1
        starts = []
        for start in range(lo, hi, block_n):
            if skip_blocks and not has_text:
                k_last = min(start + block_n, hi) - 1
                ky0, ky1 = start // width, k_last // width
                k_one = ky0 == ky1
                kx0 = start % width if k_one else 0
                kx1 = k_last % width if k_one else width - 1
                gy = max(ky0 - yq_max, yq_min - ky1, 0)
                gx = max(kx0 - xq_max, xq_min - kx1, 0)
                if gy * gy + gx * gx >= r2:
                    continue
            starts.append(start)
        out.append(starts)
    return out


def band_visits(n_queries: int, text_len: int, height: int, width: int, radius: int | float, num_pooled: int,
                block_m: int, block_n: int, skip_blocks: bool) -> dict:
    """Count of KV tiles the kernel visits (one batch/head), from :func:`band_schedule`.

    Returns ``visited``, ``total`` (tiles a dense kernel with the same tiling would execute: every
    query block times ``cdiv(T, BN) + cdiv(HW, BN) + cdiv(P, BN)``) and ``fraction = visited / total``.
    """
    hw = height * width
    nbq = -(-n_queries // block_m)
    text_tiles = -(-text_len // block_n)
    pooled_tiles = -(-num_pooled // block_n)
    visited = 0
    for pid, starts in enumerate(band_schedule(n_queries, text_len, height, width, radius, block_m, block_n,
                                               skip_blocks)):
        has_image_query = min((pid + 1) * block_m, n_queries) > text_len
        visited += text_tiles + len(starts) + (pooled_tiles if has_image_query else 0)
    total = nbq * (text_tiles + -(-hw // block_n) + pooled_tiles)
    return {"visited": visited, "total": total, "fraction": visited / total if total else 0.0,
            "block_m": block_m, "block_n": block_n}


def launch_clear_forward(q, k, v, pk, pv, *, height, width, text_len, radius, scale,
                         block_m, block_n, num_warps, num_stages, skip_blocks, interpret):
    """Launch the kernel; ``q/k/v`` are ``[B, heads, N, D]``, ``pk/pv`` ``[B, heads, P, D]`` or None."""
    import torch

    bsz, heads, n, d = q.shape
    out = torch.empty_like(q)
    has_pooled = pk is not None
    if not has_pooled:
        pk, pv = k, v  # never read (HAS_POOLED is a compile-time False)
        num_pooled = 0
    else:
        num_pooled = pk.shape[2]
    block_d = max(16, _next_pow2(d))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    kernel = get_kernel(interpret)
    grid = (-(-n // block_m), bsz * heads)
    kwargs = {}
    if not interpret:
        kwargs = {"num_warps": num_warps, "num_stages": num_stages}
    ctx = _interpreter_stdlib() if interpret else contextlib.nullcontext()
    with ctx:
        kernel[grid](
            q, k, v, pk, pv, out,
            *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), *out.stride(),
            heads, n, text_len, height, width, radius_bound(radius), window_extent(radius), num_pooled,
            float(scale) * LOG2E,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_POOLED=has_pooled, SKIP_BLOCKS=bool(skip_blocks), DOT_PRECISION=dot_precision,
            **kwargs,
        )
    return out


_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def compile_for_target(dtype: str = "bfloat16", *, head_dim: int = 128, block_m: int = 128, block_n: int = 64,
                       has_pooled: bool = False, skip_blocks: bool = False, num_warps: int = 8,
                       num_stages: int = 2, arch: int = 90):
    """Compile the native kernel ahead of time for ``sm_<arch>`` (no GPU needed; uses the ``ptxas``
    shipped with triton). A code-generation check for machines without a GPU; returns Triton's
    compiled kernel object (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    fn = get_kernel(False)
    elem = _TORCH_TO_TRITON[str(dtype).replace("torch.", "")]
    signature = {name: "*" + elem for name in ("Q", "K", "V", "PK", "PV", "O")}
    for name in fn.arg_names:
        if name.startswith("stride_") or name in ("num_heads", "N", "T", "H", "W", "R2", "E", "P"):
            signature[name] = "i32"
    signature["qk_scale"] = "fp32"
    constexprs = {
        "HEAD_DIM": head_dim, "BLOCK_D": max(16, _next_pow2(head_dim)), "BLOCK_M": block_m, "BLOCK_N": block_n,
        "HAS_POOLED": has_pooled, "SKIP_BLOCKS": skip_blocks,
        "DOT_PRECISION": "ieee" if elem == "fp32" else "tf32",
    }
    signature.update({name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
