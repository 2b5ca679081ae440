"""The contract between a distillation method and the one generic training loop.

A :class:`Method` is its paper's algorithm box: its own options (a dataclass of algorithm fields
only), its networks and its ``train_step``. Everything around it is written once elsewhere and
shared through the run's common sections::

    teacher:  fastgen.models.TeacherConfig       which teacher folder, dtype, resolution, text length
    data:     fastgen.data.DataConfig            digits / folder / shards / cache / prompts / teacher samples
    sample:   SampleConfig (below)               grid prompts, steps, guidance, seed, evaluation size
    export:   ExportConfig (below)               which weights, attention backend of the export
    train:    fastgen.trainers.engine.TrainConfig  steps, batch, per-group optimizer specs, checkpoints

What the :class:`~fastgen.trainers.engine.trainer.Trainer` calls, and nothing else:

* :meth:`Method.parameter_groups`, :meth:`Method.optimizer_specs`, :meth:`Method.optimizers_to_step`
* :meth:`Method.train_dataset` (map-style; items are dicts the default collate stacks)
* :meth:`Method.train_step` -> :class:`StepOutput` (one loss per stepping group), then
  :meth:`Method.after_optimizer_step` (e.g. an EMA target update)
* :meth:`Method.checkpoint_state_dict` / :meth:`Method.load_checkpoint_state_dict`
* :meth:`Method.sample_settings` + :meth:`Method.sample` (sample grids), :meth:`Method.evaluation_plan`
  (what the evaluator hands to :meth:`Method.sample` during training)

and what ``fastgen export`` calls: :meth:`Method.export_plan` (what the export replaces in the
teacher's folder; :mod:`fastgen.pipelines.writer` writes it).

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
      metrics.jsonl                    periodic evaluations
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from fastgen.data.sources import DataConfig
from fastgen.errors import ConfigError
from fastgen.models.spec import TeacherConfig
from fastgen.trainers.engine.optim import OptimizerSpec

__all__ = ["BUILTIN_METHODS", "DIGITS_SAMPLE_PROMPTS", "ExportConfig", "METHODS", "Method", "SampleConfig", "StepOutput", "get_method", "register_method"]

#: Prompts of the sample grids when a recipe gives none (digits-world captions).
DIGITS_SAMPLE_PROMPTS: list[str] = [
    "a red handwritten digit seven",
    "a blue handwritten digit three",
    "a green handwritten digit zero",
    "a yellow handwritten digit five",
]


@dataclass
class SampleConfig:
    """The ``sample:`` section: how the student is sampled for grids, evaluation and the model card.

    Attributes:
        prompts: prompts of the periodic sample grids (``samples/step-*.png``).
        steps: sampling steps of grids, evaluation and the model card; ``None`` = the method's default
            (consistency students 4, CLEAR the teacher's 50).
        guidance_scale: pipeline guidance of samples and the card; ``None`` = the method's default.
        seed: seed of the grids' generator and of the evaluation's per-chunk generators (``seed + i``).
        eval_samples: student samples scored by the training evaluator (digits world only; the trainer
            runs it every ``train.eval_every`` iterations); ``None`` = the method's default, 0 = off.
    """

    prompts: list[str] = field(default_factory=lambda: list(DIGITS_SAMPLE_PROMPTS))
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    eval_samples: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"sample.steps must be >= 1 or null (the method's default), got {self.steps}")
        if self.eval_samples is not None and self.eval_samples < 0:
            raise ConfigError(f"sample.eval_samples must be >= 0 or null, got {self.eval_samples}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ConfigError(f"sample.guidance_scale must be >= 0 or null, got {self.guidance_scale}")


@dataclass
class ExportConfig:
    """The ``export:`` section: what ``fastgen export`` writes.

    Attributes:
        weights: ``"target"`` (an EMA target where the method keeps one, as LCM does) or ``"online"``.
        attention_backend: attention backend written into an exported model that replaces attention
            (CLEAR): ``auto`` (reference on CPU, triton for inference / flex for training on CUDA),
            ``reference``, ``flex`` or ``triton``.
    """

    weights: Literal["target", "online"] = "target"
    attention_backend: Literal["reference", "flex", "triton", "auto"] = "auto"


@dataclass
class StepOutput:
    """What one training iteration returns.

    ``losses`` maps an optimizer (parameter-group) name to the scalar loss whose gradient steps
    that optimizer this iteration; ``logs`` are floats for the progress bar and trackers.
    """

    losses: dict[str, torch.Tensor]
    logs: dict[str, float] = field(default_factory=dict)


class Method(torch.nn.Module):
    """Base class of every distillation method (LCD, RG-LCD, SCott, BOOT, DisBack, CLEAR).

    Args:
        config: the method's own options (``config_class``).
        teacher, data, sample, export: the run's shared sections (defaults when omitted).
    """

    #: registry name, e.g. "lcd"; used in recipes (``method: lcd``) and the CLI.
    name: ClassVar[str] = ""
    #: dataclass of the method's algorithm options (the ``<name>`` section of a recipe).
    config_class: ClassVar[type] = object
    #: teacher used when ``teacher.path`` is not given.
    default_teacher: ClassVar[str] = "digits-sd"
    #: ``sample.steps`` / ``sample.eval_samples`` when the recipe leaves them null.
    default_sample_steps: ClassVar[int] = 4
    default_eval_samples: ClassVar[int] = 1000

    def __init__(
        self,
        config: Any,
        *,
        teacher: TeacherConfig | None = None,
        data: DataConfig | None = None,
        sample: SampleConfig | None = None,
        export: ExportConfig | None = None,
    ):
        super().__init__()
        self.config = config
        self.teacher_config = teacher if teacher is not None else TeacherConfig()
        self.data_config = data if data is not None else DataConfig()
        self.sample_config = sample if sample is not None else SampleConfig()
        self.export_config = export if export is not None else ExportConfig()

    def configure_training(self, max_steps: int, run_dir: "os.PathLike[str] | str | None" = None) -> None:
        """Told ``train.max_steps`` and the run folder before training (by the run builder); methods whose options
        depend on the run's length (a start step, a schedule over training) check and use it here, and methods
        that keep files beside their checkpoints (DisBack's path nodes) place them under ``run_dir``."""

    # ---- what trains -------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Optimizer name -> its trainable parameters (e.g. {"student": [...], "disc": [...]})."""
        raise NotImplementedError

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        """The method's default optimizer spec per group (e.g. a discriminator's betas); recipes override."""
        return {}

    def inactive_groups(self) -> tuple[str, ...]:
        """Groups this configuration does not build (e.g. SCott's discriminator at ``adv_weight: 0``): a recipe may
        still give them optimizer specs (they are ignored) without the unknown-optimizer error."""
        return ()

    def optimizers_to_step(self, step: int) -> list[str]:
        """Names of the optimizers that step at iteration ``step`` (alternating updates)."""
        return list(self.parameter_groups())

    def train_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        """One iteration's losses. The trainer runs backward, clipping, the NaN guard and steps."""
        raise NotImplementedError

    def after_optimizer_step(self, name: str, step: int) -> None:
        """Called after optimizer ``name`` stepped (e.g. to update an EMA target)."""

    # ---- speed (train.compile, train.channels_last) ------------------------------------------
    def step_networks(self) -> dict[str, torch.nn.Module]:
        """The denoising networks the training step runs, by name: what ``train.compile`` and
        ``train.channels_last`` act on. Default: every diffusers model among the method's submodules
        except VAEs, each once and outermost first (teacher network, student, EMA target, fake score)."""
        from diffusers.models.modeling_utils import ModelMixin

        found: dict[str, torch.nn.Module] = {}
        for name, module in self.named_modules():  # each module once, parents before their children
            if any(name.startswith(p + ".") for p in found):
                continue
            if isinstance(module, ModelMixin) and "autoencoder" not in type(module).__name__.lower():
                found[name] = module
        return found

    def constant_networks(self) -> tuple[str, ...]:
        """Names among :meth:`step_networks` whose weights never change while training (a frozen teacher):
        ``train.compile`` may fold them into the compiled code as constants (inductor's freezing, no-grad
        calls only). Default: the teacher's network when none of its parameters trains."""
        teacher = getattr(self, "teacher", None)
        net = getattr(teacher, "net", None)
        if net is None or any(p.requires_grad for p in net.parameters()):
            return ()
        return tuple(name for name, module in self.step_networks().items() if module is net)

    # ---- data ----------------------------------------------------------------------------------
    def train_dataset(self) -> torch.utils.data.Dataset:
        """The training data (map-style; :func:`fastgen.data.build_dataset` of the ``data:`` section)."""
        raise NotImplementedError

    # ---- state -------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything of the method that a checkpoint must restore (trainable weights, EMA targets)."""
        raise NotImplementedError

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # ---- use ---------------------------------------------------------------------------------
    @property
    def sample_steps(self) -> int:
        """``sample.steps``, or the method's default."""
        steps = self.sample_config.steps
        return int(steps if steps is not None else self.default_sample_steps)

    def sample_settings(self) -> tuple[list[str], int, int]:
        """``(prompts, steps, seed)`` of the trainer's sample grids."""
        return list(self.sample_config.prompts), self.sample_steps, int(self.sample_config.seed)

    def is_digits_world(self) -> bool:
        """True when the teacher is a shipped digits-world teacher (the digits metrics apply)."""
        return False

    def evaluation_plan(self) -> dict[str, Any] | None:
        """What the training evaluator samples: ``{"world", "samples", "steps", "seed"}`` or None (off)."""
        n = self.sample_config.eval_samples
        n = self.default_eval_samples if n is None else int(n)
        if n <= 0 or not self.is_digits_world():
            return None
        return {"world": "digits", "samples": n, "steps": self.sample_steps, "seed": int(self.sample_config.seed)}

    @torch.no_grad()
    def sample(self, prompts: list[str], num_steps: int, generator: torch.Generator) -> torch.Tensor:
        """Images in [0,1] ``[B,3,H,W]`` from the current student (for grids and evaluation)."""
        raise NotImplementedError

    def export_plan(self) -> Any:
        """A :class:`fastgen.pipelines.writer.ExportPlan`: what the export replaces in the teacher's folder."""
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name`")
    METHODS[cls.name] = cls
    return cls


#: Methods that ship with fastgen: the module ``fastgen.trainers.<name with _ for ->`` registers each (``dmd``:
#: ``fastgen.trainers.score_distill``).
BUILTIN_METHODS: tuple[str, ...] = ("lcd", "rg-lcd", "scott", "boot", "dmd", "disback", "clear")


#: Built-in methods whose module is not named after them.
_METHOD_MODULES: dict[str, str] = {"dmd": "score_distill"}


def _import_method_module(name: str) -> None:
    """Import ``fastgen.trainers.<name>`` if such a module exists (it registers the method)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        return
    module = f"fastgen.trainers.{_METHOD_MODULES.get(name, name.replace('-', '_'))}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module and not module.startswith(f"{exc.name}."):
            raise  # the module exists but needs a package that is not installed


def get_method(name: str) -> type[Method]:
    """The registered method class of ``name`` (importing ``fastgen.trainers.<name>`` on first use).

    Raises:
        ConfigError: no method of that name; the message suggests the closest one and lists all of them
            (the built-in methods and any registered by imported modules).
    """
    if name not in METHODS:
        _import_method_module(str(name))
    if name not in METHODS:
        for builtin in BUILTIN_METHODS:
            try:
                _import_method_module(builtin)
            except ImportError:
                continue  # listed as available only where its dependencies are installed
        available = sorted(METHODS)
        close = difflib.get_close_matches(str(name), available, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown method '{name}'; {hint}available methods: {', '.join(available) or 'none'} "
            f"(or give a packaged recipe such as lcd-digits, or a recipe YAML with --config)"
        )
    return METHODS[name]
