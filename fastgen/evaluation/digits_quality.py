"""Digits-world quality of teachers and students under one protocol.

Every pipeline (teacher or exported student) is sampled through stock diffusers with the same
prompts (canonical captions, balanced over the 60 digit/colour pairs), the same seeds and the same
batch split, then scored by the digits classifier: digit and colour accuracy and the digits-FID
against the held-out reference set. Results: ``<name>.json`` (rows + protocol), ``<name>.md`` and
a quality-vs-steps plot.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgen.data import digits as dw
from fastgen.evaluation.digits_metrics import DigitsEvaluator
from fastgen.evaluation.reports import atomic_write_text, markdown_table, write_json

COLUMNS = ["method", "steps", "guidance", "digits_fid", "digit_accuracy", "colour_accuracy", "samples", "seconds"]


@dataclass
class Entry:
    """One pipeline to score: ``method`` label, the folder ``fastgen sample`` accepts, step counts, guidance."""

    method: str
    folder: str
    steps: list[int]
    guidance: float
    height: int | None = None
    extra: dict = field(default_factory=dict)


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


@torch.no_grad()
def sample_pipeline(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch_size: int = 250,
                    height: int | None = None, negative_prompt: str | None = None, **kwargs) -> torch.Tensor:
    """Images in [0,1] from any stock text-to-image pipeline, one seeded generator per batch.

    ``negative_prompt`` is repeated for every prompt of a batch (FluxPipeline's true CFG needs one per prompt).
    """
    out = []
    pipe.set_progress_bar_config(disable=True)
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator().manual_seed(seed + i)
        chunk = prompts[i : i + batch_size]
        kw = dict(kwargs)
        if height:
            kw.update(height=height, width=height)
        if negative_prompt is not None:
            kw["negative_prompt"] = [negative_prompt] * len(chunk)
        res = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="pt", **kw)
        out.append(res.images.float().cpu())
    return torch.cat(out)


def evaluate_entries(entries: list[Entry], samples: int = 1000, seed: int = 0, classifier_root=None) -> dict:
    """Score every entry at each of its step counts; returns ``{"rows": [...], "protocol": {...}}``."""
    from fastgen.pipelines.sampling import load_exported
    from fastgen.zoo import paths

    classifier = paths.load_classifier(classifier_root)
    evaluator = DigitsEvaluator(classifier)
    prompts, digits, colours = dw.eval_prompts(samples, seed=seed)
    rows = []
    for entry in entries:
        pipe, _ = load_exported(entry.folder)
        for steps in entry.steps:
            t0 = time.time()
            images = sample_pipeline(pipe, prompts, steps, entry.guidance, seed, height=entry.height, **entry.extra)
            seconds = time.time() - t0
            row = {"method": entry.method, "steps": steps, "guidance": entry.guidance,
                   **evaluator.score(images, digits, colours).as_dict(), "seconds": round(seconds, 1)}
            print(f"[quality] {row}", flush=True)
            rows.append(row)
    protocol = {
        "prompts": "canonical digits captions balanced over 60 (digit, colour) pairs",
        "prompts_sha256_16": prompts_hash(prompts),
        "seed": seed,
        "batch_size": 250,
        "feature_extractor": "digits classifier penultimate features (64-d); images quantised to 8 bits",
        "fid_reference": "digits held-out split, every colour",
        "real_vs_real_fid_floor": round(evaluator.real_floor(), 3),
        "backend": "scipy.linalg.sqrtm (float64)",
        "torch": torch.__version__,
        "fastgen_commit": _git_commit(),
    }
    return {"rows": rows, "protocol": protocol}


def write_report(result: dict, out_dir: str | Path, name: str = "digits_quality", title: str = "Digits-world quality") -> None:
    """JSON + markdown table + digits-FID-vs-steps plot."""
    out_dir = Path(out_dir)
    write_json(out_dir / f"{name}.json", result)
    proto = result["protocol"]
    md = [f"# {title}\n\n",
          f"Same prompts (sha256/16 `{proto['prompts_sha256_16']}`), seed {proto['seed']}, stock diffusers pipelines. "
          f"digits-FID real-vs-real floor: {proto['real_vs_real_fid_floor']}. Commit `{proto['fastgen_commit']}`.\n\n",
          markdown_table(result["rows"], COLUMNS)]
    atomic_write_text(out_dir / f"{name}.md", "".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    methods = sorted({r["method"] for r in result["rows"]}, key=lambda m: [r["method"] for r in result["rows"]].index(m))
    for m in methods:
        rs = sorted((r for r in result["rows"] if r["method"] == m), key=lambda r: r["steps"])
        if len(rs) == 1:
            ax.axhline(rs[0]["digits_fid"], ls="--", lw=1, label=f"{m} ({rs[0]['steps']} steps)")
        else:
            ax.plot([r["steps"] for r in rs], [r["digits_fid"] for r in rs], marker="o", label=m)
    ax.axhline(proto["real_vs_real_fid_floor"], color="grey", lw=0.8, ls=":", label="real-vs-real floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("digits-FID (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out_dir / f".{name}_fid_vs_steps.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_dir / f"{name}_fid_vs_steps.png")
