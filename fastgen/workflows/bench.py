"""``fastgen bench quality|speed|run``: suites of teacher and student pipelines, measured under one protocol.

A suite (YAML, see ``benchmarks/suites/``) is read by :func:`load_suite` into the typed
:class:`~fastgen.evaluation.bench.Suite`. A pipeline given as a ``recipe`` is made here: its run folder
``runs/<run_name or recipe>`` is reused when finished (and trained with the same configuration),
trained or resumed otherwise, then exported to ``runs/exports/<run_name or recipe>``. The measurements,
metrics and reports themselves live in :mod:`fastgen.evaluation.bench`, which never trains.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from fastgen.config import load_config
from fastgen.errors import ConfigError
from fastgen.evaluation.bench import (
    PipelineSpec,
    ResolvedPipeline,
    Resolver,
    SpeedSpec,
    Suite,
    measure_quality,
    measure_speed,
    merge_quality,
    plot_quality_vs_latency,
    read_json,
    resolve_folder,
    write_quality_report,
    write_speed_report,
)

__all__ = [
    "PipelineSpec",
    "SPEED_NOTE",
    "SpeedSpec",
    "Suite",
    "bench_quality",
    "bench_speed",
    "ensure_recipe_export",
    "export_run",
    "load_suite",
    "recipe_resolver",
    "resolve_pipeline",
    "run_quality",
    "run_speed",
    "train",
]

SUITES_DIR = Path("benchmarks/suites")

SPEED_NOTE = """The ideal speed-up of a 4-step student over a 50-step CFG teacher is 100/4 = 25x in image
evaluations. Measured ratios are lower because a batch-2 forward (CFG's cond+uncond) costs less than two
batch-1 forwards, and because both pipelines pay the same work outside the denoiser. LoRA students are
timed fused (`pipe.fuse_lora()`), as they are deployed; the `(unfused)` rows show the adapters' own cost."""


# ---------------------------------------------------------------------------------------------
# Suite files


def _suite_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    cand = SUITES_DIR / f"{path}.yaml"
    if cand.is_file():
        return cand
    raise ConfigError(f"suite file {path} not found (nor {cand}); pass a YAML path such as benchmarks/suites/digits.yaml")


def _is_indexed(item: str) -> bool:
    key = item.partition("=")[0].strip()
    return "=" in item and any(part.isdigit() for part in key.split("."))


def _apply_indexed(suite: Suite, item: str) -> Suite:
    """``pipelines.1.steps=[4]``: the override ``steps=[4]`` applied to pipeline 1 (typed, like any other)."""
    key, _, text = item.partition("=")
    name, index, *rest = key.strip().split(".")
    items = getattr(suite, name, None) if name in {f.name for f in dataclasses.fields(Suite)} else None
    if not isinstance(items, list) or not index.isdigit() or not rest or not all(dataclasses.is_dataclass(x) for x in items):
        raise ConfigError(f"override {item!r}: only list sections take an index, as in pipelines.<index>.<key>=<value> "
                          f"(e.g. pipelines.1.steps=[4])")
    i = int(index)
    if i >= len(items):
        raise ConfigError(f"override {item!r}: {i} is not a valid list index (0..{len(items) - 1}) of '{name}'")
    try:
        items[i] = load_config(type(items[i]), overrides=[f"{'.'.join(rest)}={text}"], base=items[i])
    except ConfigError as exc:
        raise ConfigError(f"override {item!r} ({name}[{i}]): {exc}") from exc
    return dataclasses.replace(suite)  # re-validates the suite (unique labels)


def load_suite(path: str | os.PathLike[str], overrides: Sequence[str] | None = None) -> Suite:
    """Read a suite YAML (a path, or the name of one in ``benchmarks/suites``) with ``key=value``
    ``overrides`` (``samples=200``, ``speed.repeats=3``, ``pipelines.1.steps=[2]``).

    Raises:
        ConfigError: the file is missing or not valid YAML, a key is unknown (with a suggestion), a
            value has the wrong type, or a pipeline is incomplete.
    """
    p = _suite_path(path)
    overrides = list(overrides or [])
    try:
        suite = load_config(Suite, p, [o for o in overrides if not _is_indexed(o)])
        for item in overrides:
            if _is_indexed(item):
                suite = _apply_indexed(suite, item)
    except ConfigError as exc:
        if str(p) in str(exc):
            raise
        raise ConfigError(f"suite {p}: {exc}") from exc
    return suite


# ---------------------------------------------------------------------------------------------
# Recipe pipelines: trained (or reused), then exported


def train(recipe: str, overrides: Sequence[str] = (), resume: str | None = None) -> Path:
    """Train ``recipe`` (:func:`fastgen.workflows.train.train`); returns the run folder."""
    from fastgen.workflows.train import train as train_recipe

    return train_recipe(recipe, overrides, resume=resume)


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Export the latest checkpoint of ``run_dir`` (:func:`fastgen.workflows.export.export_run`)."""
    from fastgen.workflows.export import export_run as export

    return export(run_dir, out_dir, overwrite=overwrite)


def _finished(run_dir: Path) -> bool:
    """The run's latest checkpoint is at its ``max_steps`` (as extended by accepted resume changes)."""
    from fastgen.trainers.engine.run import saved_run_config

    try:
        cfg, _ = saved_run_config(run_dir, quiet=True)
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("step", 0) >= cfg.train.max_steps


#: keys that change how a run is watched, not what it trains: a run differing only in these is reused
LOGGING_ONLY_KEYS = ("train.progress", "train.log_every", "train.log_with", "train.num_workers")


def _free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in LOGGING_ONLY_KEYS)


