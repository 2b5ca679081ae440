"""The contract between a distillation method and the one generic training loop.

A :class:`Method` owns its networks (student, EMA target, discriminator, ...) and knows its
math; the :class:`~fastgen.trainers.engine.trainer.Trainer` owns everything else: accelerate, optimizers,
LR schedules, gradient clipping with a NaN/Inf guard, progress, logging, sample grids,
checkpoints and resume. A method says which parameter groups exist, which of them step at a
given iteration, and returns one loss per group from :meth:`Method.train_step`.

Run folder layout (written by the trainer, read by export)::

    RUN_DIR/
      config.yaml                      resolved run config (``method:`` key first)
      checkpoints/checkpoint-000200/   one finished checkpoint (written to a temp folder, then renamed)
        model.safetensors              Method.checkpoint_state_dict()
        optimizers.pt                  optimizer + LR-scheduler states (tensors only; weights_only=True)
        trainer_state.json             step, data position, counters, RNG file names
        rng.pt                         torch / numpy / python RNG states (weights_only-safe)
      checkpoints/latest               text file: name of the newest finished checkpoint
      samples/step-000200.png          sample grids with fixed prompts and seeds
      logs/                            tensorboard
      metrics.jsonl                    periodic quick digits-FID and other evaluations
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass
class StepOutput:
    """What one training iteration returns.

    ``losses`` maps an optimizer (parameter-group) name to the scalar loss whose gradient steps
    that optimizer this iteration; ``logs`` are floats for the progress bar and trackers.
    """

    losses: dict[str, torch.Tensor]
    logs: dict[str, float] = field(default_factory=dict)


class Method(torch.nn.Module):
    """Base class of every distillation method (LCD, RG-LCD, SCott, BOOT, DisBack, CLEAR)."""

    #: registry name, e.g. "lcd"; used in recipes (``method: lcd``) and the CLI.
    name: ClassVar[str] = ""
    #: dataclass of the method's options (the ``method`` section of a recipe).
    config_class: ClassVar[type] = object

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # ---- what trains -------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Optimizer name -> its trainable parameters (e.g. {"student": [...], "disc": [...]})."""
        raise NotImplementedError

    def optimizers_to_step(self, step: int) -> list[str]:
        """Names of the optimizers that step at iteration ``step`` (alternating updates)."""
        return list(self.parameter_groups())

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        """One iteration's losses. The trainer runs backward, clipping, the NaN guard and steps."""
        raise NotImplementedError

    def after_optimizer_step(self, name: str, step: int) -> None:
        """Called after optimizer ``name`` stepped (e.g. to update an EMA target)."""

    # ---- data ----------------------------------------------------------------------------------
    def train_dataset(self) -> torch.utils.data.Dataset:
        """The training data (items are dicts; the default collate stacks tensors, lists strings)."""
        raise NotImplementedError

    # ---- state -------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything of the method that a checkpoint must restore (trainable weights, EMA targets)."""
        raise NotImplementedError

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # ---- use ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], num_steps: int, generator: torch.Generator) -> torch.Tensor:
        """Images in [0,1] ``[B,3,H,W]`` from the current student (for grids and quick FID)."""
        raise NotImplementedError

    def export(self, folder: Path, metadata: dict[str, Any] | None = None) -> None:
        """Write a diffusers pipeline folder (or LoRA weights) into ``folder`` (already a temp folder)."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    import difflib

    from fastgen.errors import ConfigError

    if name not in METHODS:
        # methods register on import of their module
        import importlib

        try:
            importlib.import_module(f"fastgen.trainers.{name.replace('-', '_')}")
        except ModuleNotFoundError:
            pass
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; available: {', '.join(sorted(METHODS)) or 'none'}"
        raise ConfigError(f"unknown method '{name}'{hint}")
    return METHODS[name]
