"""The ``fastgen`` command line: thin parsing on top of the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _zoo_build(args) -> int:
    from fastgen.config import load_config
    from fastgen.zoo.build import BuildConfig, build

    base = {"quick": args.quick, "work_dir": args.work_dir, "out_dir": args.out or ""}
    cfg = load_config(BuildConfig, args.config, overrides=args.overrides, base=base)
    build(cfg, rebuild=tuple(args.rebuild or ()))
    return 0


def _zoo_check(args) -> int:
    from fastgen.zoo.check import check

    t0 = time.time()
    result = check(samples=args.samples, steps=args.steps, out_dir=args.out, root=args.root, name=args.name, seed=args.seed)
    for key in ("unet_teacher", "dit_teacher"):
        print(f"{key}: {result[key]}")
    print(f"vae: {result['vae']}  vae_f2: {result['vae_f2']}")
    print(f"classifier: {result['classifier']}")
    print(f"wrote {args.out}/{args.name}.json and .md in {time.time() - t0:.0f} s")
    return 0


def _zoo_where(args) -> int:
    from fastgen.zoo import paths

    for label, fn in (("UNet teacher (StableDiffusionPipeline)", paths.sd_teacher),
                      ("DiT teacher (FluxPipeline)", paths.flux_teacher),
                      ("digits classifier", paths.classifier)):
        print(f"{label:40s} {fn(args.root)}")
    return 0


def _demo(args) -> int:
    """The digits-world demo: teachers, then an LCD student trained, exported and reloaded."""
    from pathlib import Path

    from fastgen.zoo.check import check

    t0 = time.time()
    out = Path(args.out)
    print("== fastgen demo: the digits world ==")
    print("Shipped teachers (stock diffusers pipeline folders):")
    _zoo_where(args)

    print(f"\n[1/2] Sampling both teachers (50 steps, CFG) and scoring {args.samples} images each...")
    check(samples=args.samples, steps=args.steps, out_dir=out, root=args.root, name="digits_teachers", seed=0)
    print((out / "digits_teachers.md").read_text())
    print(f"grids: {out}/digits_teachers_unet_grid.png, {out}/digits_teachers_dit_grid.png")
    t_teachers = time.time() - t0
    print(f"teachers done in {t_teachers:.0f} s")
    if args.skip_students:
        print(f"demo finished in {time.time() - t0:.0f} s")
        return 0

    print("\n[2/2] LCD: training a 4-step student from the UNet teacher (recipe lcd-digits)...")
    t1 = time.time()
    from fastgen.evaluation.digits_quality import Entry, evaluate_entries, write_report
    from fastgen.pipelines import export_run
    from fastgen.pipelines.sampling import load_exported, sample_grid
    from fastgen.trainers.run import train
    from fastgen.zoo import paths
    from fastgen.zoo.build import UNET_GUIDANCE, UNET_RESOLUTION

    run_dir = out / "lcd-digits"
    latest = run_dir / "checkpoints" / "latest"
    overrides = [f"output_dir={run_dir}", "train.eval_every=0", "train.progress=true"]
    train("lcd-digits", overrides, resume="latest" if latest.exists() else None)
    export_dir = export_run(run_dir, out / "lcd-digits-export", overwrite=True)
    print(f"trained and exported in {time.time() - t1:.0f} s -> {export_dir}")
    pipe, kind = load_exported(export_dir)  # stock DiffusionPipeline.from_pretrained
    print(f"reloaded with stock diffusers: {type(pipe).__name__} + {type(pipe.scheduler).__name__}")
    prompts = [f"a {c} handwritten digit {d}" for c, d in (("red", "seven"), ("blue", "three"), ("green", "zero"), ("yellow", "five"))]
    grid = sample_grid(pipe, prompts, steps=4, guidance=UNET_GUIDANCE, seed=0, num_images=6,
                       out=out / "lcd_student_4step_grid.png", height=UNET_RESOLUTION, width=UNET_RESOLUTION)
    print(f"4-step student grid: {grid}")
    entries = [Entry("teacher", str(paths.sd_teacher(args.root)), [50], UNET_GUIDANCE, height=UNET_RESOLUTION),
               Entry("lcd", str(export_dir), [1, 2, 4], UNET_GUIDANCE, height=UNET_RESOLUTION)]
    result = evaluate_entries(entries, samples=args.samples, seed=0, classifier_root=args.root)
    write_report(result, out, "demo_quality", "Demo: UNet teacher vs LCD student")
    print((out / "demo_quality.md").read_text())
    print(f"students done in {time.time() - t1:.0f} s (teachers {t_teachers:.0f} s)")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0


def _train(args) -> int:
    from fastgen.trainers.run import train

    recipe = args.config or args.method
    if args.config and args.method:
        from fastgen.trainers.run import load_run_config

        _, method_cls = load_run_config(args.config, args.overrides)
        if method_cls.name != args.method:
            from fastgen.errors import ConfigError

            raise ConfigError(f"recipe {args.config} is for method '{method_cls.name}', not '{args.method}'; "
                              f"run `fastgen train {method_cls.name} --config {args.config}`")
    run_dir = train(recipe, args.overrides, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0


def _export(args) -> int:
    from fastgen.pipelines import export_run

    out = export_run(args.run_dir, args.out_dir, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"exported {args.run_dir} ({args.checkpoint}) -> {out}")
    return 0


def _sample(args) -> int:
    from fastgen.pipelines.sampling import load_exported, sample_grid

    pipe, kind = load_exported(args.folder)
    path = sample_grid(pipe, args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
                       num_images=args.num_images, out=args.out, height=args.height, width=args.width)
    print(f"{kind}: {len(args.prompt) * args.num_images} images, {args.steps} steps -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgen", description="Distil diffusion teachers into few-step students.")
    sub = p.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="the digits world's tiny models").add_subparsers(dest="zoo_command", required=True)
    b = zoo.add_parser("build", help="train the digits world's models (fixed seeds)")
    b.add_argument("--quick", action="store_true", help="a few steps per model (tests the build path, low quality)")
    b.add_argument("--out", default=None, help="output folder (default: the package's shipped artefacts)")
    b.add_argument("--work-dir", default="runs/zoo-build", help="stage outputs, reused when the build is re-run")
    b.add_argument("--config", default=None, help="YAML file of BuildConfig values")
    b.add_argument("--rebuild", nargs="*", help="stages to rebuild even if done")
    b.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps.unet=2000")
    b.set_defaults(fn=_zoo_build)

    c = zoo.add_parser("check", help="measure the shipped teachers, VAEs and classifier")
    c.add_argument("--samples", type=int, default=1000)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--out", default="benchmarks/results")
    c.add_argument("--name", default="digits_teachers")
    c.add_argument("--root", default=None, help="artefacts folder (default: shipped)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=_zoo_check)

    w = zoo.add_parser("where", help="print where the shipped models are")
    w.add_argument("--root", default=None)
    w.set_defaults(fn=_zoo_where)

    t = sub.add_parser("train", help="train a student: fastgen train lcd --config fastgen/recipes/lcd-digits.yaml")
    t.add_argument("method", nargs="?", default=None, help="method name (lcd, ...) or packaged recipe name (lcd-digits)")
    t.add_argument("--config", default=None, help="recipe YAML (method, output_dir, train:, <method>: sections)")
    t.add_argument("--resume", nargs="?", const="latest", default=None, help="resume from 'latest' or a checkpoint folder")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 lcd.w_max=6")
    t.set_defaults(fn=_train)

    e = sub.add_parser("export", help="export a run as a diffusers pipeline folder (or LoRA weights)")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--checkpoint", default="latest")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=_export)

    s = sub.add_parser("sample", help="sample an exported folder with stock diffusers")
    s.add_argument("folder")
    s.add_argument("--prompt", action="append", required=True)
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--guidance", type=float, default=None, help="pipeline guidance_scale (default: the folder's recommendation)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-images", type=int, default=4, help="images per prompt")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(fn=_sample)

    d = sub.add_parser("demo", help="the digits-world demo")
    d.add_argument("--samples", type=int, default=500, help="samples per pipeline for the demo's tables")
    d.add_argument("--skip-students", action="store_true", help="only the teachers' grids and table")
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--root", default=None)
    d.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from fastgen.errors import FastgenError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after options (`train lcd --config r.yaml a=1 --resume b=2`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except FastgenError as e:
        print(f"fastgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
