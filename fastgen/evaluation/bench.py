"""Benchmark measurements behind ``fastgen bench``: teacher and students under one protocol (same
prompts, seeds, batch split, preprocessing), JSON + markdown + plots.

This module measures and reports; it never trains. A suite (YAML, see ``benchmarks/suites/``, read by
:func:`fastgen.workflows.bench.load_suite`) names the pipelines, their step counts and guidance, the
prompt set, the metrics and the speed protocol. Here a pipeline is a diffusers folder, a shipped alias
(``digits-sd``, ``digits-flux``) or an export of ``fastgen export``; pipelines given as a ``recipe`` are
trained and exported first by :mod:`fastgen.workflows.bench`, which hands their folders to
:func:`measure_quality` / :func:`measure_speed` through a resolver.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastgen.errors import ConfigError, ModelLoadError
from fastgen.evaluation.reports import markdown_table
from fastgen.io import atomic_file, atomic_write_json, atomic_write_text, save_image_grid

# ---------------------------------------------------------------------------------------------
# Suite description (typed; loaded with fastgen.config)


@dataclass
class PipelineSpec:
    """One pipeline to benchmark. ``folder`` (path or alias) or ``recipe`` (trained when absent)."""

    label: str
    folder: str | None = None
    recipe: str | None = None
    steps: list[int] | int = field(default_factory=lambda: [4])
    guidance: int | float | None = None  # kept as written (3 stays 3 in the reports)
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    speed_steps: list[int] | None = None  # step counts timed by `bench speed` (default: steps)
    call_kwargs: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # recipe key=value overrides (trained into runs/<run_name>)
    run_name: str | None = None  # run folder name under runs_dir (default: the recipe name)

    def __post_init__(self):
        if not self.folder and not self.recipe:
            raise ConfigError(f"pipeline {self.label!r} needs a 'folder' (pipeline folder or alias) or a 'recipe'")
        self.steps = [int(s) for s in ([self.steps] if isinstance(self.steps, int) else self.steps)]
        if not self.steps or any(s < 1 for s in self.steps):
            raise ConfigError(f"pipeline {self.label!r}: steps must be positive integers, got {self.steps}")


@dataclass
class SpeedSpec:
    name: str = "sampling_speed"
    prompt: str = "a photo of a cat"
    batch_size: int = 1
    warmup: int = 2
    repeats: int = 7
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    scopes: list[str] = field(default_factory=lambda: ["end_to_end", "network"])
    ratio: list[str] | None = None  # ["teacher@50", "lcd@4"]: numerator / denominator (with a breakdown)
    ratios: list[list[str]] = field(default_factory=list)  # further [numerator, denominator] pairs


@dataclass
class Suite:
    name: str
    pipelines: list[PipelineSpec]
    title: str = ""
    prompts: str = "digits"  # "digits" | prompt file | "preset:<name>"
    data_root: str | None = None
    samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    metrics: list[str] | str = field(default_factory=lambda: ["digits"])  # a list, or "digits,fid"
    runs_dir: str = "runs"
    # metric settings
    inception_weights: str | None = None
    fid_reference: str | None = None  # image folder of real images (when the prompts are not a preset)
    fid_resolution: int | None = None
    fid_resize_filter: str = "bicubic"
    clip_model: str | None = None
    hps_checkpoint: str | None = None
    hps_version: str = "v2.1"
    speed: SpeedSpec | None = None
    grids: int = 0  # save the first N images of every (pipeline, steps) as a grid
    plot_columns: list[str] = field(default_factory=list)  # quality-vs-steps plots (default: the primary metric)
    progress: bool = True  # progress bars on stderr while sampling and scoring (progress=false: none)
    #: quality only: re-measure just these pipeline labels and keep the other rows of the existing results
    #: (same protocol required), e.g. ``only=dit-teacher,clear`` after retraining those
    only: list[str] | str = field(default_factory=list)

    def __post_init__(self):
        if not self.pipelines:
            raise ConfigError(f"suite {self.name!r} needs a non-empty 'pipelines' list")
        if isinstance(self.metrics, str):
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        if isinstance(self.only, str):
            self.only = [m.strip() for m in self.only.split(",") if m.strip()]
        labels = [p.label for p in self.pipelines]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"suite {self.name!r}: pipeline labels must be unique, got {labels}")
        unknown = [o for o in self.only if o not in labels]
        if unknown:
            raise ConfigError(f"suite {self.name!r}: only={unknown} names no pipeline; labels are {', '.join(labels)}")

    @property
    def display_title(self) -> str:
        return self.title or self.name


# ---------------------------------------------------------------------------------------------
# Pipelines


def _alias_defaults() -> dict:
    """Sampling defaults of the shipped digits teachers (the facts of :mod:`fastgen.zoo.paths`). FluxPipeline runs
    true CFG only with ``true_cfg_scale > 1`` and a negative prompt."""
    from fastgen.zoo import paths as zp

    unet = {"guidance": float(zp.UNET_GUIDANCE), "height": int(zp.UNET_RESOLUTION)}
    dit = {"guidance": 1.0, "height": int(zp.DIT_RESOLUTION), "negative_prompt": "",
           "call_kwargs": {"true_cfg_scale": float(zp.DIT_GUIDANCE), "max_sequence_length": int(zp.DIT_MAX_SEQUENCE_LENGTH)}}
    return {"digits-sd": unet, "digits-unet": unet, "digits-flux": dit, "digits-dit": dit}


ALIAS_DEFAULTS = _alias_defaults()


@dataclass
class ResolvedPipeline:
    """The folder a :class:`PipelineSpec` is loaded from and its sampling defaults (guidance, height,
    negative prompt, call kwargs); ``info`` holds extra fields for the quality protocol (e.g. the recipe)."""

    folder: Path
    defaults: dict
    info: dict = field(default_factory=dict)


Resolver = Callable[[PipelineSpec], ResolvedPipeline]


def resolve_folder(spec: PipelineSpec, folder: str | Path | None = None) -> ResolvedPipeline:
    """``spec``'s pipeline folder (``folder`` when given, e.g. a recipe's export, else ``spec.folder``
    or the alias it names) with its sampling defaults: the alias's, then ``fastgen_export.json``'s
    recommendations, overridden by the spec's own ``guidance``/``height``/``negative_prompt``.

    A ``recipe`` pipeline without ``folder`` is refused: :mod:`fastgen.workflows.bench` trains and
    exports it first.
    """
    from fastgen.pipelines.sampling import export_info
    from fastgen.zoo.paths import resolve_model

    if folder is None:
        if spec.recipe:
            raise ConfigError(f"pipeline {spec.label!r} is the recipe {spec.recipe!r}: train and export it first "
                              f"(`fastgen bench` does, through fastgen.workflows.bench) or give its export folder")
        folder = resolve_model(spec.folder)
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"pipeline {spec.label!r}: folder {folder} does not exist; give a diffusers pipeline folder, "
                             f"a `fastgen export` folder or a shipped alias (digits-sd, digits-flux)")
    defaults = dict(ALIAS_DEFAULTS.get(str(spec.folder), {}))
    info = export_info(folder)
    if "guidance_scale" in info:
        defaults.setdefault("guidance", float(info["guidance_scale"]))
    if info.get("resolution"):
        defaults.setdefault("height", int(info["resolution"]))
    if info.get("max_sequence_length"):  # the T5 length the export was distilled with (the stock default is 512)
        defaults["call_kwargs"] = {"max_sequence_length": int(info["max_sequence_length"]), **defaults.get("call_kwargs", {})}
    for key in ("guidance", "height", "negative_prompt"):
        if getattr(spec, key) is not None:
            defaults[key] = getattr(spec, key)
    defaults.setdefault("guidance", 1.0)
    return ResolvedPipeline(folder, defaults)


def load_pipeline_for_bench(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from fastgen.pipelines.sampling import load_exported

    try:
        pipe, _ = load_exported(folder, dtype=dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{folder} could not be loaded as a diffusers pipeline ({type(e).__name__}: {e})") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample_pipeline(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch_size: int = 250,
                    height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                    progress: bool = True, desc: str | None = None, **kwargs) -> torch.Tensor:
    """Images in [0,1] ``[N,3,H,W]`` from any stock text-to-image pipeline; the batch starting at prompt
    ``i`` uses ``torch.Generator().manual_seed(seed + i)``, so every pipeline sees the same noise seeds
    (the in-training evaluation, :class:`fastgen.evaluation.training.TrainingEvaluator`, seeds alike). torch's
    global generator is seeded with the same value before each batch, for schedulers that draw from it
    (``FlowMatchLCMScheduler`` re-noises without the pipeline's generator).

    ``progress``: a bar on stderr (images done / total, images/s; it moves with the denoising steps
    within a batch, :class:`fastgen.pipelines.sampling.ImageProgress`) named ``desc``."""
    from fastgen.pipelines.sampling import ImageProgress

    out = []
    pipe.set_progress_bar_config(disable=True)
    with ImageProgress(len(prompts), desc or f"sampling {steps} steps", enabled=progress) as bar:
        for i in range(0, len(prompts), batch_size):
            gen = torch.Generator().manual_seed(seed + i)
            torch.manual_seed(seed + i)
            chunk = prompts[i : i + batch_size]
            kw = {**bar.call_kwargs(pipe, len(chunk), steps), **kwargs}
            if height:
                kw.update(height=height, width=width or height)
            if negative_prompt is not None:
                kw["negative_prompt"] = [negative_prompt] * len(chunk)
            res = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="pt", **kw)
            out.append(res.images.float().cpu())
            bar.done(len(chunk))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Prompt sets


@dataclass
class PromptSet:
    prompts: list[str]
    description: str
    protocol: dict
    labels: dict = field(default_factory=dict)  # e.g. {"digits": tensor, "colours": tensor}
    pairs: Any = None  # PromptImagePairs when the prompts come with reference images


def load_prompt_set(suite: Suite) -> PromptSet:
    from fastgen.evaluation.presets import load_paired_folder, load_preset, prompts_sha

    spec = suite.prompts
    if spec == "digits":
        from fastgen.data import digits as dw

        prompts, d, c = dw.eval_prompts(suite.samples, seed=suite.seed)
        return PromptSet(prompts, "canonical digits captions balanced over the 60 (digit, colour) pairs",
                         {"prompts_sha256_16": prompts_sha(prompts), "count": len(prompts)}, {"digits": d, "colours": c})
    if spec.startswith("preset:"):
        if not suite.data_root:
            raise ConfigError(f"prompts {spec} needs data_root (the folder holding the COCO annotations/ and images)")
        pairs = load_preset(spec.split(":", 1)[1], suite.data_root, limit=suite.samples or None)
        return PromptSet(pairs.prompts, f"FID preset {pairs.name}", pairs.protocol, pairs=pairs)
    if suite.fid_reference and "fid" in suite.metrics:
        from fastgen.evaluation.fid import Preprocess

        pairs = load_paired_folder(spec, suite.fid_reference,
                                   Preprocess(suite.fid_resolution, suite.fid_resize_filter, True))
        prompts = pairs.prompts[: suite.samples or None]
        return PromptSet(prompts, f"prompt file {spec}", {**pairs.protocol, "used": len(prompts)}, pairs=pairs)
    from fastgen.data.prompts import load_prompts

    prompts = load_prompts(spec)[: suite.samples or None]
    return PromptSet(prompts, f"prompt file {spec}", {"prompts_sha256_16": prompts_sha(prompts), "count": len(prompts)})


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Metrics


class BenchMetric:
    """One metric of a quality suite: set up once, then ``score(images, prompt_set)`` -> columns.

    While :func:`measure_quality` scores, ``bar`` is an :class:`~fastgen.pipelines.sampling.ImageProgress`
    over the images; a metric that scores in chunks calls :meth:`advance` after each (the bar is
    completed after ``score`` returns either way)."""

    name = ""
    columns: list[str] = []
    bar = None

    def advance(self, images: int) -> None:
        if self.bar is not None:
            self.bar.done(images)

    def chunks(self, n: int, size: int):
        """``range(0, n, size)``, advancing the bar after each chunk has been scored."""
        for i in range(0, n, size):
            yield i
            self.advance(min(size, n - i))

    def score(self, images: torch.Tensor, ps: PromptSet) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}


class DigitsMetric(BenchMetric):
    """digits-FID (digits classifier features vs the held-out split) + digit / colour accuracy."""

    name = "digits"
    columns = ["digits_fid", "digit_accuracy", "colour_accuracy"]

    def __init__(self, suite: Suite, prompt_set: PromptSet):
        if "digits" not in prompt_set.labels:
            raise ConfigError("metric 'digits' needs the digits prompts (prompts: digits)")
        from fastgen.evaluation.digits_metrics import DigitsEvaluator
        from fastgen.zoo import paths

        self.evaluator = DigitsEvaluator(paths.load_classifier())

    def score(self, images, ps):
        s = self.evaluator.score(images, ps.labels["digits"], ps.labels["colours"]).as_dict()
        return {k: s[k] for k in self.columns}

    def describe(self):
        return self.evaluator.describe()


class FIDMetric(BenchMetric):
    name = "fid"
    columns = ["fid"]

    def __init__(self, suite: Suite, prompt_set: PromptSet):
        from fastgen.evaluation.fid import FID, FolderReference, InceptionFeatures, Preprocess

        backend = InceptionFeatures(suite.inception_weights)
        if prompt_set.pairs is not None:
            pre, ref = prompt_set.pairs.preprocess, prompt_set.pairs.reference()
        elif suite.fid_reference:
            pre, ref = Preprocess(suite.fid_resolution, suite.fid_resize_filter), FolderReference(suite.fid_reference)
        else:
            raise ConfigError("metric 'fid' needs reference images: prompts: preset:<name> with data_root, "
                              "or fid_reference: <image folder>")
        self.fid = FID(backend, pre).set_reference(ref)

    def score(self, images, ps):
        size = self.fid.batch_size

        def batches():
            for i in self.chunks(len(images), size):
                yield images[i : i + size]

        return {"fid": round(self.fid.score(batches()), 3)}

    def describe(self):
        return self.fid.describe()


class CLIPMetric(BenchMetric):
    name = "clip"
    columns = ["clip_score"]

    def __init__(self, suite: Suite, prompt_set: PromptSet):
        from fastgen.evaluation.clip_score import HFCLIPScorer

        if not suite.clip_model:
            raise ConfigError("metric 'clip' needs clip_model: a local transformers CLIP folder "
                              "(e.g. openai/clip-vit-large-patch14 saved with save_pretrained)")
        self.scorer = HFCLIPScorer.from_pretrained(suite.clip_model)

    def score(self, images, ps):
        s = torch.cat([self.scorer.score(images[i : i + 64], ps.prompts[i : i + 64]) for i in self.chunks(len(images), 64)])
        return {"clip_score": round(float(s.mean()), 3)}

    def describe(self):
        return self.scorer.describe()


class HPSMetric(BenchMetric):
    name = "hps"

    def __init__(self, suite: Suite, prompt_set: PromptSet):
        from fastgen.evaluation.hps import HPSScorer

        self.scorer = HPSScorer.from_checkpoint(suite.hps_checkpoint, version=suite.hps_version)
        self.columns = [f"hps_{self.scorer.version}"]

    def score(self, images, ps):
        with torch.no_grad():
            s = torch.cat([self.scorer(images[i : i + 20], ps.prompts[i : i + 20]) for i in self.chunks(len(images), 20)])
        return {self.columns[0]: round(100 * float(s.mean()), 3)}

    def describe(self):
        return self.scorer.describe()


class DigitsRewardMetric(BenchMetric):
    """Mean digits reward (log p(digit) + log p(colour) of the prompted pair; 0 is best)."""

    name = "digits_reward"
    columns = ["digits_reward"]

    def __init__(self, suite: Suite, prompt_set: PromptSet):
        from fastgen.rewards import DigitsReward

        self.reward = DigitsReward()

    @torch.no_grad()
    def score(self, images, ps):
        from fastgen.evaluation.fid import quantize_uint8

        imgs = quantize_uint8(images).float() / 255.0
        r = torch.cat([self.reward(imgs[i : i + 500], ps.prompts[i : i + 500]) for i in self.chunks(len(imgs), 500)])
        return {"digits_reward": round(float(r.mean()), 4)}

    def describe(self):
        return self.reward.describe()


class HFEnergyMetric(BenchMetric):
    """Mean share of spectral energy above half the Nyquist frequency (reward hacking shows up here)."""

    name = "hf_energy"
    columns = ["hf_energy"]
    cutoff = 0.5

    def __init__(self, suite: Suite, prompt_set: PromptSet):
        self.reference = None
        if "digits" in prompt_set.labels:
            from fastgen.data.digits import DigitsDataset
            from fastgen.evaluation.hf_energy import hf_energy

            pixels, _, _ = DigitsDataset("test").all_pixels(32)
            self.reference = round(float(hf_energy(pixels, self.cutoff).mean()), 5)

    def score(self, images, ps):
        from fastgen.evaluation.hf_energy import hf_energy

        return {"hf_energy": round(float(hf_energy(images, self.cutoff).mean()), 5)}

    def describe(self):
        return {"definition": "share of luminance spectral energy above 0.5 x Nyquist (radial), per image, mean",
                "cutoff": self.cutoff, "real_images_value": self.reference}


METRICS: dict[str, type[BenchMetric]] = {"digits": DigitsMetric, "fid": FIDMetric, "clip": CLIPMetric, "hps": HPSMetric,
                                         "digits_reward": DigitsRewardMetric, "hf_energy": HFEnergyMetric}


def register_metric(name: str, cls: type[BenchMetric]) -> None:
    METRICS[name] = cls


def build_metrics(suite: Suite, prompt_set: PromptSet) -> list[BenchMetric]:
    unknown = [m for m in suite.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(sorted(METRICS))}")
    return [METRICS[m](suite, prompt_set) for m in suite.metrics]


# ---------------------------------------------------------------------------------------------
# Measurements


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def versions() -> dict:
    import diffusers
    import torchmetrics
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "torchmetrics": torchmetrics.__version__, "python": platform.python_version()}


def score_images(metrics: list[BenchMetric], images: torch.Tensor, ps: PromptSet, label: str = "",
                 progress: bool = True) -> dict:
    """Every metric's columns for ``images``; a bar per metric on stderr when scoring takes over 2 s."""
    from fastgen.pipelines.sampling import ImageProgress

    row: dict = {}
    for m in metrics:
        with ImageProgress(len(images), f"{m.name} {label}".strip(), enabled=progress, delay=2.0) as bar:
            m.bar = bar
            try:
                row.update(m.score(images, ps))
            finally:
                m.bar = None
            bar.finish()
    return row


def measure_quality(suite: Suite, resolve: Resolver | None = None, log=print, progress: bool | None = None,
                    reuse: dict[str, dict] | None = None) -> dict:
    """Sample every pipeline at each of its step counts under one protocol and score it.

    ``resolve(spec)`` gives each pipeline's folder and sampling defaults (default :func:`resolve_folder`:
    folders and aliases only; :func:`fastgen.workflows.bench.run_quality` passes one that trains recipes).
    ``progress`` (default ``suite.progress``): bars on stderr while sampling and scoring.
    ``reuse``: ``{"label@steps": {"images": [N,3,H,W] in [0,1], "seconds": s, "source": text}}``, images
    already sampled under this protocol (the suite's prompts in order, seeds, batch split, guidance), which
    are scored instead of sampled again; a pipeline whose every step count is reused is not loaded.
    """
    resolve = resolve or resolve_folder
    progress = suite.progress if progress is None else progress
    reuse = dict(reuse or {})
    ps = load_prompt_set(suite)
    metrics = build_metrics(suite, ps)
    columns = [c for m in metrics for c in m.columns]
    rows, pipelines, grids = [], {}, {}
    for spec in suite.pipelines:
        resolved = resolve(spec)
        folder, d = resolved.folder, resolved.defaults
        keys = [f"{spec.label}@{steps}" for steps in spec.steps]
        pipe = None
        if all(k in reuse for k in keys):
            pipelines[spec.label] = {"folder": str(folder), **d, **resolved.info,
                                     "images": "; ".join(dict.fromkeys(str(reuse[k].get("source", "reused")) for k in keys))}
        else:
            pipe = load_pipeline_for_bench(folder)
            pipelines[spec.label] = {"folder": str(folder), "pipeline_class": type(pipe).__name__,
                                     "scheduler": type(pipe.scheduler).__name__, **d, **resolved.info}
        for steps, key in zip(spec.steps, keys):
            if key in reuse:
                images, seconds = reuse[key]["images"], float(reuse[key].get("seconds") or 0.0)
                if len(images) != len(ps.prompts):
                    raise ConfigError(f"reused images for {key}: {len(images)} images for {len(ps.prompts)} prompts; "
                                      f"they must be sampled on the suite's prompts")
            else:
                t0 = time.perf_counter()
                images = sample_pipeline(pipe, ps.prompts, steps, d["guidance"], suite.seed, suite.batch_size,
                                         height=d.get("height"), width=spec.width, negative_prompt=d.get("negative_prompt"),
                                         progress=progress, desc=key, **{**d.get("call_kwargs", {}), **spec.call_kwargs})
                seconds = time.perf_counter() - t0
            row = {"method": spec.label, "steps": steps, "guidance": d["guidance"]}
            row.update(score_images(metrics, images, ps, key, progress))
            row.update(samples=len(images), seconds=round(seconds, 1))
            log(f"[bench quality] {row}")
            rows.append(row)
            if suite.grids:
                grids[key] = images[: suite.grids]
        del pipe
    protocol = {
        "suite": suite.name,
        "prompts": ps.description,
        **{k: v for k, v in ps.protocol.items()},
        "seed": suite.seed,
        "seeding": "batch i uses torch.Generator().manual_seed(seed + i*batch_size)",
        "batch_size": suite.batch_size,
        "metrics": {m.name: m.describe() for m in metrics},
        "pipelines": pipelines,
        **versions(),
        "fastgen_commit": git_commit(),
    }
    return {"rows": rows, "columns": ["method", "steps", "guidance", *columns, "samples", "seconds"],
            "protocol": protocol, "_grids": grids, "_plot_columns": list(suite.plot_columns)}


#: protocol entries that must agree for rows of two quality runs to share one table
MERGE_KEYS = ("suite", "prompts", "seed", "seeding", "batch_size", "metrics")


def merge_quality(old: dict, new: dict, labels: list[str], order: list[str]) -> dict:
    """``new``'s rows for ``labels`` in place of ``old``'s, the other rows of ``old`` kept, in the suite's ``order``.

    The two runs must share the protocol (:data:`MERGE_KEYS`; the digits metric's reference and floor included);
    each pipeline records the commit its rows were measured at.
    """
    po, pn = old.get("protocol", {}), new["protocol"]
    differs = [k for k in MERGE_KEYS if json.dumps(po.get(k), sort_keys=True, default=str) != json.dumps(pn.get(k), sort_keys=True, default=str)]
    if differs:
        raise ConfigError(f"cannot keep the earlier rows: the protocol differs in {differs}; run the whole suite (without only=)")
    rank = {label: i for i, label in enumerate(order)}
    rows = [r for r in old.get("rows", []) if r["method"] not in labels and r["method"] in rank] + list(new["rows"])
    rows.sort(key=lambda r: (rank[r["method"]], r["steps"]))
    pipelines = {}
    for label in order:
        src = pn["pipelines"] if label in labels else po.get("pipelines", {})
        if label in src:
            commit = pn.get("fastgen_commit") if label in labels else src[label].get("measured_at", po.get("fastgen_commit"))
            pipelines[label] = {**src[label], "measured_at": commit}
    return {**new, "rows": rows, "protocol": {**pn, "pipelines": pipelines, "merged": f"re-measured: {', '.join(labels)}"}}


def _device(spec: SpeedSpec) -> str:
    if spec.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.device


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


#: The label suffix of a LoRA pipeline's row timed with its adapters as loaded (the main row is fused).
UNFUSED_SUFFIX = " (unfused)"


def measure_speed(suite: Suite, resolve: Resolver | None = None, log=print) -> dict:
    """Latency of every pipeline at each of its (speed) step counts, end to end and network only
    (``resolve`` as in :func:`measure_quality`).

    A pipeline carrying LoRA adapters (a LoRA export) is timed twice: as loaded, labelled
    ``<label> (unfused)``, then after ``pipe.fuse_lora()`` (:func:`fastgen.evaluation.speed.fuse_lora`, as
    LoRA students are deployed) under its own label, the main row, listed first."""
    from fastgen.evaluation.speed import fuse_lora, lora_state, measure_pipeline_speed, speed_ratio

    resolve = resolve or resolve_folder
    spec = suite.speed or SpeedSpec()
    if spec.dtype not in DTYPES:
        raise ConfigError(f"speed dtype {spec.dtype!r} unknown; choose one of {', '.join(DTYPES)}")
    device = _device(spec)
    rows, pipelines = [], {}
    for p in suite.pipelines:
        steps_to_time = p.steps if p.speed_steps is None else p.speed_steps
        if not steps_to_time:
            continue
        resolved = resolve(p)
        folder, d = resolved.folder, resolved.defaults
        pipe = load_pipeline_for_bench(folder, device, DTYPES[spec.dtype])
        pipelines[p.label] = {"folder": str(folder), "pipeline_class": type(pipe).__name__, **d}
        kwargs = {**d.get("call_kwargs", {}), **p.call_kwargs}
        if d.get("negative_prompt") is not None:
            kwargs["negative_prompt"] = [d["negative_prompt"]] * spec.batch_size

        def time_all(label: str) -> list[dict]:
            got_all = []
            for steps in steps_to_time:
                got = measure_pipeline_speed(pipe, label=label, prompt=spec.prompt, steps=steps, guidance=d["guidance"],
                                             batch_size=spec.batch_size, height=d.get("height"),
                                             width=p.width or d.get("height"), warmup=spec.warmup, repeats=spec.repeats,
                                             seed=spec.seed, scopes=tuple(spec.scopes), call_kwargs=kwargs)
                for r in got:
                    lora = f" [LoRA {r['lora']}]" if r.get("lora", "none") != "none" else ""
                    log(f"[bench speed] {r['pipeline']}@{r['steps']} {r['scope']}{lora}: median {r['latency_s_median']:.4f} s, "
                        f"p90 {r['latency_s_p90']:.4f} s")
                got_all.extend(got)
            return got_all

        if lora_state(pipe)["lora_layers"]:
            unfused = time_all(p.label + UNFUSED_SUFFIX)
            state = fuse_lora(pipe)
            rows.extend(time_all(p.label))
            rows.extend(unfused)
            pipelines[p.label]["lora"] = (f"{state['lora_layers']} LoRA layers fused with pipe.fuse_lora() (as deployed); "
                                          f"'{p.label}{UNFUSED_SUFFIX}' times the adapters as loaded")
        else:
            rows.extend(time_all(p.label))
        del pipe
    ratios, breakdown = {}, {}
    for i, pair in enumerate(([spec.ratio] if spec.ratio else []) + [list(r) for r in spec.ratios]):
        if len(pair) != 2:
            raise ConfigError(f"speed.ratios: each entry is [numerator, denominator] such as ['teacher@50', 'lcd@4'], got {pair}")
        num, den = (_parse_point(x) for x in pair)
        for scope in spec.scopes:
            ratios[f"{num[0]}@{num[1]} / {den[0]}@{den[1]} ({scope})"] = round(speed_ratio(rows, num, den, scope=scope), 3)
        if i == 0 and spec.ratio:
            breakdown = ratio_breakdown(rows, num, den)
    protocol = {"suite": suite.name, **asdict(spec), "device": device, **versions(), "fastgen_commit": git_commit(),
                "pipelines": pipelines, "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}
    return {"rows": rows, "ratios": ratios, "ratio_breakdown": breakdown, "protocol": protocol}


def score_image_folder(images: str | Path, prompts: str | Path, metrics: list[str], **settings: Any) -> dict:
    """Score a folder of already generated images against a prompt file (one prompt per image, in file
    order): ``{"row": {...}, "protocol": {...}}``. ``settings`` are :class:`Suite` metric settings
    (``clip_model``, ``hps_checkpoint``, ``hps_version``, ``inception_weights``, ``fid_reference``)."""
    from fastgen.evaluation.fid import read_image
    from fastgen.evaluation.presets import load_paired_folder

    pairs = load_paired_folder(prompts, images)
    suite = Suite("score", [PipelineSpec("images", folder=str(images))], metrics=list(metrics), **settings)
    ps = PromptSet(pairs.prompts, f"prompt file {prompts}", pairs.protocol)
    built = build_metrics(suite, ps)
    pixels = torch.stack([pairs.preprocess(read_image(f)[None])[0] for f in pairs.files]).float() / 255.0
    row = {"images": str(images), "count": len(pixels)}
    row.update(score_images(built, pixels, ps, Path(images).name, progress=suite.progress))
    return {"row": row, "protocol": {**pairs.protocol, "metrics": {m.name: m.describe() for m in built}}}


def ratio_breakdown(rows: list[dict], num: tuple[str, int], den: tuple[str, int]) -> dict:
    """Where a measured speed-up falls short of the ratio of network evaluations (images through the
    denoiser): the cost of one forward at each side's batch, and the fixed cost outside the denoiser.

    ``ms_outside_denoiser`` is the network row's ``outside_denoiser_s_median``: per call, its whole
    time minus its denoiser forwards, measured in the same calls (never negative). Rows without it (older
    results) fall back to end-to-end minus network medians, from different calls: a negative difference
    is noise (below the two medians' spread), so it is clamped to 0 and flagged
    (``outside_denoiser_clamped: true``, with ``ms_noise_band``: the larger p90 - median of the two rows)."""
    def pick(point, scope):
        for r in rows:
            if (r["pipeline"], r["steps"], r["scope"]) == (*point, scope):
                return r
        return None

    out = {}
    for tag, point in (("numerator", num), ("denominator", den)):
        net, e2e = pick(point, "network"), pick(point, "end_to_end")
        if not net or not e2e:
            return {}
        side = {"point": f"{point[0]}@{point[1]}", "forwards": net["network_evals"], "batch_per_forward": net["network_batch"],
                "image_evaluations": net["network_evals"] * net["network_batch"],
                "ms_per_forward": round(1000 * net["latency_s_median"] / max(net["network_evals"], 1), 3)}
        if net.get("outside_denoiser_s_median") is not None:
            side["ms_outside_denoiser"] = round(1000 * max(0.0, float(net["outside_denoiser_s_median"])), 3)
            side["ms_outside_denoiser_p90"] = round(1000 * max(0.0, float(net.get("outside_denoiser_s_p90") or 0.0)), 3)
            side["outside_denoiser_measured"] = "same calls: whole call minus its denoiser forwards (median)"
        else:
            diff = 1000 * (e2e["latency_s_median"] - net["latency_s_median"])
            side["ms_outside_denoiser"] = round(max(0.0, diff), 3)
            side["outside_denoiser_measured"] = "end-to-end median minus network median (different calls)"
            if diff < 0:
                side["outside_denoiser_clamped"] = True
                band = [r.get("latency_s_p90", r["latency_s_median"]) - r["latency_s_median"] for r in (net, e2e)]
                side["ms_noise_band"] = round(1000 * max(0.0, *band), 3)
        out[tag] = side
    n, d = out["numerator"], out["denominator"]
    out["ideal_ratio_by_evaluations"] = round(n["image_evaluations"] / d["image_evaluations"], 3)
    out["ratio_of_forward_counts"] = round(n["forwards"] / d["forwards"], 3)
    out["forward_cost_ratio"] = round(n["ms_per_forward"] / d["ms_per_forward"], 3)
    return out


def explain_breakdown(b: dict) -> str:
    if not b:
        return ""
    n, d = b["numerator"], b["denominator"]
    clamped = [s["point"] for s in (n, d) if s.get("outside_denoiser_clamped")]
    paired = all("ms_outside_denoiser_p90" in s for s in (n, d))
    how = ("measured in the same calls as the forwards: each call's time minus its denoiser forwards" if paired
           else "end-to-end minus network medians")
    note = (f" For {', '.join(clamped)} the end-to-end median was below the network median (separate calls, within "
            f"their noise), so its outside time is shown as 0.") if clamped else ""
    return (f"Breakdown of {n['point']} / {d['point']}: the ideal {b['ideal_ratio_by_evaluations']:g}x counts image evaluations "
            f"({n['image_evaluations']} vs {d['image_evaluations']}). Measured, {n['point']} runs {n['forwards']} forwards at "
            f"batch {n['batch_per_forward']} ({n['ms_per_forward']:.2f} ms each) and {d['point']} {d['forwards']} forwards at batch "
            f"{d['batch_per_forward']} ({d['ms_per_forward']:.2f} ms each): one batch-{n['batch_per_forward']} forward costs "
            f"{b['forward_cost_ratio']:.2f}x a batch-{d['batch_per_forward']} forward, not {n['batch_per_forward'] / d['batch_per_forward']:g}x, "
            f"so the network ratio is {b['ratio_of_forward_counts']:g} x {b['forward_cost_ratio']:.2f} = "
            f"{b['ratio_of_forward_counts'] * b['forward_cost_ratio']:.1f}x. End to end, both also pay the work outside the denoiser "
            f"(text encoding, scheduler, VAE decode, pipeline overhead; {how}): {n['ms_outside_denoiser']:.1f} ms vs "
            f"{d['ms_outside_denoiser']:.1f} ms, which pulls the end-to-end ratio further down.{note}")


def _parse_point(text: str) -> tuple[str, int]:
    label, _, steps = str(text).rpartition("@")
    if not label or not steps.isdigit():
        raise ConfigError(f"speed ratio entries look like 'label@steps', got {text!r}")
    return label, int(steps)


# ---------------------------------------------------------------------------------------------
# Reports


def primary_column(columns: list[str]) -> str:
    for c in ("digits_fid", "fid", "hps_v2.1", "hps_v2.0", "clip_score"):
        if c in columns:
            return c
    return columns[3]


LOWER_IS_BETTER = {"digits_fid", "fid", "hf_energy"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return Path(path)


def plot_quality_vs_steps(result: dict, path: Path, column: str | None = None) -> Path:
    plt = _plt()
    column = column or primary_column(result["columns"])
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    order = list(dict.fromkeys(r["method"] for r in rows))
    values = [r[column] for r in rows if r.get(column) is not None]
    # log-likelihood-like columns (all <= 0) spanning decades are drawn as -value on a log axis
    negate = bool(values) and max(values) < 0 and min(values) / max(values) > 20
    sign = -1.0 if negate else 1.0
    # pipelines run at one step count (teachers, CLEAR) are reference lines, each its own colour and dash
    ref_styles = iter([("k", "--"), ("tab:purple", "-."), ("tab:brown", ":"), ("tab:olive", "--"),
                       ("tab:cyan", "-."), ("tab:pink", ":")] * 4)
    for m in order:
        rs = sorted((r for r in rows if r["method"] == m and r.get(column) is not None), key=lambda r: r["steps"])
        if len(rs) == 1:
            color, dash = next(ref_styles)
            ax.axhline(sign * rs[0][column], ls=dash, lw=1.2, label=f"{m} ({rs[0]['steps']} steps)", color=color)
        elif rs:
            ax.plot([r["steps"] for r in rs], [sign * r[column] for r in rs], marker="o", label=m)
    mags = [sign * v for v in values]
    if mags and min(mags) > 0 and max(mags) / min(mags) > 8:
        ax.set_yscale("log")
    floor = result["protocol"].get("metrics", {}).get("digits", {}).get("real_vs_real_fid_floor")
    if floor and column == "digits_fid":
        ax.axhline(floor, color="grey", lw=0.8, ls=":", label="real-vs-real floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    if negate:
        ax.set_ylabel(f"-{column} (lower is better)")
    else:
        ax.set_ylabel(f"{column} ({'lower' if column in LOWER_IS_BETTER else 'higher'} is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def plot_quality_vs_latency(quality: dict, speed: dict, path: Path, column: str | None = None,
                            scope: str = "end_to_end") -> Path | None:
    """One point per (pipeline, step count) present in both results; teacher(s) drawn as stars."""
    plt = _plt()
    column = column or primary_column(quality["columns"])
    lat = {(r["pipeline"], r["steps"]): r["latency_s_median"] for r in speed["rows"] if r["scope"] == scope}
    pts = [(r["method"], r["steps"], lat[(r["method"], r["steps"])], r[column]) for r in quality["rows"]
           if (r["method"], r["steps"]) in lat and r.get(column) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for m in dict.fromkeys(p[0] for p in pts):
        ps = sorted((p for p in pts if p[0] == m), key=lambda p: p[2])
        teacher = "teacher" in m
        ax.plot([p[2] for p in ps], [p[3] for p in ps], marker="*" if teacher else "o", ms=11 if teacher else 6,
                ls="-" if len(ps) > 1 else "none", label=m)
        for p in ps:
            ax.annotate(f"{p[1]}", (p[2], p[3]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    values = [p[3] for p in pts]
    if min(values) > 0 and max(values) / min(values) > 8:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(f"latency per call, {scope.replace('_', ' ')} (s, median, {speed['protocol'].get('device')})")
    ax.set_ylabel(f"{column} ({'lower' if column in LOWER_IS_BETTER else 'higher'} is better)")
    ax.set_title("quality vs latency (labels: steps)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = _save_fig(fig, path)
    plt.close(fig)
    return out


def write_quality_report(result: dict, out_dir: str | Path, name: str, title: str, note: str = "") -> list[Path]:
    """``<name>.json`` / ``.md`` (``note``: a paragraph under the table), the quality-vs-steps plots and grids."""
    out_dir = Path(out_dir)
    grids = result.pop("_grids", {})
    plot_columns = result.pop("_plot_columns", [])
    atomic_write_json(out_dir / f"{name}.json", result)
    proto = result["protocol"]
    lines = [f"# {title}\n\n",
             f"Suite `{proto['suite']}`: {proto['prompts']} (sha256/16 `{proto.get('prompts_sha256_16')}`), "
             f"seed {proto['seed']}, batch {proto['batch_size']}, stock diffusers pipelines, commit `{proto['fastgen_commit']}`.\n\n",
             markdown_table(result["rows"], result["columns"]), "\n"]
    if note.strip():
        lines.append(note.strip() + "\n\n")
    for mname, desc in proto["metrics"].items():
        lines.append(f"- **{mname}**: " + ", ".join(f"{k}={v}" for k, v in desc.items() if not isinstance(v, dict)) + "\n")
    atomic_write_text(out_dir / f"{name}.md", "".join(lines))
    written = [out_dir / f"{name}.json", out_dir / f"{name}.md", plot_quality_vs_steps(result, out_dir / f"{name}_vs_steps.png")]
    for col in plot_columns:
        if col not in result["columns"]:
            raise ConfigError(f"plot_columns names {col!r}, which no metric of this suite produces ({result['columns'][3:-2]})")
        if col != primary_column(result["columns"]):
            written.append(plot_quality_vs_steps(result, out_dir / f"{name}_{col}_vs_steps.png", column=col))
    if grids:
        for key, imgs in grids.items():
            written.append(save_image_grid(imgs, out_dir / f"{name}_grids" / f"{key.replace('@', '_')}steps.png", nrow=8,
                                     upscale=max(1, 64 // imgs.shape[-1])))
    return written


SPEED_TABLE = ["pipeline", "steps", "guidance", "scope", "latency_s_median", "latency_s_p90", "images_per_s",
               "peak_mem_mb", "network_evals", "network_batch"]


def write_speed_report(result: dict, out_dir: str | Path, name: str, note: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / f"{name}.json", result)
    proto = result["protocol"]
    rows = [{**r, "outside_s": r.get("outside_denoiser_s_median")} for r in result["rows"]]
    columns = [*SPEED_TABLE, "outside_s"]
    lora_note = ""
    if any(r.get("lora", "none") != "none" for r in rows):
        columns.append("lora")
        lora_note = (" LoRA students are timed fused (`pipe.fuse_lora()`, as deployed); their "
                     f"`<label>{UNFUSED_SUFFIX}` rows time the adapters as loaded.")
    lines = [f"# Sampling speed (suite `{proto['suite']}`)\n\n",
             f"Device `{proto['device']}` ({proto['threads']} threads), dtype {proto['dtype']}, batch {proto['batch_size']}, "
             f"{proto['warmup']} warm-up + {proto['repeats']} timed calls per point, median and p90; "
             f"torch {proto['torch']}, diffusers {proto['diffusers']}, commit `{proto['fastgen_commit']}`. "
             "`end_to_end` = text encoding + all steps + VAE decode; `network` = the denoiser forwards alone "
             "(timed by hooks in separate calls, which also give `outside_s` = per call, its time minus its forwards).",
             lora_note, "\n\n", markdown_table(rows, columns), "\n"]
    for k, v in result.get("ratios", {}).items():
        lines.append(f"- **{k}**: {v}x\n")
    if result.get("ratio_breakdown"):
        lines.append("\n" + explain_breakdown(result["ratio_breakdown"]) + "\n")
    if note:
        lines.append("\n" + note.strip() + "\n")
    atomic_write_text(out_dir / f"{name}.md", "".join(lines))
    return [out_dir / f"{name}.json", out_dir / f"{name}.md"]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

