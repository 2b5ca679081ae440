"""Recipe -> run: resolve the config, create (or resume) the run folder, train.

A recipe is YAML::

    method: lcd                 # registry name (fastgen.trainers.method.METHODS)
    output_dir: runs/lcd-digits # the run folder (default: runs/<method>)
    train:                      # fastgen.trainers.engine.trainer.TrainConfig
      max_steps: 2000
      learning_rate: 1e-5
    lcd:                        # <method name, dashes -> underscores>: method_cls.config_class
      num_ddim_timesteps: 50

Command line (``fastgen train`` calls the same :func:`train`)::

    python -m fastgen.trainers.engine.run recipe.yaml train.max_steps=100 lcd.w_max=8 [--resume latest]
    python -m fastgen.trainers.engine.run lcd output_dir=runs/x           # a method name: its defaults

``--import MODULE`` (repeatable) imports a module first, so that methods defined outside fastgen
(e.g. test doubles) register themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastgen.config import load_config, read_recipe, save_config
from fastgen.errors import ConfigError, FastgenError
from fastgen.trainers.engine import checkpoint as ckpt
from fastgen.trainers.engine.trainer import TrainConfig, Trainer, make_accelerator
from fastgen.trainers.method import Method, get_method

__all__ = [
    "run_config_class",
    "method_section",
    "load_run_config",
    "build_method",
    "prepare_run",
    "train",
    "load_method_from_run",
    "main",
]

_RUN_CONFIG_CLASSES: dict[type, type] = {}
_RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def method_section(method_cls: type[Method]) -> str:
    """The recipe section holding a method's options: its name with dashes -> underscores."""
    return method_cls.name.replace("-", "_")


def run_config_class(method_cls: type[Method]) -> type:
    """The dataclass of a whole run of ``method_cls``: ``output_dir``, ``train``, ``<method>``."""
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
    if section in ("output_dir", "train", "method"):
        raise ConfigError(f"method name '{method_cls.name}' clashes with a recipe key; rename the method")
    camel = "".join(part.capitalize() for part in section.split("_"))
    cls = dataclasses.make_dataclass(
        f"{camel}RunConfig",
        [
            ("output_dir", str, dataclasses.field(default=f"runs/{method_cls.name}")),
            ("train", TrainConfig, dataclasses.field(default_factory=TrainConfig)),
            (section, cfg_cls, section_field),
        ],
        kw_only=True,
    )
    cls.__module__ = __name__
    cls.__doc__ = f"A run of method '{method_cls.name}': output_dir, train ({TrainConfig.__name__}), {section} ({cfg_cls.__name__})."
    _RUN_CONFIG_CLASSES[method_cls] = cls
    return cls


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
    cfg = load_config(cls, path, list(overrides), ignore_keys=("method",))
    return cfg, method_cls


def build_method(run_config: Any, method_cls: type[Method]) -> Method:
    """Construct the method from its config section, seeded with ``train.seed`` (same on every rank)."""
    from accelerate.utils import set_seed

    set_seed(run_config.train.seed)
    return method_cls(getattr(run_config, method_section(method_cls)))


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


def train(
    recipe: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    resume: str | os.PathLike[str] | None = None,
) -> Path:
    """Train a run described by ``recipe`` + ``overrides``; returns the run folder.

    ``resume``: None (a fresh run; the folder must not hold checkpoints yet), ``"latest"`` or a
    checkpoint folder. The resolved config is saved to RUN_DIR/config.yaml (``method:`` first).
    """
    trainer, _ = prepare_run(recipe, overrides, resume)
    trainer.train(resume=resume)
    return trainer.run_dir


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
    cfg = load_config(run_config_class(method_cls), cfg_path, ignore_keys=("method",))
    path = ckpt.find_checkpoint(run_dir, checkpoint, purpose="load")
    method = build_method(cfg, method_cls)
    method.load_checkpoint_state_dict(ckpt.load_model_state(path, device="cpu"))
    method.to(device)
    method.eval()
    return method, cfg


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastgen.trainers.engine.run",
        description="Train a fastgen method from a recipe (YAML path, packaged recipe or method name).",
    )
    p.add_argument("recipe", help="recipe YAML, packaged recipe name, or method name")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="'latest' (default) or a checkpoint folder")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help="import MODULE first (registers extra methods)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        for mod in args.imports:
            importlib.import_module(mod)
        run_dir = train(args.recipe, args.overrides, resume=args.resume)
    except FastgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
