"""``fastgen train``: recipe -> run folder, with the in-training evaluation wired in.

The trainer (:mod:`fastgen.trainers.engine`) knows nothing of metrics; this module hands it the
:class:`~fastgen.evaluation.training.TrainingEvaluator` (digits-FID and accuracies of the student's
samples on the digits world, nothing elsewhere), so evaluation never trains and training never
imports evaluation. Multi-process runs::

    accelerate launch --multi_gpu --num_processes 2 -m fastgen.workflows.train lcd-digits
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

__all__ = ["train", "main", "build_parser"]


def train(
    recipe: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    resume: str | os.PathLike[str] | None = None,
) -> Path:
    """Train the run described by ``recipe`` + ``overrides`` (see :func:`~fastgen.trainers.engine.run.prepare_run`);
    returns the run folder. ``resume``: None (fresh run), ``"latest"`` or a checkpoint folder."""
    trainer, _ = prepare_run(recipe, overrides, resume, evaluator=TrainingEvaluator())
    trainer.train(resume=resume)
    return trainer.run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastgen.workflows.train",
        description="Train a fastgen method from a recipe (YAML path, packaged recipe or method name).",
    )
    p.add_argument("recipe", help="recipe YAML, packaged recipe name, or method name")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="'latest' (default) or a checkpoint folder")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (registers methods defined outside fastgen)")
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
