"""Paired high-frequency-energy comparison of students against a baseline on the same prompts and noise.

Every pipeline samples the same 1000 digits prompts with the same seeds, so per-image differences
against the baseline are paired; the paired t statistic says whether an hf_energy rise is beyond noise.

    python benchmarks/paired_hf_energy.py --baseline lcd=runs/exports/lcd-digits \\
        --pipeline rg-lcd-direct-beta1=runs/exports/rg-lcd-digits-direct-b1 ... --steps 2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fastgen.data import digits as dw  # noqa: E402
from fastgen.evaluation.bench import git_commit, load_pipeline_for_bench, sample_pipeline  # noqa: E402
from fastgen.evaluation.hf_energy import hf_energy  # noqa: E402
from fastgen.evaluation.presets import prompts_sha  # noqa: E402
from fastgen.evaluation.reports import markdown_table  # noqa: E402
from fastgen.io import atomic_write_json, atomic_write_text  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="LABEL=FOLDER")
    p.add_argument("--pipeline", action="append", required=True, help="LABEL=FOLDER (repeatable)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="rg_lcd_hf_energy_paired")
    args = p.parse_args(argv)
    prompts, _, _ = dw.eval_prompts(args.samples, seed=args.seed)
    specs = [args.baseline, *args.pipeline]
    values = {}
    for spec in specs:
        label, folder = spec.split("=", 1)
        pipe = load_pipeline_for_bench(Path(folder))
        values[label] = hf_energy(sample_pipeline(pipe, prompts, args.steps, args.guidance, args.seed, height=32))
    base_label = args.baseline.split("=", 1)[0]
    base = values[base_label]
    rows = []
    for label, v in values.items():
        diff = v - base
        t = float(diff.mean() / (diff.std() / len(diff) ** 0.5)) if label != base_label else 0.0
        rows.append({"pipeline": label, "steps": args.steps, "hf_energy": round(float(v.mean()), 5),
                     "relative_to_baseline": round(float(v.mean() / base.mean() - 1), 4), "paired_t": round(t, 2),
                     "share_of_images_higher": round(float((diff > 0).float().mean()), 3) if label != base_label else None})
    protocol = {"baseline": base_label, "prompts_sha256_16": prompts_sha(prompts), "samples": args.samples, "seed": args.seed,
                "steps": args.steps, "guidance": args.guidance, "torch": torch.__version__, "fastgen_commit": git_commit(),
                "statistic": "paired t of per-image hf_energy differences vs the baseline (|t| > 3: beyond noise)"}
    atomic_write_json(Path(args.out) / f"{args.name}.json", {"rows": rows, "protocol": protocol})
    cols = ["pipeline", "steps", "hf_energy", "relative_to_baseline", "paired_t", "share_of_images_higher"]
    md = (f"# Paired hf_energy vs `{base_label}` ({args.samples} prompts, same seeds, {args.steps} steps)\n\n"
          + markdown_table(rows, cols) + f"\n{protocol['statistic']}; commit `{protocol['fastgen_commit']}`.\n")
    atomic_write_text(Path(args.out) / f"{args.name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
