"""``fastgen demo``: the digits world end to end, in a few minutes on a laptop CPU.

1. The shipped teachers (stock diffusers folders), UNet and DiT, sampled once each at 50 steps with
   CFG and scored (:func:`fastgen.zoo.check.check`).
2. An LCD student trained from the UNet teacher (recipe ``lcd-digits``), exported, reloaded with stock
   diffusers, sampled into a grid and scored against the teacher
   (:func:`fastgen.workflows.bench.run_quality`). The teacher's row reuses the images of step 1: the same
   prompts, seeds and batch split as the student's rows, so it is not sampled twice.

The demo is a first look: its tables use :data:`DEMO_TABLE_SAMPLES` images per pipeline (the tables say
so); ``make bench`` is the measurement (1000 per pipeline, every student, the speed table). Every long
loop shows a progress bar on stderr (images done / total, images/s; training steps); ``progress=False``
or ``TQDM_DISABLE=1`` turns them off.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["DEMO_RECIPE", "DEMO_TABLE_SAMPLES", "DEMO_TRAIN_OVERRIDES", "run_demo"]

DEMO_RECIPE = "lcd-digits"
#: Images per pipeline in the demo's tables at most (``samples`` above it is capped; ``table_samples=None``: no cap).
DEMO_TABLE_SAMPLES = 200
#: Recipe overrides of the demo's training run (the recipe file itself is what ``make bench`` trains).
DEMO_TRAIN_OVERRIDES: tuple[str, ...] = ("train.eval_every=0",)
GRID_PROMPTS = [f"a {c} handwritten digit {d}" for c, d in (("red", "seven"), ("blue", "three"), ("green", "zero"),
                                                            ("yellow", "five"))]


def _table_note(n: int, asked: int) -> str:
    capped = f" (capped from {asked})" if n < asked else ""
    return (f"Demo: {n} images per pipeline{capped}, seed 0. A first look, not the measurement: digits-FID falls as "
            f"the sample count grows, so compare it only within one table; `make bench` measures 1000 images per "
            f"pipeline, every student and the sampling speed.")


def run_demo(samples: int = 500, steps: int = 50, out: str | os.PathLike[str] = "runs/demo", root=None,
             skip_students: bool = False, log=print, table_samples: int | None = DEMO_TABLE_SAMPLES,
             progress: bool = True, train_overrides: tuple[str, ...] | list[str] = DEMO_TRAIN_OVERRIDES) -> Path:
    """Run the demo into ``out``; returns ``out``.

    ``samples``: images per pipeline for the tables, at most ``table_samples`` (``None``: no cap);
    ``steps``: the teachers' sampling steps; ``root``: the artefacts folder (default: shipped);
    ``skip_students``: only the teachers' grids and table; ``progress``: progress bars on stderr;
    ``train_overrides``: recipe overrides of the student's training (printed when they change the recipe).
    """
    from fastgen.zoo.check import check, shipped_models

    t0 = time.time()
    out = Path(out)
    n = min(samples, table_samples) if table_samples else samples
    note = _table_note(n, samples)
    log("== fastgen demo: the digits world ==")
    log("Shipped teachers (stock diffusers pipeline folders):")
    for label, path in shipped_models(root):
        log(f"{label:40s} {path}")

    log(f"\n[1/2] Sampling both teachers ({steps} steps, CFG) and scoring {n} images each...")
    if n < samples:
        log(f"(the demo's tables use {n} images per pipeline, not {samples}: a first look; `make bench` is the measurement)")
    teachers = check(samples=n, steps=steps, out_dir=out, root=root, name="digits_teachers", seed=0, progress=progress,
                     keep_images=not skip_students, note=note)
    log((out / "digits_teachers.md").read_text())
    log(f"grids: {out}/digits_teachers_unet_grid.png, {out}/digits_teachers_dit_grid.png")
    t_teachers = time.time() - t0
    log(f"teachers done in {t_teachers:.0f} s")
    if skip_students:
        log(f"demo finished in {time.time() - t0:.0f} s")
        return out

    log(f"\n[2/2] LCD: training a 4-step student from the UNet teacher (recipe {DEMO_RECIPE})...")
    changed = [o for o in train_overrides if not o.startswith(("train.eval_every=", "train.progress="))]
    if changed:
        log(f"(demo overrides of the recipe: {' '.join(changed)}; `make bench` trains the recipe as written)")
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
    overrides = [f"output_dir={run_dir}", *train_overrides, f"train.progress={'true' if progress else 'false'}"]
    train(DEMO_RECIPE, overrides, resume="latest" if latest.exists() else None)
    export_dir = export_run(run_dir, out / f"{DEMO_RECIPE}-export", overwrite=True)
    log(f"trained and exported in {time.time() - t1:.0f} s -> {export_dir}")
    pipe, _ = load_exported(export_dir)  # stock DiffusionPipeline.from_pretrained
    log(f"reloaded with stock diffusers: {type(pipe).__name__} + {type(pipe.scheduler).__name__}")
    grid = sample_grid(pipe, GRID_PROMPTS, steps=4, guidance=UNET_GUIDANCE, seed=0, num_images=6,
                       out=out / "lcd_student_4step_grid.png", height=UNET_RESOLUTION, width=UNET_RESOLUTION,
                       progress=progress)
    del pipe
    log(f"4-step student grid: {grid}")
    # the teacher's row: the images sampled for the teachers' table (same prompts, seeds and batch split)
    suite = Suite("demo_quality", [PipelineSpec("teacher", str(paths.sd_teacher(root)), steps=[steps], guidance=UNET_GUIDANCE,
                                                height=UNET_RESOLUTION),
                                   PipelineSpec("lcd", str(export_dir), steps=[1, 2, 4], guidance=UNET_GUIDANCE,
                                                height=UNET_RESOLUTION)], samples=n, seed=0, progress=progress)
    reuse = {f"teacher@{steps}": {"images": teachers["_images"]["unet_teacher"],
                                  "seconds": teachers["_seconds"]["unet_teacher"],
                                  "source": "reused: the UNet teacher's samples of the teachers' table"}}
    result = run_quality(suite, log, reuse=reuse)
    write_quality_report(result, out, "demo_quality", "Demo: UNet teacher vs LCD student", note=note)
    log((out / "demo_quality.md").read_text())
    log(f"students done in {time.time() - t1:.0f} s (teachers {t_teachers:.0f} s)")
    log(f"demo finished in {time.time() - t0:.0f} s")
    return out
