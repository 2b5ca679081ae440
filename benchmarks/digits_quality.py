"""Digits-world quality suite: the shipped UNet teacher at 50 steps vs its LCD students.

Trains the students from their packaged recipes when their run folders are absent (reuses
``runs/<name>`` when present), exports them, samples every pipeline with stock diffusers under
one protocol and writes ``benchmarks/results/digits_quality.{json,md}`` + a plot.

    python benchmarks/digits_quality.py [--samples 1000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastgen.evaluation.digits_quality import Entry, evaluate_entries, write_report  # noqa: E402
from fastgen.zoo import paths  # noqa: E402
from fastgen.zoo.build import UNET_GUIDANCE, UNET_RESOLUTION  # noqa: E402

STUDENTS = {
    # method label: (recipe, pipeline guidance_scale at sampling)
    "lcd": ("lcd-digits", UNET_GUIDANCE),  # guidance embedded in the student (w = g - 1)
    "lcd-lora": ("lcd-lora-digits", 1.0),  # guidance baked into the LoRA
}


def _finished(run_dir: Path) -> bool:
    import json

    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    return state.get("step", 0) >= cfg["train"]["max_steps"]


def ensure_student(recipe: str, runs: Path, exports: Path) -> Path:
    from fastgen.pipelines import export_run
    from fastgen.trainers.run import train

    run_dir = runs / recipe
    done = run_dir / "checkpoints" / "latest"
    if not done.exists() or not _finished(run_dir):
        # train from the recipe, or finish an interrupted run
        train(recipe, [f"output_dir={run_dir}"], resume="latest" if done.exists() else None)
    out = exports / recipe
    export_run(run_dir, out, overwrite=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="digits_quality")
    args = p.parse_args(argv)
    runs, exports = Path(args.runs), Path(args.runs) / "exports"
    entries = [Entry("teacher", str(paths.sd_teacher()), [50], UNET_GUIDANCE, height=UNET_RESOLUTION)]
    for label, (recipe, guidance) in STUDENTS.items():
        entries.append(Entry(label, str(ensure_student(recipe, runs, exports)), args.steps, guidance, height=UNET_RESOLUTION))
    result = evaluate_entries(entries, samples=args.samples, seed=args.seed)
    write_report(result, args.out, args.name, "Digits-world quality: UNet teacher vs LCD students")
    print(Path(args.out, f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
