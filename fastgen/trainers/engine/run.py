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

The run folder is claimed with :func:`fastgen.io.claim_folder`: it must be absent, empty or a fastgen
run folder; a folder holding anything else is refused and left untouched. A resume keeps the run's
config.yaml and compares it (with the changes accepted at earlier resumes, config-changes.jsonl) to
the new configuration: keys outside :data:`FREE_CONFIG_KEYS` must not change unless named in
``allow_config_change`` (``--allow-config-change KEY ...``); accepted changes are appended to
RUN_DIR/config-changes.jsonl with the step they start at.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastgen.config import config_to_dict, load_config, read_recipe, save_config
from fastgen.errors import ConfigError
from fastgen.io import check_folder, claim_folder
from fastgen.trainers.engine import checkpoint as ckpt
from fastgen.trainers.engine.optim import check_optimizers_available
from fastgen.trainers.engine.trainer import CONFIG_CHANGES_FILE, TrainConfig, Trainer, make_accelerator
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
    "FREE_CONFIG_KEYS",
    "config_changes",
    "read_config_changes",
    "saved_run_config",
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
    method = method_cls(
        getattr(run_config, method_section(method_cls)),
        teacher=run_config.teacher,
        data=run_config.data,
        sample=run_config.sample,
        export=run_config.export,
    )
    method.configure_training(int(run_config.train.max_steps), Path(run_config.output_dir))
    return method


def _has_checkpoints(run_dir: Path) -> bool:
    cdir = ckpt.checkpoints_dir(run_dir)
    return ckpt.read_latest(cdir) is not None or bool(ckpt.list_checkpoints(cdir))


# --------------------------------------------------------------------------- configuration changes at a resume

#: keys that may change between a run and its resume without ``--allow-config-change``: they only set
#: logging, sampling, evaluation and checkpoint cadence, the run's length or where it lives (a section
#: name covers all its keys). With a cosine or linear LR schedule a new ``train.max_steps`` moves the
#: end of the decay. Every other key alters the optimisation.
FREE_CONFIG_KEYS: tuple[str, ...] = (
    "output_dir",
    "train.max_steps",
    "train.log_every",
    "train.log_with",
    "train.progress",
    "train.sample_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.num_workers",
    "train.fsdp_frozen",  # where frozen weights live under FSDP, not what is computed
    "sample",
    "export",
)

_ABSENT = object()


