"""The ``fastgen`` command line: thin parsing on top of the Python API.

Every subcommand fails the same way: one line ``error: <what is wrong and how to fix it>`` on stderr
and exit code 2 (130 when interrupted), no traceback. :func:`main` is the one place that turns
failures into that line (:func:`error_message` says which ones); ``--debug`` (anywhere on the command
line) or ``FASTGEN_DEBUG=1`` re-raises instead, to show the traceback.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Exit code of a failure reported as one line (argparse's code for usage errors).
EXIT_ERROR = 2
#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"
DEBUG_ENV = "FASTGEN_DEBUG"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors raise :class:`~fastgen.errors.UsageError`, so that
    :func:`main` reports them as one line like every other failure (subparsers inherit the class)."""

    def error(self, message: str):  # type: ignore[override]
        from fastgen.errors import UsageError

        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _int_at_least(low: int):
    """argparse type: an integer >= ``low`` (``--samples 0`` is refused before anything loads)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


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
    guidance = None
    if args.dit_guidance:
        try:
            guidance = [float(g) for g in args.dit_guidance.split(",") if g.strip()]
        except ValueError:
            raise SystemExit(f"fastgen zoo check: --dit-guidance takes comma-separated numbers, got {args.dit_guidance!r}")
    result = check(samples=args.samples, steps=args.steps, out_dir=args.out, root=args.root, name=args.name, seed=args.seed,
                   dit_guidance=guidance)
    for key in ("unet_teacher", "dit_teacher"):
        print(f"{key}: {result[key]}")
    print(f"vae: {result['vae']}  vae_f2: {result['vae_f2']}")
    print(f"classifier: {result['classifier']}")
    print(f"wrote {args.out}/{args.name}.json and .md in {time.time() - t0:.0f} s")
    return 0


def _zoo_where(args) -> int:
    from fastgen.zoo.check import shipped_models

    for label, path in shipped_models(args.root):
        print(f"{label:40s} {path}")
    return 0


def _demo(args) -> int:
    """The digits-world demo: teachers, then an LCD student trained, exported and reloaded."""
    from fastgen.workflows.demo import run_demo

    run_demo(samples=args.samples, steps=args.steps, out=args.out, root=args.root, skip_students=args.skip_students)
    return 0


def _train(args) -> int:
    from fastgen.workflows.train import train

    recipe = args.config or args.method
    if not recipe:
        from fastgen.errors import UsageError
        from fastgen.trainers.method import BUILTIN_METHODS

        raise UsageError(f"fastgen train needs a method ({', '.join(BUILTIN_METHODS)}), a packaged recipe (lcd-digits) or "
                         f"--config RECIPE.yaml; e.g. `fastgen train lcd --config fastgen/recipes/lcd-digits.yaml`")
    if args.config and args.method:
        from fastgen.trainers.engine.run import load_run_config

        _, method_cls = load_run_config(args.config, [o for o in args.overrides if "=" in o])
        if method_cls.name != args.method:
            from fastgen.errors import ConfigError

            raise ConfigError(f"recipe {args.config} is for method '{method_cls.name}', not '{args.method}'; "
                              f"run `fastgen train {method_cls.name} --config {args.config}`")
    from fastgen.workflows.train import split_allowed_changes

    overrides, allowed = split_allowed_changes(args)
    run_dir = train(recipe, overrides, resume=args.resume, allow_config_change=allowed)
    print(f"run folder: {run_dir}")
    return 0


def _export(args) -> int:
    from fastgen.workflows.export import export_run

    out = export_run(args.run_dir, args.out_dir, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"exported {args.run_dir} ({args.checkpoint}) -> {out}")
    return 0


def _sample(args) -> int:
    from fastgen.pipelines.sampling import check_sampling_args, export_call_kwargs, export_info, load_exported, sample_grid

    folder = Path(args.folder)
    info = export_info(folder) if folder.is_dir() else {}
    height = args.height if args.height is not None else info.get("resolution")
    width = args.width if args.width is not None else height
    if args.steps is None:
        args.steps = int(info.get("num_inference_steps") or 4)
    check_sampling_args(folder, args.steps, height=height, width=width, num_images=args.num_images)  # before loading
    pipe, kind = load_exported(folder)
    guidance = args.guidance if args.guidance is not None else info.get("guidance_scale")
    path = sample_grid(pipe, args.prompt, steps=args.steps, guidance=guidance, seed=args.seed,
                       num_images=args.num_images, out=args.out, height=height, width=width,
                       extra=export_call_kwargs(info, len(args.prompt)))
    print(f"{kind}: {len(args.prompt) * args.num_images} images, {args.steps} steps -> {path}")
    return 0



# -- fastgen bench ---------------------------------------------------------------------------------

def _parse_pipeline(text: str):
    """``LABEL=FOLDER[:steps=1,2,4][:guidance=3][:height=32][:recipe=NAME]`` -> PipelineSpec."""
    from fastgen.errors import ConfigError
    from fastgen.workflows.bench import PipelineSpec

    label, sep, rest = text.partition("=")
    if not sep or not label:
        raise ConfigError(f"--pipeline takes LABEL=FOLDER[:steps=1,2,4][:guidance=G], got {text!r}")
    folder, *opts = rest.split(":")
    kw: dict = {"folder": folder or None}
    numbers = {"steps": "integers separated by commas", "speed_steps": "integers separated by commas",
               "guidance": "a number", "height": "an integer", "width": "an integer"}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep:
            raise ConfigError(f"--pipeline option {o!r} is not key=value (in {text!r})")
        if k in ("recipe", "negative_prompt"):
            kw[k] = v
            continue
        if k not in numbers:
            raise ConfigError(f"--pipeline option {k!r} unknown; use steps, speed_steps, guidance, height, width, recipe, negative_prompt")
        try:
            if k in ("steps", "speed_steps"):
                kw[k] = [int(x) for x in v.split(",")]
            else:
                kw[k] = float(v) if k == "guidance" else int(v)
        except ValueError:
            raise ConfigError(f"--pipeline option {k}={v!r} (in {text!r}) is not {numbers[k]}; "
                              f"e.g. {text.partition(':')[0]}:steps=1,2,4:guidance=3:height=32") from None
    return PipelineSpec(label, **kw)


def _metric_names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _check_metrics(names) -> None:
    """Refuse unknown metric names before any pipeline loads."""
    from fastgen.errors import ConfigError
    from fastgen.evaluation.bench import METRICS

    for name in names or ():
        if name not in METRICS:
            close = difflib.get_close_matches(name, list(METRICS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown metric '{name}'; {hint}available metrics: {', '.join(sorted(METRICS))} "
                              f"(--metrics takes a comma list, e.g. --metrics digits,fid)")


def _bench_suite(args, default_name: str):
    from fastgen.workflows.bench import SpeedSpec, Suite, load_suite

    pipes = [_parse_pipeline(t) for t in (args.pipeline or [])]
    if args.steps:
        for p in pipes:
            p.steps = list(args.steps)
    if args.guidance is not None:
        for p in pipes:
            p.guidance = args.guidance
    if args.suite:
        suite = load_suite(args.suite, args.overrides)
        if pipes:
            suite.pipelines = pipes
    else:
        if not pipes:
            from fastgen.errors import ConfigError

            raise ConfigError("give a suite YAML (benchmarks/suites/digits.yaml) or at least one --pipeline LABEL=FOLDER")
        suite = Suite(name=default_name, pipelines=pipes)
    for key in ("prompts", "samples", "seed", "data_root", "inception_weights", "clip_model", "hps_checkpoint",
                "hps_version", "fid_reference", "runs_dir"):
        v = getattr(args, key, None)
        if v is not None:
            setattr(suite, key, v)
    if getattr(args, "metrics", None):
        suite.metrics = _metric_names(args.metrics)
    _check_metrics(suite.metrics)
    if args.name:
        suite.name = args.name
    if args.command_bench in ("speed", "run"):
        sp = suite.speed or SpeedSpec()
        for key in ("prompt", "batch_size", "warmup", "repeats", "device", "dtype"):
            v = getattr(args, key, None)
            if v is not None:
                setattr(sp, key, v)
        if getattr(args, "ratio", None):
            sp.ratio = list(args.ratio)
        suite.speed = sp
    return suite


def _bench_quality(args) -> int:
    from pathlib import Path

    from fastgen.workflows.bench import bench_quality

    suite = _bench_suite(args, "quality")
    files = bench_quality(suite, args.out)
    print(Path(args.out, f"{suite.name}.md").read_text())
    print("wrote " + ", ".join(map(str, files)))
    return 0


def _bench_speed(args) -> int:
    from pathlib import Path

    from fastgen.workflows.bench import bench_speed

    suite = _bench_suite(args, "sampling_speed")
    files = bench_speed(suite, args.out)
    print(Path(files[1]).read_text())
    print("wrote " + ", ".join(map(str, files)))
    return 0


def _bench_run(args) -> int:
    """Speed first (so the quality report can draw its quality-vs-latency scatter), then quality."""
    rc = _bench_speed(args)
    return rc or _bench_quality(args)


def _bench_score(args) -> int:
    """Score a folder of already generated images against a prompt file (one prompt per image)."""
    import json

    from fastgen.evaluation.bench import score_image_folder

    metrics = _metric_names(args.metrics)
    if not metrics:
        from fastgen.errors import UsageError

        raise UsageError("--metrics is empty; give a comma list such as --metrics clip,hps")
    _check_metrics(metrics)
    result = score_image_folder(args.images, args.prompts, metrics,
                                clip_model=args.clip_model, hps_checkpoint=args.hps_checkpoint,
                                hps_version=args.hps_version, inception_weights=args.inception_weights,
                                fid_reference=args.fid_reference)
    print(json.dumps(result, indent=2))
    return 0


def _bench_hps(args) -> int:
    import json

    from fastgen.evaluation.hps import HPSScorer, hps_benchmark

    scorer = HPSScorer.from_checkpoint(args.hps_checkpoint, version=args.hps_version)
    res = hps_benchmark(scorer, args.images_root, args.prompts_dir, per_style=args.per_style)
    print(json.dumps(res, indent=2))
    if args.out_json:
        from fastgen.io import atomic_write_json

        atomic_write_json(args.out_json, res)
    return 0


def _lrm_pretrain(args) -> int:
    from fastgen.config import load_config
    from fastgen.rewards.latent_proxy import LRMPretrainConfig, pretrain_lrm

    base = {k: v for k, v in (("teacher", args.teacher), ("data", args.data), ("out", args.out)) if v is not None}
    cfg = load_config(LRMPretrainConfig, args.config, overrides=args.overrides, base=base or None)
    out = pretrain_lrm(cfg)
    print(f"latent reward model: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastgen", description="Distil diffusion teachers into few-step students.",
                epilog=f"A failure prints one line `error: ...` and exits with {EXIT_ERROR}; {DEBUG_FLAG} or {DEBUG_ENV}=1 "
                       f"shows the traceback instead.")
    p.add_argument(DEBUG_FLAG, action="store_true",
                   help=f"re-raise failures with their traceback (also accepted after the subcommand, or {DEBUG_ENV}=1)")
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
    c.add_argument("--samples", type=_positive_int, default=1000)
    c.add_argument("--steps", type=_positive_int, default=50)
    c.add_argument("--out", default="benchmarks/results")
    c.add_argument("--name", default="digits_teachers")
    c.add_argument("--root", default=None, help="artefacts folder (default: shipped)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dit-guidance", default=None,
                   help="comma-separated true-CFG scales of the DiT teacher to measure; the best digits-FID is reported "
                        "(default: the shipped world's scale)")
    c.set_defaults(fn=_zoo_check)

    w = zoo.add_parser("where", help="print where the shipped models are")
    w.add_argument("--root", default=None)
    w.set_defaults(fn=_zoo_where)

    t = sub.add_parser("train", help="train a student: fastgen train lcd --config fastgen/recipes/lcd-digits.yaml")
    t.add_argument("method", nargs="?", default=None, help="method name (lcd, ...) or packaged recipe name (lcd-digits)")
    t.add_argument("--config", default=None, help="recipe YAML (method, output_dir, train:, <method>: sections)")
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from 'latest', 'previous' (the finished checkpoint before latest) or a checkpoint folder")
    t.add_argument("--allow-config-change", dest="allow_config_change", nargs="+", action="extend", default=[], metavar="KEY",
                   help="on resume, accept these changed keys (or sections) of the saved configuration; recorded in "
                        "config-changes.jsonl")
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
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the folder's recommendation, else 4)")
    s.add_argument("--guidance", type=float, default=None, help="pipeline guidance_scale (default: the folder's recommendation)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-images", type=int, default=4, help="images per prompt")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(fn=_sample)

    d = sub.add_parser("demo", help="the digits-world demo")
    d.add_argument("--samples", type=_positive_int, default=200, help="samples per pipeline for the demo's tables (a first look; make bench measures 1000)")
    d.add_argument("--skip-students", action="store_true", help="only the teachers' grids and table")
    d.add_argument("--steps", type=_positive_int, default=50)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--root", default=None)
    d.set_defaults(fn=_demo)

    lrm = sub.add_parser("lrm", help="latent proxy reward models: `fastgen lrm pretrain [--teacher T] [--data SOURCE] [--out DIR] [k=v]`")
    lsub = lrm.add_subparsers(dest="lrm_command", required=True)
    lp = lsub.add_parser(
        "pretrain", help="contrastive pre-training of an LRM on a teacher's latents",
        description="Pre-train a latent proxy reward model: the teacher's VAE encodes the images, the teacher's tokenizer "
                    "(and, by default for real data, a copy of its text encoder) reads the full captions; CLIP loss. "
                    "Architecture presets: digits-cnn (data=digits), rg-lcd-vit (RG-LCD's latent ViT; other data), "
                    "tiny (seconds; tests and smoke runs).")
    lp.add_argument("--config", default=None, help="YAML recipe with LRMPretrainConfig keys")
    lp.add_argument("--teacher", default=None, help="teacher folder or alias (default digits-sd)")
    lp.add_argument("--data", default=None, help="digits (default), an image-caption folder, webdataset shards "
                                                 "(.tar / brace pattern / folder of .tar) or a latent cache of the teacher")
    lp.add_argument("--out", default=None, help="output folder (default runs/lrm-digits, or runs/lrm-<teacher name>)")
    lp.add_argument("overrides", nargs="*", help="LRMPretrainConfig key=value overrides, e.g. steps=500 batch_size=64 "
                                                 "width=128 depth=4 text_tower=teacher resolution=512")
    lp.set_defaults(fn=_lrm_pretrain)

    bench = sub.add_parser("bench", help="benchmark teacher and students: quality (FID/HPS/CLIP/digits) and speed")
    bsub = bench.add_subparsers(dest="command_bench", required=True)
    for name, fn, hlp in (("quality", _bench_quality, "sample every pipeline and score it under one protocol"),
                          ("speed", _bench_speed, "median/p90 latency, end to end and network only"),
                          ("run", _bench_run, "speed, then quality, then the quality-vs-latency scatter")):
        q = bsub.add_parser(name, help=hlp)
        q.add_argument("suite", nargs="?", default=None, help="suite YAML (e.g. benchmarks/suites/digits.yaml)")
        q.add_argument("--pipeline", action="append", help="LABEL=FOLDER[:steps=1,2,4][:guidance=G][:height=H] (repeatable; "
                       "FOLDER may be a shipped alias such as digits-sd); replaces the suite's pipelines")
        q.add_argument("--steps", type=_positive_int, nargs="+", default=None, help="step counts for every --pipeline")
        q.add_argument("--guidance", type=float, default=None, help="guidance_scale for every --pipeline")
        q.add_argument("--name", default=None, help="results name: <out>/<name>.json/.md/.png")
        q.add_argument("--out", default="benchmarks/results")
        q.add_argument("--runs-dir", default=None, help="where recipe pipelines are trained/reused (default runs)")
        q.add_argument("--seed", type=int, default=None)
        if name in ("quality", "run"):
            q.add_argument("--prompts", default=None, help="'digits', a prompt file, or preset:coco2014-30k@256 / preset:coco2017-5k@512")
            q.add_argument("--samples", type=_positive_int, default=None, help="number of prompts (digits) or limit on a prompt file/preset")
            q.add_argument("--metrics", default=None, help="comma list of: digits, fid, clip, hps")
            q.add_argument("--data-root", default=None, help="folder with the preset's COCO annotations/ and images")
            q.add_argument("--fid-reference", default=None, help="folder of real images for 'fid' with a plain prompt file")
            q.add_argument("--inception-weights", default=None, help="local weights-inception-2015-12-05-6726825d.pth")
            q.add_argument("--clip-model", default=None, help="local transformers CLIP folder")
            q.add_argument("--hps-checkpoint", default=None, help="local HPS_v2.1_compressed.pt (or a folder holding it)")
            q.add_argument("--hps-version", default=None, choices=["v2.0", "v2.1"])
        if name in ("speed", "run"):
            q.add_argument("--prompt", default=None)
            q.add_argument("--batch-size", type=_positive_int, default=None)
            q.add_argument("--warmup", type=_non_negative_int, default=None)
            q.add_argument("--repeats", type=_positive_int, default=None)
            q.add_argument("--device", default=None, help="auto, cpu, cuda")
            q.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
            q.add_argument("--ratio", nargs=2, default=None, metavar=("NUM@STEPS", "DEN@STEPS"),
                           help="report latency(NUM)/latency(DEN), e.g. teacher@50 lcd@4")
        q.add_argument("overrides", nargs="*", help="suite key=value overrides, e.g. samples=200 speed.repeats=3")
        q.set_defaults(fn=fn)

    sc = bsub.add_parser("score", help="score a folder of generated images against a prompt file (one prompt per image)")
    sc.add_argument("--images", required=True)
    sc.add_argument("--prompts", required=True)
    sc.add_argument("--metrics", default="clip")
    sc.add_argument("--clip-model", default=None)
    sc.add_argument("--hps-checkpoint", default=None)
    sc.add_argument("--hps-version", default="v2.1", choices=["v2.0", "v2.1"])
    sc.add_argument("--inception-weights", default=None)
    sc.add_argument("--fid-reference", default=None)
    sc.set_defaults(fn=_bench_score)

    hp = bsub.add_parser("hps", help="the HPSv2 benchmark protocol on a folder <root>/<style>/<idx:05d>.jpg")
    hp.add_argument("--images-root", required=True)
    hp.add_argument("--prompts-dir", required=True, help="folder with anime.json, concept-art.json, paintings.json, photo.json")
    hp.add_argument("--hps-checkpoint", default=None)
    hp.add_argument("--hps-version", default="v2.1", choices=["v2.0", "v2.1"])
    hp.add_argument("--per-style", type=_positive_int, default=800)
    hp.add_argument("--out-json", default=None)
    hp.set_defaults(fn=_bench_hps)
    for action in (sub, zoo, lsub, bsub):  # "required: {quality,speed,...}" rather than the dest's name
        action.metavar = "{" + ",".join(action.choices) + "}"
    return p


def _one_line(text: str) -> str:
    """``text`` on one line: its non-empty lines joined (YAML's caret-only marker lines dropped)."""
    lines = [line.strip() for line in str(text).splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})


