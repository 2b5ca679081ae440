"""The ``teacher:`` section of a run and the one place a method's teacher is loaded from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fastgen.errors import ConfigError, ModelLoadError
from fastgen.models.teacher import Teacher
from fastgen.zoo import paths as zoo_paths

__all__ = ["DTYPES", "LoadedTeacher", "TeacherConfig", "load_teacher", "lower_precision"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TeacherConfig:
    """The ``teacher:`` section (shared by every method).

    Attributes:
        path: teacher pipeline folder or a shipped alias (``digits-sd``, ``digits-flux``); ``None`` =
            the method's default teacher.
        dtype: dtype of the frozen teacher network and text encoders (the VAE stays float32; trained
            networks are float32). ``float16``/``bfloat16`` halve GPU memory.
        resolution: training/sampling image size in pixels; ``None`` = the teacher's default (64 for
            the digits DiT).
        max_sequence_length: text length of T5-style encoders (Flux/SD3/PixArt); ``None`` = 16 for the
            digits DiT, else the pipeline default.
        cfg_forward: how the teacher's classifier-free guidance runs: ``batched`` (one forward of the
            uncond and cond rows together) or ``separate`` (two forwards; same result, smaller peak).
            ``benchmarks/train_throughput.py`` measures both per size.
    """

    path: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    resolution: int | None = None
    max_sequence_length: int | None = None
    cfg_forward: Literal["batched", "separate"] = "batched"

    def __post_init__(self) -> None:
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"teacher.resolution must be positive or null, got {self.resolution}")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ConfigError(f"teacher.max_sequence_length must be positive or null, got {self.max_sequence_length}")


@dataclass
class LoadedTeacher:
    """A loaded teacher with the facts a method needs about it."""

    teacher: Teacher
    path: Path
    name: str
    resolution: int
    digits: bool
    #: the dtype the frozen parts are held in (``teacher.dtype``); see :func:`lower_precision`
    low_dtype: torch.dtype = torch.float32


def _same(a: Path, b_fn) -> bool:
    try:
        return Path(a).resolve() == b_fn().resolve()
    except ModelLoadError:
        return False


def load_teacher(spec: TeacherConfig, default: str, families: tuple[str, ...], method: str) -> LoadedTeacher:
    """Load ``spec.path`` (or ``default``) in float32 and check its family and resolution.

    Raises:
        ConfigError: the teacher is of a family ``method`` does not distil.
        ModelLoadError / ResolutionError: from loading and :meth:`Teacher.check_resolution`.
    """
    name = spec.path or default
    path = zoo_paths.resolve_model(name)
    digits = _same(path, zoo_paths.sd_teacher) or _same(path, zoo_paths.flux_teacher)
    digits_dit = _same(path, zoo_paths.flux_teacher)
    msl = spec.max_sequence_length
    if msl is None and digits_dit:
        msl = zoo_paths.DIT_MAX_SEQUENCE_LENGTH
    teacher = Teacher.from_pretrained(path, dtype=torch.float32, max_sequence_length=msl)
    if teacher.family not in families:
        raise ConfigError(
            f"{method} distils {' / '.join(families)} teachers; '{name}' is a {teacher.family} ({teacher.pipeline_class}) "
            f"pipeline. Set teacher.path to a folder of a supported family"
        )
    if spec.resolution is not None:
        res = int(spec.resolution)
    elif digits_dit:
        res = int(zoo_paths.DIT_RESOLUTION)
    else:
        res = int(teacher.default_resolution)
    teacher.check_resolution(res, res)
    teacher.cfg_forward = spec.cfg_forward
    return LoadedTeacher(teacher=teacher, path=path, name=str(name), resolution=res, digits=digits, low_dtype=DTYPES[spec.dtype])


def lower_precision(teacher: Teacher, dtype: torch.dtype, keep=lambda name: False) -> None:
    """Hold the frozen teacher network (parameters whose name ``keep`` rejects) and text encoders in ``dtype``."""
    if dtype == torch.float32:
        return
    for name, p in teacher.net.named_parameters():
        if not keep(name):
            p.data = p.data.to(dtype)
    for enc in teacher.text_encoders:
        enc.to(dtype)
