"""Recipe -> run: resolve the config (migrating keys of the old layout), build the method, prepare
the run folder and the :class:`~fastgen.trainers.engine.trainer.Trainer`.

A recipe is YAML::

    method: lcd                 # registry name (fastgen.trainers.method.METHODS)
    output_dir: runs/lcd-digits # the run folder (default: runs/<method>)
    train:                      # TrainConfig: steps, batch, per-group optimizer specs, checkpoints
      max_steps: 2000
      learning_rate: 1e-5
    teacher: {path: digits-sd}  # TeacherConfig       (shared sections, the same for every method)
    data: {source: digits}      # DataConfig
    sample: {steps: 4}          # SampleConfig
    export: {weights: target}   # ExportConfig
    lcd:                        # <method name, dashes -> underscores>: the method's algorithm options
      num_ddim_timesteps: 50

``fastgen train`` / ``python -m fastgen.workflows.train`` run it (with the training evaluator).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastgen.config import load_config, read_recipe, save_config
from fastgen.errors import ConfigError
from fastgen.trainers.engine import checkpoint as ckpt
from fastgen.trainers.engine.trainer import TrainConfig, Trainer, make_accelerator
from fastgen.data.sources import DataConfig
from fastgen.models.spec import TeacherConfig
from fastgen.trainers.method import ExportConfig, Method, SampleConfig, get_method

__all__ = [
    "run_config_class",
    "method_section",
    "load_run_config",
    "build_method",
    "prepare_run",
    "load_method_from_run",
    "migrate_recipe",
    "migrate_override",
]

_RUN_CONFIG_CLASSES: dict[type, type] = {}
_RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def method_section(method_cls: type[Method]) -> str:
    """The recipe section holding a method's options: its name with dashes -> underscores."""
    return method_cls.name.replace("-", "_")


def run_config_class(method_cls: type[Method]) -> type:
    """The dataclass of a whole run of ``method_cls``: ``output_dir``, ``train``, the shared ``teacher``,
    ``data``, ``sample``, ``export`` sections and the method's own section."""
    if method_cls in _RUN_CONFIG_CLASSES:
        return _RUN_CONFIG_CLASSES[method_cls]
    cfg_cls = method_cls.config_class
    if not (isinstance(cfg_cls, type) and dataclasses.is_dataclass(cfg_cls)):
        raise ConfigError(
            f"method '{method_cls.name}' ({method_cls.__name__}) must set `config_class` to a dataclass of its "
            f"options, got {cfg_cls!r}"
        )
    try:
        cfg_cls()
        section_field = dataclasses.field(default_factory=cfg_cls)
    except TypeError:  # required options: the recipe must give them
        section_field = dataclasses.field()
    section = method_section(method_cls)
    if section in ("output_dir", "train", "method", *SHARED_SECTIONS):
        raise ConfigError(f"method name '{method_cls.name}' clashes with a recipe key; rename the method")
    camel = "".join(part.capitalize() for part in section.split("_"))
    cls = dataclasses.make_dataclass(
        f"{camel}RunConfig",
        [
            ("output_dir", str, dataclasses.field(default=f"runs/{method_cls.name}")),
            ("train", TrainConfig, dataclasses.field(default_factory=TrainConfig)),
            ("teacher", TeacherConfig, dataclasses.field(default_factory=TeacherConfig)),
            ("data", DataConfig, dataclasses.field(default_factory=DataConfig)),
            ("sample", SampleConfig, dataclasses.field(default_factory=SampleConfig)),
            ("export", ExportConfig, dataclasses.field(default_factory=ExportConfig)),
            (section, cfg_cls, section_field),
        ],
        kw_only=True,
    )
    cls.__module__ = __name__
    cls.__doc__ = (f"A run of method '{method_cls.name}': output_dir, train, teacher, data, sample, export and "
                   f"{section} ({cfg_cls.__name__}).")
    _RUN_CONFIG_CLASSES[method_cls] = cls
    return cls


SHARED_SECTIONS = ("teacher", "data", "sample", "export")