def _check_same_recipe(run_dir: Path, recipe: str, overrides: list[str]) -> None:
    """A run folder is only reused for the recipe (and overrides) it was trained with (its config.yaml plus
    the changes accepted when it was resumed, e.g. a longer ``train.max_steps``); keys that only change
    logging (:data:`LOGGING_ONLY_KEYS`) may differ."""
    from fastgen.config import config_to_dict
    from fastgen.trainers.engine.run import load_run_config, saved_run_config

    if not (run_dir / "config.yaml").is_file():
        return
    saved = config_to_dict(saved_run_config(run_dir, quiet=True)[0])
    cfg, _ = load_run_config(recipe, overrides)
    wanted = json.loads(json.dumps(config_to_dict(cfg), default=str))
    saved = json.loads(json.dumps(saved, default=str))
    wanted.pop("output_dir", None)  # a run folder may be moved or renamed
    saved.pop("output_dir", None)

    def diff(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                yield from diff(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            yield prefix[:-1]

    keys = [k for k in diff(wanted, saved) if not _free(k)]
    if keys:
        raise ConfigError(f"{run_dir} was trained with a different configuration than recipe {recipe!r} "
                          f"with overrides {overrides[:-1]} (differs in: {', '.join(keys[:6])}); move or delete that "
                          f"run folder, or give this pipeline another run_name")


def ensure_recipe_export(recipe: str, runs_dir: str | Path, log=print, overrides: list[str] | None = None,
                         run_name: str | None = None) -> Path:
    """``runs/<run_name or recipe>`` trained to its last step (trained or resumed here when needed), exported
    to ``runs/exports/<run_name or recipe>`` (re-exported when the run is newer than the export)."""
    runs = Path(runs_dir)
    name = run_name or recipe
    run_dir, out = runs / name, runs / "exports" / name
    latest = run_dir / "checkpoints" / "latest"
    _check_same_recipe(run_dir, recipe, [*(overrides or []), f"output_dir={run_dir}"])
    if not _finished(run_dir):
        log(f"[bench] training {recipe} into {run_dir} ({'resuming' if latest.exists() else 'from scratch'})")
        train(recipe, [*(overrides or []), f"output_dir={run_dir}"], resume="latest" if latest.exists() else None)
    stamp = out / "fastgen_export.json"
    if not stamp.is_file() or stamp.stat().st_mtime < latest.stat().st_mtime:
        log(f"[bench] exporting {run_dir} -> {out}")
        export_run(run_dir, out, overwrite=True)
    return out


def recipe_resolver(runs_dir: str | Path, log=print) -> Resolver:
    """A resolver for :func:`~fastgen.evaluation.bench.measure_quality` / ``measure_speed``: folders and
    aliases as they are, recipes trained (or reused) and exported under ``runs_dir`` first; a recipe
    pipeline's protocol entry names the recipe, its overrides and the run's saved configuration."""

    def resolve(spec: PipelineSpec) -> ResolvedPipeline:
        if not spec.recipe:
            return resolve_folder(spec)
        folder = ensure_recipe_export(spec.recipe, runs_dir, log, spec.overrides, spec.run_name)
        resolved = resolve_folder(spec, folder)
        run_dir = Path(runs_dir) / (spec.run_name or spec.recipe)
        resolved.info = {"recipe": spec.recipe, "overrides": list(spec.overrides),
                         "run_config": yaml.safe_load((run_dir / "config.yaml").read_text())}
        return resolved

    return resolve


def resolve_pipeline(spec: PipelineSpec, runs_dir: str | Path, log=print) -> tuple[Path, dict]:
    """The folder to load and the sampling defaults (guidance, size) for ``spec`` (recipes trained first)."""
    resolved = recipe_resolver(runs_dir, log)(spec)
    return resolved.folder, resolved.defaults


# ---------------------------------------------------------------------------------------------
# Suites


def run_quality(suite: Suite, log=print, progress: bool | None = None, reuse: dict[str, dict] | None = None) -> dict:
    """Sample every pipeline at each of its step counts under one protocol and score it (recipes trained first).
    ``progress`` (default ``suite.progress``) and ``reuse`` (images already sampled, by ``"label@steps"``):
    see :func:`~fastgen.evaluation.bench.measure_quality`."""
    return measure_quality(suite, recipe_resolver(suite.runs_dir, log), log, progress=progress, reuse=reuse)


def run_speed(suite: Suite, log=print) -> dict:
    """Latency of every pipeline at each of its (speed) step counts, end to end and network only."""
    return measure_speed(suite, recipe_resolver(suite.runs_dir, log), log)


def bench_quality(suite: Suite, out_dir: str | Path, log=print) -> list[Path]:
    """:func:`run_quality`, then ``<out>/<suite>.json/.md`` and the plots; with a speed result of the suite
    already in ``out_dir`` (``bench speed`` ran first), also the quality-vs-latency scatter."""
    out_dir = Path(out_dir)
    if suite.only:  # re-measure some rows, keep the others of the existing results
        old = read_json(out_dir / f"{suite.name}.json")
        if old is None:
            raise ConfigError(f"only={suite.only}: no earlier {out_dir / (suite.name + '.json')} to keep the other rows of; "
                              "run the whole suite first")
        proto = old.get("protocol", {})
        cheap = {"suite": suite.name, "seed": suite.seed, "batch_size": suite.batch_size}
        differs = [k for k, v in cheap.items() if proto.get(k) != v]
        if differs:  # before sampling anything
            raise ConfigError(f"cannot keep the earlier rows: the protocol differs in {differs}; run the whole suite "
                              "(without only=)")
        order = [p.label for p in suite.pipelines]
        part = dataclasses.replace(suite, pipelines=[p for p in suite.pipelines if p.label in suite.only])
        result = merge_quality(old, run_quality(part, log), list(suite.only), order)
    else:
        result = run_quality(suite, log)
    files = write_quality_report(result, out_dir, suite.name, suite.display_title)
    speed = read_json(out_dir / f"{(suite.speed.name if suite.speed else 'sampling_speed')}.json")
    if speed:
        png = plot_quality_vs_latency(result, speed, out_dir / f"{suite.name}_vs_latency.png")
        if png:
            files.append(png)
    return files


def bench_speed(suite: Suite, out_dir: str | Path, note: str = SPEED_NOTE, log=print) -> list[Path]:
    """:func:`run_speed`, then ``<out>/<speed name>.json/.md``."""
    result = run_speed(suite, log)
    return write_speed_report(result, out_dir, (suite.speed or SpeedSpec()).name, note)