def _path_message(exc: OSError) -> str:
    """A file-system error naming its path and the fix."""
    path = exc.filename
    if path is None:
        return str(exc)
    where = f"'{os.fsdecode(path)}'" + (f" -> '{os.fsdecode(exc.filename2)}'" if exc.filename2 is not None else "")
    if isinstance(exc, FileNotFoundError):
        return f"{where} does not exist; check the path"
    if isinstance(exc, PermissionError):
        return f"permission denied on {where}; make it readable/writable for this user or use another path"
    if isinstance(exc, IsADirectoryError):
        return f"{where} is a folder, but a file is expected there; pass a file path"
    if isinstance(exc, NotADirectoryError):
        return f"{where} is not a folder (a part of the path is a file); pass a folder path"
    return f"{where} already exists; remove it or choose another path"  # FileExistsError


def error_message(exc: BaseException) -> str | None:
    """The one-line message ``fastgen`` prints for ``exc``, or ``None`` when it is not an expected failure
    (a bug: the traceback is kept). Expected: :class:`~fastgen.errors.FastgenError`, missing or unreadable
    paths, ``ValueError`` (bad values), YAML and safetensors errors, a missing optional package."""
    from fastgen.errors import FastgenError

    hint = f" (rerun with {DEBUG_FLAG} for the traceback)"
    yaml = sys.modules.get("yaml")
    safetensors = sys.modules.get("safetensors")
    if isinstance(exc, FastgenError):
        text = str(exc)
    elif isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        text = _path_message(exc)
    elif yaml is not None and isinstance(exc, yaml.YAMLError):
        text = f"not valid YAML: {exc}; fix the syntax (indent with spaces, `key: value` pairs)"
    elif safetensors is not None and isinstance(exc, getattr(safetensors, "SafetensorError", ())):
        text = f"a .safetensors file could not be read ({exc}); it is truncated or not safetensors: write it again{hint}"
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        text = f"the Python module '{exc.name}' is not installed; install the package that provides it{hint}"
    elif isinstance(exc, ValueError):
        text = f"{exc or type(exc).__name__}{hint}"
    else:
        return None
    return _one_line(text) or type(exc).__name__


def _debug_requested(argv: list[str]) -> bool:
    """Remove every ``--debug`` from ``argv`` (before or after the subcommand); True if one was there or
    ``FASTGEN_DEBUG`` is set to a true value."""
    found = DEBUG_FLAG in argv
    argv[:] = [a for a in argv if a != DEBUG_FLAG]
    return found or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after options (`train lcd --config r.yaml a=1 --resume b=2`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            from fastgen.errors import UsageError

            prog = " ".join(["fastgen", *(getattr(args, k) for k in ("command", "zoo_command", "command_bench", "lrm_command")
                                          if getattr(args, k, None))])
            raise UsageError(f"{prog}: unrecognized arguments: {' '.join(extra)}; see `{prog} --help`")
    return args.fn(args)


def main(argv: list[str] | None = None) -> int:
    """Run ``fastgen ARGV``; returns the exit code: 0, 2 (one line ``error: ...`` on stderr) or 130 (Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        resume = "; a training run continues from its last checkpoint with --resume" if argv[:1] == ["train"] else ""
        print(f"error: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = None if debug else error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