#: keys that moved from a method's section to a shared section (old recipes and run folders still load)
LEGACY_METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher.path",),
    "resolution": ("teacher.resolution",),
    "teacher_dtype": ("teacher.dtype",),
    "max_sequence_length": ("teacher.max_sequence_length",),
    "dataset": ("data.source",),
    "use_latent_cache": ("data.latent_cache",),
    "cache_dir": ("data.cache_dir",),
    "cache_batch_size": ("data.cache_batch_size",),
    "data_samples": ("data.num_samples",),
    "data_steps": ("data.teacher_steps",),
    "data_batch_size": ("data.teacher_batch_size",),
    "data_prompts": ("data.prompts",),
    "data_guidance": ("sample.guidance_scale",),
    "sample_guidance_scale": ("sample.guidance_scale",),
    "sample_prompts": ("sample.prompts",),
    "sample_steps": ("sample.steps",),
    "eval_samples": ("sample.eval_samples",),
    "export_unet": ("export.weights",),
    "export_backend": ("export.attention_backend",),
}
#: the same for ``train:`` keys
LEGACY_TRAIN_KEYS: dict[str, tuple[str, ...]] = {
    "sample_prompts": ("sample.prompts",),
    "sample_steps": ("sample.steps",),
    "sample_seed": ("sample.seed",),
}


def _legacy_map(section: str, method_cls: type[Method]) -> dict[str, tuple[str, ...]]:
    if section == "train":
        return LEGACY_TRAIN_KEYS
    extra = dict(getattr(method_cls, "legacy_keys", {}))
    return {**LEGACY_METHOD_KEYS, **{k: tuple(v) for k, v in extra.items()}}


def _put(data: dict[str, Any], dotted: str, value: Any, old: str, where: str) -> None:
    sec, key = dotted.split(".", 1)
    node = data.setdefault(sec, {})
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: '{sec}' must be a mapping, got {node!r}")
    if key in node and node[key] != value:
        raise ConfigError(f"{where}: '{old}' (an old key, now '{dotted}') is {value!r} but '{dotted}' is {node[key]!r}; keep only '{dotted}'")
    node[key] = value


def migrate_recipe(data: dict[str, Any], method_cls: type[Method], where: str = "recipe") -> dict[str, Any]:
    """Move keys of the old layout (options of the shared sections inside the method's or ``train:``
    section) to their new place, warning once per key; conflicting old and new values are an error."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(data).items()}
    for top in [k for k in data if isinstance(k, str) and "." in k]:  # dotted top-level keys
        sec, key = top.split(".", 1)
        if isinstance(data.get(sec, {}), dict):
            data.setdefault(sec, {})[key] = data.pop(top)
    moved = []
    for section in (method_section(method_cls), "train"):
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        mapping = _legacy_map(section, method_cls)
        for old in [k for k in node if k in mapping]:
            value = node.pop(old)
            for new in mapping[old]:
                _put(data, new, value, f"{section}.{old}", where)
            moved.append(f"{section}.{old} -> {', '.join(mapping[old])}")
    default_source = getattr(method_cls, "default_data_source", None)
    if default_source and "source" not in (data.get("data") or {}):
        data.setdefault("data", {})["source"] = default_source
    if moved:
        warnings.warn(f"{where} uses keys of the old layout, read as their new names: {'; '.join(moved)}; update the recipe", UserWarning, stacklevel=3)
    return data


def migrate_override(text: str, method_cls: type[Method]) -> str:
    """``lcd.teacher=X`` -> ``teacher.path=X`` (old keys keep working on the command line)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        return text
    section, rest = key.split(".", 1)
    if section not in (method_section(method_cls), "train"):
        return text
    first, _, tail = rest.partition(".")
    new = _legacy_map(section, method_cls).get(first)
    if not new:
        return text
    if len(new) > 1:
        raise ConfigError(f"'{key}' moved to {', '.join(new)}; give those keys instead")
    warnings.warn(f"override key '{key}' moved to '{new[0]}'", UserWarning, stacklevel=3)
    return f"{new[0]}{'.' + tail if tail else ''}={value}"


def _resolve_recipe(recipe: str | os.PathLike[str]) -> tuple[Path | None, str]:
    """``(recipe file or None, method name)`` for a recipe path, a packaged recipe or a method name."""
    text = str(recipe)
    path = Path(text)
    if path.is_file() or text.endswith((".yaml", ".yml")):
        data = read_recipe(path)  # raises a clear error when missing
    elif (_RECIPES_DIR / f"{text}.yaml").is_file():
        path = _RECIPES_DIR / f"{text}.yaml"
        data = read_recipe(path)
    else:
        return None, text
    name = data.get("method")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"recipe '{path}' has no 'method:' key (or it is not a name); add e.g. `method: lcd` at the top")
    return path, name


