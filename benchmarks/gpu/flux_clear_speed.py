"""Whole-transformer latency of the FLUX.1 architecture (random weights): full attention vs CLEAR.

Usage (one call on a GPU machine; ``benchmarks/gpu/run.sh`` wraps it)::

    python benchmarks/gpu/flux_clear_speed.py [--out DIR] [--device cuda] [--dtype bfloat16]
        [--resolutions 1024,2048,4096] [--radii 16] [--backends full,triton,flex_tiled]
        [--warmup 1] [--repeats 3] [--budget-s 200]
    python benchmarks/gpu/flux_clear_speed.py --tiny --device cpu --out /tmp/flux_quick   # CPU smoke run

Nothing is downloaded. The transformer is a diffusers ``FluxTransformer2DModel`` with FLUX.1-dev's
configuration (19 double-stream + 38 single-stream blocks, 24 heads x 128, joint attention dim 4096,
pooled dim 768, guidance embedding, RoPE axes 16/56/56; about 11.9B parameters, ~24 GB in bf16) and
random weights: latency depends on the architecture, dtype, token count and kernels, not on the
weights' values. ``--tiny`` swaps in a 2 + 2 block, 2 x 64 model for CPU smoke runs.

One measured call = one denoising step of FLUX.1-dev at batch 1 (guidance-distilled: no CFG batch):
``transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
guidance)`` under ``torch.inference_mode``, with ``(res/16)^2`` image tokens (VAE factor 8, then 2 x 2
packing: 4,096 / 16,384 / 65,536 tokens at 1024 / 2048 / 4096 px) and ``--text-len`` text tokens
(512, FLUX.1-dev's T5 length).

Cases per resolution: ``full`` (diffusers' stock ``FluxAttnProcessor``: SDPA without a mask), then for
each radius ``r`` the same transformer after :func:`fastgen.attention.apply_clear` with

* ``triton``: the fused band-limited CLEAR kernel (raster token order);
* ``flex_tiled``: compiled FlexAttention with the CLEAR BlockMask over 8 x 16 tile-permuted tokens;
* ``flex``: the same in raster order; ``reference``: SDPA with the dense mask (small grids only).

Timing: one first call (``first_call_s``: compilation, mask build), ``--warmup`` untimed calls, then
``--repeats`` timed calls with ``torch.cuda.synchronize`` around each; ``median_ms`` is their median and
``speedup_vs_full`` the full-attention median at the same resolution over the case's. Each row carries
the ideal attention FLOP fraction of the CLEAR pattern (exact allowed pairs / N^2) and the fraction the
kernel executes (triton: KV tiles visited; flex: 128 x 128 blocks), plus a simple whole-model FLOP
estimate (``model_flop_fraction``: linear layers 2 x params x tokens, attention 4 x N^2 x D per block).

Budget: ``--budget-s`` stops starting new cases once spent (listed under ``skipped``). Results are
rewritten atomically after every case: ``<out>/flux_clear_speed.json`` (``environment``, ``settings``,
``rows``, ``skipped``, ``errors``) and ``<out>/flux_clear_speed.md``. A failing case (out of memory, a
compile error) leaves a row with ``status: error ...`` and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from statistics import median
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fastgen.models.architectures import FLUX_DEV_TRANSFORMER  # noqa: E402

FLUX_DEV = FLUX_DEV_TRANSFORMER
TINY = dict(FLUX_DEV, num_layers=2, num_single_layers=2, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 28, 28))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLEAR_BACKENDS = ("triton", "flex", "flex_tiled", "reference")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--resolutions", default=None, help="pixel sides, comma separated (default 1024,2048,4096; "
                    "--tiny: 256,512)")
    ap.add_argument("--radii", default=None, help="CLEAR radii in tokens (default 16; --tiny: 4)")
    ap.add_argument("--backends", default=None, help="full plus CLEAR backends among "
                    f"{','.join(CLEAR_BACKENDS)} (default full,triton,flex_tiled; CPU: full,reference,flex_tiled)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default 512; --tiny: 32)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--tiny", action="store_true", help="a 2 + 2 block, 2 x 64 transformer (CPU smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/gpu")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.resolutions = _int_list(args.resolutions or ("256,512" if args.tiny else "1024,2048,4096"))
    args.radii = _int_list(args.radii or ("4" if args.tiny else "16"))
    default_backends = "full,reference,flex_tiled" if cpu else "full,triton,flex_tiled"
    args.backends = [b.strip() for b in (args.backends or default_backends).split(",") if b.strip()]
    bad = [b for b in args.backends if b != "full" and b not in CLEAR_BACKENDS]
    if bad:
        ap.error(f"unknown backend(s) {bad}; choose among full,{','.join(CLEAR_BACKENDS)}")
    args.text_len = args.text_len if args.text_len is not None else (32 if args.tiny else 512)
    for res in args.resolutions:
        if res % 16:
            ap.error(f"resolution {res} is not a multiple of 16 (VAE factor 8 x 2x2 packing)")
    return args


def build_transformer(config: dict, device: str, dtype: torch.dtype, seed: int):
    """A random-weight FluxTransformer2DModel built directly on ``device`` in ``dtype``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_inputs(config: dict, resolution: int, text_len: int, device: str, dtype: torch.dtype, seed: int) -> dict:
    side = resolution // 16
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_img = side * side
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    img_ids = torch.stack([torch.zeros(n_img, dtype=torch.long), rows, cols], dim=1).float()

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    inputs = dict(
        hidden_states=rand(1, n_img, config["in_channels"]),
        encoder_hidden_states=rand(1, text_len, config["joint_attention_dim"]),
        pooled_projections=rand(1, config["pooled_projection_dim"]),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids.to(device),
        txt_ids=torch.zeros(text_len, 3, device=device),
        return_dict=False,
    )
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    return inputs