def _covers(prefixes: Sequence[str], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _apply_change(data: dict[str, Any], record: dict[str, Any]) -> None:
    *parents, last = str(record["key"]).split(".")
    node = data
    trail = []
    for part in parents:
        if not isinstance(node.get(part), dict):
            if record.get("removed"):
                return
            node[part] = {}
        trail.append((node, part))
        node = node[part]
    if record.get("removed"):
        node.pop(last, None)
        for parent, part in reversed(trail):  # drop mappings the removal left empty
            if parent[part]:
                break
            del parent[part]
    else:
        node[last] = record.get("new")


def read_config_changes(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of RUN_DIR/config-changes.jsonl (a torn last line from a kill is skipped)."""
    path = Path(run_dir) / CONFIG_CHANGES_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("key"), str) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def saved_run_config(
    run_dir: str | os.PathLike[str], up_to_step: int | None = None, *, quiet: bool = False
) -> tuple[Any, type[Method]]:
    """The configuration a run was trained with up to ``up_to_step``: RUN_DIR/config.yaml (keys of the old
    layout migrated) plus the changes accepted at resumes up to that step (config-changes.jsonl; all of
    them when None). Returns ``(run_config, method_cls)``.

    Raises:
        CheckpointError: no config.yaml; ConfigError: it names no method or cannot be read.
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
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", UserWarning)
        data = migrate_recipe(data, method_cls, str(cfg_path))
    for record in read_config_changes(run_dir):
        if up_to_step is None or record["step"] <= up_to_step:
            _apply_change(data, record)
    cfg = load_config(run_config_class(method_cls), None, base=data, ignore_keys=("method",))
    return cfg, method_cls


def config_changes(saved: Any, new: Any, allow: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every key whose value differs between two run configurations, as records ``{"key", "old", "new",
    "reason"}`` (``"added": True`` / ``"removed": True`` where one side lacks the key). ``reason``:
    ``"free"`` (:data:`FREE_CONFIG_KEYS`), ``"allowed"`` (covered by ``allow``: a key or a section) or
    None (refused at a resume)."""
    old_keys, new_keys = _flatten(config_to_dict(saved)), _flatten(config_to_dict(new))
    out = []
    for key in sorted(set(old_keys) | set(new_keys)):
        a, b = old_keys.get(key, _ABSENT), new_keys.get(key, _ABSENT)
        if a == b:
            continue
        reason = "free" if _covers(FREE_CONFIG_KEYS, key) else "allowed" if _covers(allow, key) else None
        record: dict[str, Any] = {"key": key, "old": None if a is _ABSENT else a, "new": None if b is _ABSENT else b, "reason": reason}
        if a is _ABSENT:
            record["added"] = True
        if b is _ABSENT:
            record["removed"] = True
        out.append(record)
    return out


def _show(record: dict[str, Any], side: str) -> str:
    if record.get("added" if side == "old" else "removed"):
        return "(unset)"
    return json.dumps(record[side], default=str)


def _resume_changes(cfg: Any, method_cls: type[Method], run_dir: Path, checkpoint: Path, allow: Sequence[str]) -> list[dict[str, Any]]:
    """Compare the configuration of ``checkpoint``'s run with ``cfg``; refuse changes that alter the optimisation."""
    source = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else run_dir
    if not (source / "config.yaml").is_file():
        source = run_dir
    if not (source / "config.yaml").is_file():
        warnings.warn(f"no config.yaml next to checkpoint '{checkpoint}'; the resumed configuration is not compared")
        return []
    step = int(ckpt.load_trainer_state(checkpoint)["step"])
    try:
        saved, saved_cls = saved_run_config(source, step, quiet=True)
    except ConfigError as exc:
        raise ConfigError(f"cannot read the configuration of the run to resume ('{source / 'config.yaml'}'): {exc}") from exc
    if saved_cls is not method_cls:
        raise ConfigError(
            f"'{source}' is a run of method '{saved_cls.name}', the recipe is for '{method_cls.name}'; resume with "
            f"a recipe of method '{saved_cls.name}', or start a fresh run in another folder (output_dir=...)"
        )
    known = set(_flatten(config_to_dict(cfg))) | set(_flatten(config_to_dict(saved)))
    unknown = [a for a in allow if not any(_covers([a], k) for k in known)]
    if unknown:
        raise ConfigError(f"--allow-config-change names {', '.join(unknown)}, not keys of a '{method_cls.name}' run; "
                          "name keys as in config.yaml, e.g. train.learning_rate")
    changes = config_changes(saved, cfg, allow)
    refused = [c for c in changes if c["reason"] is None]
    if refused:
        listed = "; ".join(f"{c['key']}: {_show(c, 'old')} -> {_show(c, 'new')}" for c in refused)
        raise ConfigError(
            f"cannot resume '{run_dir}' from '{checkpoint.name}' with this configuration: it changes key(s) that "
            f"alter the optimisation: {listed}. Resume with the values the run was trained with ('{source / 'config.yaml'}'"
            f" and {CONFIG_CHANGES_FILE}), start a new run in another folder (output_dir=...), or accept the change(s) "
            f"with --allow-config-change {' '.join(c['key'] for c in refused)} (recorded in {CONFIG_CHANGES_FILE})"
        )
    return changes


def prepare_run(
    recipe: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    resume: str | os.PathLike[str] | None = None,
    evaluator: Any = None,
    allow_config_change: Sequence[str] = (),
) -> tuple[Trainer, Any]:
    """Everything :func:`train` does before the loop: returns ``(trainer, run_config)``.

    Claims the run folder (absent, empty or a fastgen run folder; :func:`fastgen.io.claim_folder`); a
    fresh run must not find checkpoints there, a resume must find one (``resume``: ``"latest"``,
    ``"previous"``, a checkpoint name or path). A fresh run writes RUN_DIR/config.yaml (``method:``
    first); a resume keeps it and refuses configuration changes that alter the optimisation (anything
    outside :data:`FREE_CONFIG_KEYS`) unless ``allow_config_change`` names the key (or its section);
    accepted changes are recorded in RUN_DIR/config-changes.jsonl with the step. Builds the method.

    Raises:
        ConfigError: the folder is not a run folder, cannot be written, or the configuration changed.
        CheckpointError: nothing to resume from, or its trainer state is corrupt.
    """
    cfg, method_cls = load_run_config(recipe, overrides)
    check_optimizers_available(cfg.train)  # e.g. prodigy without prodigyopt: before any folder or teacher
    run_dir = Path(cfg.output_dir)
    if os.environ.get("RANK", "0") == "0":
        # the main process checks, then claims the folder below; another rank checking at the same moment
        # could find the claim's marker half-written (a temp file) and refuse the folder
        check_folder(run_dir, "run", error=ConfigError)
    if resume is None and _has_checkpoints(run_dir):
        raise ConfigError(
            f"run folder '{run_dir}' already holds checkpoints; continue it with --resume latest "
            "(resume='latest'), or start a fresh run in another folder (output_dir=...)"
        )
    changes: list[dict[str, Any]] = []
    if resume is not None:
        path = ckpt.find_checkpoint(run_dir, resume, purpose="resume")  # fail before writing anything
        changes = _resume_changes(cfg, method_cls, run_dir, path, list(allow_config_change))
    keep_config = resume is not None and (run_dir / "config.yaml").is_file()
    accelerator = make_accelerator(cfg.train, run_dir)
    if accelerator.is_main_process:
        claim_folder(run_dir, "run", error=ConfigError, info={"method": method_cls.name})
        if not keep_config:
            try:
                save_config(cfg, run_dir / "config.yaml", header={"method": method_cls.name})
            except OSError as exc:
                raise ConfigError(f"cannot write '{run_dir / 'config.yaml'}': {exc}; choose an output_dir you can write to") from exc
    accelerator.wait_for_everyone()
    method = build_method(cfg, method_cls)
    trainer = Trainer(method, cfg.train, run_dir, accelerator=accelerator, evaluator=evaluator, config_changes=changes)
    return trainer, cfg


def load_method_from_run(
    run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] = "latest", device: str = "cpu"
) -> tuple[Method, Any]:
    """Rebuild a run's method from RUN_DIR/config.yaml (with the changes accepted at resumes up to the
    checkpoint, config-changes.jsonl) and load a finished checkpoint's weights (``checkpoint``:
    ``"latest"``, ``"previous"``, a name or a path).

    Returns ``(method, run_config)`` with the method in eval mode on ``device``.

    Raises:
        CheckpointError (a ModelLoadError): no config.yaml, no finished checkpoint, or a corrupt one.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        saved_run_config(run_dir)  # raises the "not a fastgen run folder" error
    path = ckpt.find_checkpoint(run_dir, checkpoint, purpose="load")
    step = ckpt.load_trainer_state(path, purpose="load")["step"]
    # a change accepted at a resume from step S applies to the training after S, not to checkpoint S itself
    cfg, method_cls = saved_run_config(run_dir, step - 1)
    method = build_method(cfg, method_cls)
    method.load_checkpoint_state_dict(ckpt.load_model_state(path, device="cpu", purpose="load"))
    method.to(device)
    method.eval()
    return method, cfg