def load_run_config(recipe: str | os.PathLike[str], overrides: Sequence[str] = ()) -> tuple[Any, type[Method]]:
    """Resolve ``recipe`` (a YAML path, a packaged recipe name or a method name) + ``key=value`` overrides.

    Returns ``(run_config, method_cls)``; ``run_config`` has ``output_dir``, ``train`` and the
    method's section. Unknown keys raise :class:`ConfigError` with a "did you mean" suggestion.
    """
    path, name = _resolve_recipe(recipe)
    method_cls = get_method(name)
    cls = run_config_class(method_cls)
    data = migrate_recipe(read_recipe(path) if path is not None else {}, method_cls, str(path or name))
    overrides = [migrate_override(o, method_cls) for o in overrides]
    cfg = load_config(cls, None, overrides, base=data, ignore_keys=("method",))
    return cfg, method_cls


def build_method(run_config: Any, method_cls: type[Method]) -> Method:
    """Construct the method from its config section, seeded with ``train.seed`` (same on every rank)."""
    from accelerate.utils import set_seed

    set_seed(run_config.train.seed)
    return method_cls(
        getattr(run_config, method_section(method_cls)),
        teacher=run_config.teacher,
        data=run_config.data,
        sample=run_config.sample,
        export=run_config.export,
    )


def _has_checkpoints(run_dir: Path) -> bool:
    cdir = ckpt.checkpoints_dir(run_dir)
    return ckpt.read_latest(cdir) is not None or bool(ckpt.list_checkpoints(cdir))


def prepare_run(
    recipe: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    resume: str | os.PathLike[str] | None = None,
    evaluator: Any = None,
) -> tuple[Trainer, Any]:
    """Everything :func:`train` does before the loop: returns ``(trainer, run_config)``.

    Checks the run folder (a fresh run must not find checkpoints there; a resume must find one),
    writes RUN_DIR/config.yaml (``method:`` first) on the main process, builds the method.
    """
    cfg, method_cls = load_run_config(recipe, overrides)
    run_dir = Path(cfg.output_dir)
    if resume is None and _has_checkpoints(run_dir):
        raise ConfigError(
            f"run folder '{run_dir}' already holds checkpoints; continue it with --resume latest "
            "(resume='latest'), or start a fresh run in another folder (output_dir=...)"
        )
    if resume is not None:
        ckpt.find_checkpoint(run_dir, resume, purpose="resume")  # fail before writing anything
    accelerator = make_accelerator(cfg.train, run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", header={"method": method_cls.name})
    accelerator.wait_for_everyone()
    method = build_method(cfg, method_cls)
    return Trainer(method, cfg.train, run_dir, accelerator=accelerator, evaluator=evaluator), cfg


def load_method_from_run(
    run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] = "latest", device: str = "cpu"
) -> tuple[Method, Any]:
    """Rebuild a run's method from RUN_DIR/config.yaml and load a finished checkpoint's weights.

    Returns ``(method, run_config)`` with the method in eval mode on ``device``.

    Raises:
        CheckpointError (a ModelLoadError): no config.yaml, or no finished checkpoint.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ckpt.CheckpointError(
            f"'{run_dir}' is not a fastgen run folder: '{cfg_path}' is missing; pass the output_dir of a "
            "training run (it holds config.yaml and checkpoints/)"
        )
    data = read_recipe(cfg_path)
    name = data.get("method")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"'{cfg_path}' has no 'method:' key; it was not written by fastgen's trainer")
    method_cls = get_method(name)
    cfg = load_config(run_config_class(method_cls), None, base=migrate_recipe(data, method_cls, str(cfg_path)), ignore_keys=("method",))
    path = ckpt.find_checkpoint(run_dir, checkpoint, purpose="load")
    method = build_method(cfg, method_cls)
    method.load_checkpoint_state_dict(ckpt.load_model_state(path, device="cpu"))
    method.to(device)
    method.eval()
    return method, cfg
