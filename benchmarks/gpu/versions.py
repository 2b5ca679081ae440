"""The first step of ``benchmarks/gpu/run.sh``: what the GPU steps will run on, and that it imports.

    python benchmarks/gpu/versions.py [--out DIR] [--expect-site DIR]

Prints (and writes ``<out>/versions.json``) the Python, the versions and import locations of torch,
triton, transformers, diffusers, huggingface_hub, accelerate, peft, safetensors, tokenizers, numpy and
torchmetrics, what torch sees of the GPU, and the fastgen checkout; then imports every fastgen module
the step scripts import (:func:`step_modules`, read from their source) and the step scripts
themselves (top level only: their ``main`` does not run). ``--expect-site DIR``: diffusers must be
imported from ``DIR`` (the bundle that run.sh installed), fastgen from this checkout.

Exit code 1 when an import fails or an expectation does not hold, so that run.sh stops before its
steps spend the machine's time.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: The scripts run.sh runs (its steps), relative to the repository root.
STEP_SCRIPTS = (
    "benchmarks/gpu/sd15_speed.py",
    "benchmarks/clear_attention.py",
    "benchmarks/gpu/flux_clear_speed.py",
    "benchmarks/train_throughput.py",
)
PACKAGES = ("torch", "triton", "transformers", "diffusers", "huggingface_hub", "accelerate", "peft", "safetensors",
            "tokenizers", "numpy", "torchmetrics")


def step_modules(scripts=STEP_SCRIPTS, root: Path = ROOT) -> list[str]:
    """Every ``fastgen`` module the step scripts import, at top level or inside functions (from their AST)."""
    found: set[str] = set()
    for rel in scripts:
        tree = ast.parse((Path(root) / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "fastgen":
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "fastgen")
    return sorted(found)


def _package(name: str) -> dict[str, Any]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report every failure
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"version": getattr(mod, "__version__", None), "file": getattr(mod, "__file__", None)}


def _gpu() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), count=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    return info


def _load_script(rel: str) -> None:
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(f"_gpu_step_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _under(file: str | None, folder: str | os.PathLike) -> bool:
    if not file:
        return False
    return os.path.commonpath([os.path.realpath(file), os.path.realpath(folder)]) == os.path.realpath(folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write versions.json here")
    ap.add_argument("--expect-site", default=None, help="diffusers must come from this folder (the installed bundle)")
    args = ap.parse_args(argv)

    report: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "pythonpath": os.environ.get("PYTHONPATH", ""),
        "packages": {name: _package(name) for name in PACKAGES},
    }
    problems: list[str] = []
    try:
        report["gpu"] = _gpu()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"torch: {exc}")
    import fastgen

    report["fastgen"] = {"file": fastgen.__file__}
    if not _under(fastgen.__file__, ROOT):
        problems.append(f"fastgen imported from {fastgen.__file__}, not from this checkout {ROOT}")
    if args.expect_site and not _under(report["packages"]["diffusers"].get("file"), args.expect_site):
        problems.append(f"diffusers imported from {report['packages']['diffusers'].get('file')}, "
                        f"not from the installed bundle {args.expect_site}")
    imports: dict[str, str] = {}
    for name in step_modules():
        try:
            importlib.import_module(name)
            imports[name] = "ok"
        except Exception as exc:  # noqa: BLE001
            imports[name] = f"{type(exc).__name__}: {exc}"
            problems.append(f"import {name}: {imports[name]}\n{traceback.format_exc(limit=6)}")
    for rel in STEP_SCRIPTS:
        try:
            _load_script(rel)
            imports[rel] = "ok"
        except Exception as exc:  # noqa: BLE001
            imports[rel] = f"{type(exc).__name__}: {exc}"
            problems.append(f"load {rel}: {imports[rel]}\n{traceback.format_exc(limit=6)}")
    report["imports"] = imports
    report["problems"] = problems

    print(f"python {report['python']} ({sys.executable}); {report['platform']}; {os.cpu_count()} CPUs")
    for name, info in report["packages"].items():
        print(f"  {name:16s} {info.get('version') or info.get('error')}  {info.get('file') or ''}")
    print(f"  {'fastgen':16s} {fastgen.__file__}")
    print(f"gpu: {report.get('gpu')}")
    print(f"imports: {sum(v == 'ok' for v in imports.values())}/{len(imports)} ok")
    for p in problems:
        print(f"PROBLEM: {p}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "versions.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
