"""``fastgen train``: recipe -> run folder, with the in-training evaluation wired in.

The trainer (:mod:`fastgen.trainers.engine`) knows nothing of metrics; this module hands it the
:class:`~fastgen.evaluation.training.TrainingEvaluator` (digits-FID and accuracies of the student's
samples on the digits world, nothing elsewhere), so evaluation never trains and training never
imports evaluation. Multi-process runs::

    accelerate launch --multi_gpu --num_processes 2 -m fastgen.workflows.train lcd-digits

Resuming: ``--resume`` (= ``latest``), ``--resume previous`` (the finished checkpoint before the
latest, e.g. when the latest is corrupt) or a checkpoint folder. A resume refuses configuration
changes that alter the optimisation unless named: ``--allow-config-change train.learning_rate``
(recorded in RUN_DIR/config-changes.jsonl; see :func:`~fastgen.trainers.engine.run.prepare_run`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fastgen.errors import FastgenError
from fastgen.evaluation.training import TrainingEvaluator
from fastgen.trainers.engine.run import prepare_run

__all__ = ["train", "main", "build_parser", "add_resume_arguments", "split_allowed_changes"]


def train(
    recipe: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    resume: str | os.PathLike[str] | None = None,
    allow_config_change: Sequence[str] = (),
) -> Path:
    """Train the run described by ``recipe`` + ``overrides`` (see :func:`~fastgen.trainers.engine.run.prepare_run`);
    returns the run folder. ``resume``: None (fresh run), ``"latest"``, ``"previous"`` or a checkpoint folder;
    ``allow_config_change``: keys (or sections) whose change from the saved configuration a resume accepts."""
    trainer, _ = prepare_run(recipe, overrides, resume, evaluator=TrainingEvaluator(), allow_config_change=allow_config_change)
    trainer.train(resume=resume)
    return trainer.run_dir


def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    """``--resume [latest|previous|CHECKPOINT]`` and ``--allow-config-change KEY [KEY ...]``."""
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue the run: 'latest' (default), 'previous' (the finished checkpoint before the latest) "
                        "or a checkpoint folder")
    p.add_argument("--allow-config-change", dest="allow_config_change", nargs="+", action="extend", default=[],
                   metavar="KEY", help="on --resume, accept a changed value of KEY (e.g. train.learning_rate, or a "
                   "whole section); recorded in RUN_DIR/config-changes.jsonl")


def split_allowed_changes(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``(overrides, allowed keys)``: a ``key=value`` given after ``--allow-config-change`` is an override."""
    allowed = [k for k in args.allow_config_change if "=" not in k]
    overrides = [*args.overrides, *(k for k in args.allow_config_change if "=" in k)]
    return overrides, allowed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastgen.workflows.train",
        description="Train a fastgen method from a recipe (YAML path, packaged recipe or method name).",
    )
    p.add_argument("recipe", help="recipe YAML, packaged recipe name, or method name")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    add_resume_arguments(p)
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (registers methods defined outside fastgen)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        for mod in args.imports:
            importlib.import_module(mod)
        overrides, allowed = split_allowed_changes(args)
        run_dir = train(args.recipe, overrides, resume=args.resume, allow_config_change=allowed)
    except FastgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
