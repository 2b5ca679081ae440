"""``fastgen demo``: the digits world end to end.

1. The shipped teachers (stock diffusers folders) sampled at 50 steps with CFG and scored
   (:func:`fastgen.zoo.check.check`).
2. An LCD student trained from the UNet teacher (recipe ``lcd-digits``), exported, reloaded with stock
   diffusers, sampled into a grid and scored against the teacher (:func:`fastgen.workflows.bench.run_quality`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["DEMO_RECIPE", "run_demo"]

DEMO_RECIPE = "lcd-digits"
GRID_PROMPTS = [f"a {c} handwritten digit {d}" for c, d in (("red", "seven"), ("blue", "three"), ("green", "zero"),
                                                            ("yellow", "five"))]


def run_demo(samples: int = 500, steps: int = 50, out: str | os.PathLike[str] = "runs/demo", root=None,
             skip_students: bool = False, log=print) -> Path:
    """Run the demo into ``out``; returns ``out``. ``samples``: images per pipeline for the tables;
    ``steps``: the teachers' sampling steps; ``root``: the artefacts folder (default: shipped);
    ``skip_students``: only the teachers' grids and table."""
    from fastgen.zoo.check import check, shipped_models

    t0 = time.time()
    out = Path(out)
    log("== fastgen demo: the digits world ==")
    log("Shipped teachers (stock diffusers pipeline folders):")
    for label, path in shipped_models(root):
        log(f"{label:40s} {path}")

    log(f"\n[1/2] Sampling both teachers (50 steps, CFG) and scoring {samples} images each...")
    check(samples=samples, steps=steps, out_dir=out, root=root, name="digits_teachers", seed=0)
    log((out / "digits_teachers.md").read_text())
    log(f"grids: {out}/digits_teachers_unet_grid.png, {out}/digits_teachers_dit_grid.png")
    t_teachers = time.time() - t0
    log(f"teachers done in {t_teachers:.0f} s")
    if skip_students:
        log(f"demo finished in {time.time() - t0:.0f} s")
        return out

    log(f"\n[2/2] LCD: training a 4-step student from the UNet teacher (recipe {DEMO_RECIPE})...")
    t1 = time.time()
    from fastgen.evaluation.bench import write_quality_report
    from fastgen.pipelines.sampling import load_exported, sample_grid
    from fastgen.workflows.bench import PipelineSpec, Suite, run_quality
    from fastgen.workflows.export import export_run
    from fastgen.workflows.train import train
    from fastgen.zoo import paths
    from fastgen.zoo.build import UNET_GUIDANCE, UNET_RESOLUTION

    run_dir = out / DEMO_RECIPE
    latest = run_dir / "checkpoints" / "latest"
    overrides = [f"output_dir={run_dir}", "train.eval_every=0", "train.progress=true"]
    train(DEMO_RECIPE, overrides, resume="latest" if latest.exists() else None)
    export_dir = export_run(run_dir, out / f"{DEMO_RECIPE}-export", overwrite=True)
    log(f"trained and exported in {time.time() - t1:.0f} s -> {export_dir}")
    pipe, _ = load_exported(export_dir)  # stock DiffusionPipeline.from_pretrained
    log(f"reloaded with stock diffusers: {type(pipe).__name__} + {type(pipe.scheduler).__name__}")
    grid = sample_grid(pipe, GRID_PROMPTS, steps=4, guidance=UNET_GUIDANCE, seed=0, num_images=6,
                       out=out / "lcd_student_4step_grid.png", height=UNET_RESOLUTION, width=UNET_RESOLUTION)
    log(f"4-step student grid: {grid}")
    suite = Suite("demo_quality", [PipelineSpec("teacher", str(paths.sd_teacher(root)), steps=[50], guidance=UNET_GUIDANCE,
                                                height=UNET_RESOLUTION),
                                   PipelineSpec("lcd", str(export_dir), steps=[1, 2, 4], guidance=UNET_GUIDANCE,
                                                height=UNET_RESOLUTION)], samples=samples)
    write_quality_report(run_quality(suite, log), out, "demo_quality", "Demo: UNet teacher vs LCD student")
    log((out / "demo_quality.md").read_text())
    log(f"students done in {time.time() - t1:.0f} s (teachers {t_teachers:.0f} s)")
    log(f"demo finished in {time.time() - t0:.0f} s")
    return out
