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
    from fastgen.zoo import paths
    from fastgen.zoo.check import check

    t0 = time.time()
    print("== fastgen demo: the digits world ==")
    print("Shipped teachers (stock diffusers pipeline folders):")
    _zoo_where(args)
    print(f"\nSampling both teachers and scoring {args.samples} images each (digits-FID, accuracy)...")
    result = check(samples=args.samples, steps=args.steps, out_dir=args.out, root=args.root, name="digits_teachers", seed=0)
    print()
    print(open(os.path.join(args.out, "digits_teachers.md")).read())
    print(f"grids: {args.out}/digits_teachers_unet_grid.png, {args.out}/digits_teachers_dit_grid.png")
    print(f"demo finished in {time.time() - t0:.0f} s")
    del result, paths
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

    d = sub.add_parser("demo", help="the digits-world demo")
    d.add_argument("--samples", type=int, default=1000)
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--root", default=None)
    d.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from fastgen.errors import FastgenError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except FastgenError as e:
        print(f"fastgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
