"""Attention-only latency of CLEAR attention backends versus full attention (SDPA without a mask).

Usage::

    python benchmarks/clear_attention.py [--device cpu|cuda] [--dtype float32|float16|bfloat16]
        [--heads H] [--dim D] [--grids 64,128,256] [--radii 8,16,32] [--text-len 512]
        [--repeats N] [--warmup N] [--budget-s S] [--threads N] [--out benchmarks/results] [--quick]
        [--merge] [--crossovers PATH|none]

Writes ``<out>/clear_attention.json`` (``protocol`` + ``rows`` + ``skipped``) and
``<out>/clear_attention.md`` atomically (``--quick`` writes ``clear_attention_quick.*`` so a smoke run
never replaces real results); ``--merge`` keeps the earlier rows of cases this run does not measure. A
CPU run also writes the table of per-case winners that the ``auto`` backend reads on CPUs
(``fastgen/attention/cpu_backends.json``, :mod:`fastgen.attention.crossover`).

Problem: one joint sequence of ``text_len`` text tokens + a ``g x g`` image token grid (``g`` in
``--grids``), batch 1, random q/k/v ``[1, heads, N, dim]`` made once per grid (attention only: no
projections, no RoPE). Defaults: CPU 2 heads, dim 64, float32; CUDA 24 heads, dim 128, bfloat16
(the FLUX attention shape).

Cases per grid: ``sdpa_full`` (``F.scaled_dot_product_attention`` without a mask, the baseline), then
per radius ``r`` in ``--radii``:

* ``reference``: SDPA with the dense boolean CLEAR mask; skipped above 20,000 tokens (the mask alone
  is ``N^2`` bytes) and recorded as such;
* ``flex_raster`` / ``flex_tiled``: compiled FlexAttention (``torch.compile(flex_attention,
  dynamic=False)``) with the CLEAR BlockMask (128 x 128 blocks), raster token order and 8 x 16
  tile-permuted order (the permutation and un-permutation are inside the timed call);
* ``triton``: the fused band-limited Triton kernel, CUDA only (on CPU it would run in Triton's
  interpreter, ~10^3x slower: recorded as "not run: interpreter").

Timing: for each case one first call (``first_call_s``; compilation and, for flex, the BlockMask
build, whose time is also given alone as ``mask_build_s``), then ``--warmup`` untimed calls, then
``--repeats`` timed calls (``time.perf_counter``; ``torch.cuda.synchronize`` around each call on
GPU); ``median_ms`` is their median, ``speedup_vs_sdpa = sdpa_full median / case median``.
Alongside: ``ideal_flop_fraction`` (exact allowed pairs / N^2, clipped windows and dense text rows
included), ``block_fraction_raster`` / ``block_fraction_tiled`` (what a 128 x 128 block-sparse kernel
executes, raster vs 8 x 16 tiles) and, for triton, ``triton_tile_fraction`` (tiles its KV loop visits
over the tiles of a dense pass, same tiling).

Budget: ``--budget-s`` (default 3600) stops starting new cases once spent; later cases are listed
under ``skipped``. Grids run in ascending size; before a grid its full-SDPA cost is estimated from
the largest grid timed so far (scaled by ``(N/N_prev)^2``, i.e. x16 from 16K to 64K tokens) and the
whole grid is skipped, with the estimate as the reason, when ``first call + warmup + repeats`` of
that baseline alone would exceed the remaining budget.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastgen.attention.crossover import TABLE as CPU_TABLE, cases_from_rows  # noqa: E402
from fastgen.attention import (  # noqa: E402
    clear_attention,
    clear_block_mask,
    executed_block_fraction,
    flop_fraction,
    normalize_radius,
    triton_executed_fraction,
)
from fastgen.evaluation.reports import markdown_table  # noqa: E402
from fastgen.io import atomic_write_json, atomic_write_text  # noqa: E402

REFERENCE_MAX_TOKENS = 20_000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COLUMNS = [
    "grid", "tokens", "radius", "backend", "median_ms", "speedup_vs_sdpa", "first_call_s", "mask_build_s",
    "ideal_flop_fraction", "block_fraction_raster", "block_fraction_tiled", "triton_tile_fraction", "status",
]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def measure(fn, device, warmup, repeats):
    first, _ = _timed(fn, device)
    for _ in range(warmup):
        _timed(fn, device)
    times = [_timed(fn, device)[0] for _ in range(repeats)]
    return {"first_call_s": first, "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "times_ms": [round(1e3 * t, 4) for t in times]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--heads", type=int, default=None, help="default 2 on CPU, 24 on CUDA")
    ap.add_argument("--dim", type=int, default=None, help="head dim; default 64 on CPU, 128 on CUDA")
    ap.add_argument("--grids", default="64,128,256", help="image token grid sides, comma separated")
    ap.add_argument("--radii", default="8,16,32")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 1 CPU, 5 CUDA)")
    ap.add_argument("--budget-s", type=float, default=3600.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: leave as is")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: one 16x16 grid, 16 text tokens, r=4")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the existing results for cases this run does not measure (e.g. other text lengths)")
    ap.add_argument("--crossovers", default=None,
                    help="where to write the CPU backend table `auto` reads (default: fastgen/attention/cpu_backends.json "
                         "for a CPU run that is not --quick; 'none' to skip)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.device = device
    args.dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    args.heads = args.heads or (24 if gpu else 2)
    args.dim = args.dim or (128 if gpu else 64)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if args.quick:
        args.grids, args.radii, args.text_len = "16", "4", 16
        args.heads, args.dim = (args.heads if gpu else 1), (args.dim if gpu else 32)
        args.repeats, args.warmup = 2, 0
    args.grid_list = sorted({int(g) for g in args.grids.split(",") if g.strip()})
    args.radius_list = [normalize_radius(float(r)) for r in args.radii.split(",") if r.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype = args.device, args.dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, skipped = [], []
    last_sdpa = None  # (tokens, seconds per call) of the largest grid timed so far
    runs_per_case = 1 + args.warmup + args.repeats

    def remaining():
        return args.budget_s - (time.perf_counter() - start)

    def skip(grid, radius, backend, reason):
        skipped.append({"grid": f"{grid}x{grid}", "radius": radius, "backend": backend, "reason": reason})
        print(f"  skip {grid}x{grid} r={radius} {backend}: {reason}", flush=True)

    backends = ["reference", "flex_raster", "flex_tiled", "triton"]
    for g in args.grid_list:
        n = args.text_len + g * g
        if last_sdpa is not None:
            est = last_sdpa[1] * (n / last_sdpa[0]) ** 2
            if est * runs_per_case > remaining():
                reason = (f"estimated full SDPA {est:.1f} s/call ({last_sdpa[0]}-token timing x "
                          f"{(n / last_sdpa[0]) ** 2:.1f}) x {runs_per_case} calls exceeds the remaining "
                          f"budget {max(remaining(), 0):.0f} s")
                for r in [None] + args.radius_list:
                    for b in (["sdpa_full"] if r is None else backends):
                        skip(g, r, b, reason)
                continue
        if remaining() <= 0:
            for r in [None] + args.radius_list:
                for b in (["sdpa_full"] if r is None else backends):
                    skip(g, r, b, "budget exhausted")
            continue
        gen = torch.Generator(device="cpu").manual_seed(g)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        print(f"grid {g}x{g}: {n} tokens", flush=True)
        base = {"grid": f"{g}x{g}", "tokens": n, "text_len": args.text_len, "radius": None}
        try:
            m = measure(lambda: F.scaled_dot_product_attention(q, k, v), device, args.warmup, args.repeats)
            sdpa_ms = m["median_ms"]
            last_sdpa = (n, sdpa_ms / 1e3)
            rows.append({**base, "backend": "sdpa_full", **m, "speedup_vs_sdpa": 1.0, "status": "ok"})
            print(f"  sdpa_full {sdpa_ms:.2f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            sdpa_ms = None
            rows.append({**base, "backend": "sdpa_full", "status": f"failed: {type(exc).__name__}: {exc}"[:300]})
            _free(device)

        for r in args.radius_list:
            if r > g:
                for b in backends:
                    skip(g, r, b, f"radius {r} larger than the {g}x{g} grid (use full attention)")
                continue
            ff = flop_fraction(g, g, args.text_len, r)
            info = {
                **base, "radius": r,
                "ideal_flop_fraction": ff["ideal"],
                "image_row_fraction": ff["image_row_fraction"],
                "block_fraction_raster": executed_block_fraction(g, g, args.text_len, r, 128, "raster"),
                "block_fraction_tiled": executed_block_fraction(g, g, args.text_len, r, 128, "tiled", (8, 16)),
            }
            kw = dict(height=g, width=g, text_len=args.text_len, radius=r)
            for b in backends:
                if remaining() <= 0:
                    skip(g, r, b, "budget exhausted")
                    continue
                row = {**info, "backend": b}
                if b == "reference" and n > REFERENCE_MAX_TOKENS:
                    row["status"] = f"skipped: dense mask N^2 = {n * n / 1e9:.2f} GB"
                    rows.append(row)
                    continue
                if b == "triton":
                    tf = triton_executed_fraction(g, g, args.text_len, r, head_dim=args.dim)
                    row["triton_tile_fraction"] = tf["fraction"]
                    row["triton_blocks"] = f"{tf['block_m']}x{tf['block_n']}"
                    if device.type != "cuda":
                        row["status"] = "not run: interpreter"
                        rows.append(row)
                        continue
                try:
                    if b.startswith("flex"):
                        permute = b == "flex_tiled"
                        t0 = time.perf_counter()
                        clear_block_mask(g, g, args.text_len, r, device=device, permute=permute, tile=(8, 16))
                        _sync(device)
                        row["mask_build_s"] = time.perf_counter() - t0
                        fn = lambda p=permute: clear_attention(q, k, v, backend="flex", compiled=True, permute=p,  # noqa: E731
                                                               tile=(8, 16), **kw)
                    else:
                        fn = lambda b=b: clear_attention(q, k, v, backend=b, **kw)  # noqa: E731
                    with torch.no_grad():
                        m = measure(fn, device, args.warmup, args.repeats)
                    row.update(m)
                    if sdpa_ms:
                        row["speedup_vs_sdpa"] = sdpa_ms / m["median_ms"]
                    row["status"] = "ok"
                    print(f"  r={r} {b}: {m['median_ms']:.2f} ms (first call {m['first_call_s']:.1f} s)", flush=True)
                except Exception as exc:  # noqa: BLE001
                    row["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
                    print(f"  r={r} {b}: {row['status']}", flush=True)
                    _free(device)
                rows.append(row)
        del q, k, v
        _free(device)

    protocol = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": 1,
        "heads": args.heads,
        "head_dim": args.dim,
        "text_len": args.text_len,
        "grids": args.grid_list,
        "radii": args.radius_list,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "budget_s": args.budget_s,
        "elapsed_s": round(time.perf_counter() - start, 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "quick": bool(args.quick),
        "flex": "torch.compile(flex_attention, dynamic=False); BlockMask 128x128; tiled = 8x16 tiles",
        "reference_max_tokens": REFERENCE_MAX_TOKENS,
        "timing": "median of repeats after first call + warmup; first_call_s includes compilation",
    }
    out = Path(args.out)
    stem = "clear_attention_quick" if args.quick else "clear_attention"
    if args.merge and (out / f"{stem}.json").is_file():
        rows, skipped, protocol = _merge(json.loads((out / f"{stem}.json").read_text()), rows, skipped, protocol)
    atomic_write_json(out / f"{stem}.json", {"protocol": protocol, "rows": rows, "skipped": skipped})
    crossovers = args.crossovers or (None if (args.quick or device.type != "cpu") else str(CPU_TABLE))
    cases = []
    if crossovers and crossovers != "none":
        cases = cases_from_rows(rows, args.text_len)
        atomic_write_json(crossovers, {"source": f"{out / stem}.json", "device": protocol["device"],
                                       "torch": protocol["torch"], "date": protocol["date"],
                                       "rule": "no-grad shapes: the fastest exact backend of the nearest measured case",
                                       "cases": cases})
    md = [f"# CLEAR attention latency ({protocol['device']}, {protocol['dtype']}, {args.heads} heads x {args.dim}, "
          f"{args.text_len} text tokens)\n",
          f"{protocol['timing']}; speedup = full SDPA median / case median. Generated {protocol['date']}, "
          f"torch {protocol['torch']}, triton {protocol['triton']}, {protocol['threads']} threads.\n",
          markdown_table(rows, COLUMNS)]
    if cases:
        md += ["\n## What `auto` runs on a CPU without gradients\n",
               "The fastest exact backend per measured case (with gradients `auto` runs `reference`, the only CPU backend "
               "with a backward pass); a shape takes the choice of the nearest case.\n",
               markdown_table([{**c, "median_ms": ", ".join(f"{k} {v:g}" for k, v in c["median_ms"].items())} for c in cases],
                              ["grid", "text_len", "radius", "tokens", "ideal_flop_fraction", "best", "speedup_vs_reference",
                               "median_ms"])]
    if skipped:
        md += ["\n## Skipped\n", markdown_table(skipped, ["grid", "radius", "backend", "reason"])]
    atomic_write_text(out / f"{stem}.md", "\n".join(md))
    print(markdown_table(rows, COLUMNS))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {protocol['elapsed_s']} s")
    return rows, skipped


def _merge(old: dict, rows: list, skipped: list, protocol: dict):
    """This run's rows plus the earlier results' rows for cases it did not measure (rows without ``text_len``
    take their run's protocol value)."""
    old_len = old.get("protocol", {}).get("text_len")
    key = lambda r: (r["grid"], r.get("text_len", old_len), r.get("radius"), r["backend"])  # noqa: E731
    new_keys = {key(r) for r in rows}
    kept = [{**r, "text_len": r.get("text_len", old_len)} for r in old.get("rows", []) if key(r) not in new_keys]
    protocol = {**protocol, "merged_with": old.get("protocol")}
    return kept + rows, list(old.get("skipped", [])) + skipped, protocol


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