def model_flop_fraction(config: dict, linear_params: int, n_img: int, text_len: int, attn_fraction: float) -> dict:
    """Whole-transformer FLOPs with CLEAR over FLOPs with full attention (simple model, see module doc)."""
    blocks = config["num_layers"] + config["num_single_layers"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    n = n_img + text_len
    linear = 2.0 * linear_params * n
    attention = 4.0 * n * n * dim * blocks
    return {
        "attention_share_full": attention / (linear + attention),
        "model_flop_fraction": (linear + attention * attn_fraction) / (linear + attention),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, warmup: int, repeats: int) -> dict:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"first_call_s": first, "median_ms": median(times), "min_ms": min(times),
            "times_ms": [round(t, 3) for t in times]}


def environment(device: str) -> dict[str, Any]:
    import platform

    import diffusers

    env: dict[str, Any] = {
        "device": device, "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "cuda_runtime": torch.version.cuda, "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        env["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        env["gpu"] = None
        env["cpu"] = f"{platform.machine()}, {os.cpu_count()} cores"
    return env


COLUMNS = ["resolution", "image_tokens", "case", "radius", "median_ms", "speedup_vs_full", "first_call_s",
           "attn_ideal_fraction", "attn_executed_fraction", "model_flop_fraction", "peak_mem_gib", "status"]


def write_results(out: Path, report: dict) -> None:
    from fastgen.evaluation.reports import atomic_write_text, markdown_table, write_json

    write_json(out / "flux_clear_speed.json", report)
    env, s = report["environment"], report["settings"]
    lines = [
        "# FLUX.1-dev architecture (random weights): one transformer step, full attention vs CLEAR",
        "",
        f"{env.get('gpu') or env.get('cpu')}, {s['dtype']}, batch 1, {s['text_len']} text tokens, "
        f"{s['parameters'] / 1e6:,.1f}M parameters, torch {env['torch']}, diffusers {env['diffusers']}; "
        f"median of {s['repeats']} calls after {s['warmup']} warm-up; speedup = full-attention median / case median.",
        "",
        markdown_table(report["rows"], COLUMNS),
    ]
    if report["skipped"]:
        lines += ["", "Skipped (budget): " + ", ".join(report["skipped"])]
    if report["errors"]:
        lines += ["", "Errors:"] + [f"- {e['case']}: {e['error'].splitlines()[-1]}" for e in report["errors"]]
    atomic_write_text(out / "flux_clear_speed.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    from fastgen.attention import apply_clear
    from fastgen.attention.backends import triton_executed_fraction
    from fastgen.attention.mask import executed_block_fraction, flop_fraction

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = args.device, DTYPES[args.dtype]
    config = TINY if args.tiny else FLUX_DEV
    start = time.perf_counter()
    print(f"[flux] building {'tiny' if args.tiny else 'FLUX.1-dev'} transformer on {device} ({args.dtype})", flush=True)
    model = build_transformer(config, device, dtype, args.seed)
    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    stock = dict(model.attn_processors)
    report = {
        "environment": environment(device),
        "settings": {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "parameters": params, "dtype": args.dtype, "text_len": args.text_len, "resolutions": args.resolutions,
            "radii": args.radii, "backends": args.backends, "warmup": args.warmup, "repeats": args.repeats,
            "budget_s": args.budget_s, "build_s": round(time.perf_counter() - start, 2),
            "flex_tile": [8, 16], "flex_block": 128,
        },
        "rows": [], "skipped": [], "errors": [],
    }
    print(f"[flux] {params / 1e6:,.1f}M parameters, built in {report['settings']['build_s']} s", flush=True)

    for res in args.resolutions:
        side = res // 16
        n_img = side * side
        try:
            inputs = make_inputs(config, res, args.text_len, device, dtype, args.seed)
        except torch.OutOfMemoryError as exc:
            report["errors"].append({"case": f"{res}px inputs", "error": repr(exc)})
            break
        full_ms = None
        cases = [("full", None)] + [(b, r) for r in args.radii for b in args.backends if b != "full"]
        if "full" not in args.backends:
            cases = cases[1:]
        for backend, radius in cases:
            label = f"{res}px {backend}" + (f" r={radius}" if radius else "")
            if time.perf_counter() - start > args.budget_s:
                report["skipped"].append(label)
                continue
            row: dict[str, Any] = {"resolution": res, "image_tokens": n_img, "case": backend, "radius": radius}
            if radius is not None:
                frac = flop_fraction(side, side, args.text_len, radius)
                row["attn_ideal_fraction"] = frac["ideal"]
                if backend == "triton":
                    vis = triton_executed_fraction(side, side, args.text_len, radius,
                                                   head_dim=config["attention_head_dim"])
                    row["attn_executed_fraction"] = vis["visited"] / vis["total"]
                elif backend.startswith("flex"):
                    row["attn_executed_fraction"] = executed_block_fraction(
                        side, side, args.text_len, radius, block=128,
                        order="tiled" if backend == "flex_tiled" else "raster", tile=(8, 16))
                else:
                    row["attn_executed_fraction"] = 1.0  # dense masked SDPA computes every pair
                row.update(model_flop_fraction(config, linear_params, n_img, args.text_len,
                                               row["attn_executed_fraction"]))
            else:
                row.update(model_flop_fraction(config, linear_params, n_img, args.text_len, 1.0))
            if backend == "triton" and not device.startswith("cuda"):
                row["status"] = "not run: triton needs CUDA (the CPU interpreter is ~1000x slower)"
                report["rows"].append(row)
                write_results(out, report)
                continue
            try:
                if radius is None:
                    model.set_attn_processor(dict(stock))
                else:
                    kw = {"permute": True, "tile": (8, 16)} if backend == "flex_tiled" else {}
                    apply_clear(model, radius, backend="flex" if backend.startswith("flex") else backend, **kw)
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    row.update(measure(lambda: model(**inputs), device, args.warmup, args.repeats))
                if device.startswith("cuda"):
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                row["status"] = "ok"
                if radius is None:
                    full_ms = row["median_ms"]
                row["speedup_vs_full"] = (full_ms / row["median_ms"]) if full_ms else None
            except Exception as exc:  # noqa: BLE001 - keep measuring the other cases
                row["status"] = f"error: {type(exc).__name__}"
                report["errors"].append({"case": label, "error": traceback.format_exc(limit=3)})
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            print(f"[flux] {label}: {row.get('median_ms', float('nan')):.1f} ms ({row['status']})", flush=True)
            report["rows"].append(row)
            write_results(out, report)
        del inputs
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report["settings"]["elapsed_s"] = round(time.perf_counter() - start, 2)
    write_results(out, report)
    print((out / "flux_clear_speed.md").read_text())
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
