"""The one pipeline-folder writer every method's export goes through.

A method declares what its export is (an :class:`ExportPlan`): the teacher's loaded pipeline, the
components it replaces (a student UNet, a CLEAR transformer, a scheduler), ``model_index.json``
entries naming our own classes, or LoRA weights for the teacher; plus the facts for
``fastgen_export.json`` and the model card. :func:`write_pipeline` writes it into a temp folder
next to the target and renames it into place when complete (:func:`fastgen.io.replace_folder`),
so a failure or a kill never leaves a half-written export. It never imports the trainers.

The target must be absent, empty, or an earlier export (replaced only with ``overwrite``, and only
when it holds nothing but the files that export wrote, listed in its ``.fastgen-folder`` marker):
never a run folder, a folder of the user's files, or a folder given in ``protect`` (the run being
exported), see :func:`fastgen.io.check_folder`.

Export kinds:

* ``pipeline``: ``type(base)(**components)`` with the replacements, ``save_pretrained`` with
  safetensors; stock ``DiffusionPipeline.from_pretrained(folder)`` loads it (``import fastgen``
  first when ``model_index`` names a fastgen class).
* ``lora``: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` on the teacher's
  pipeline, plus the scheduler's config.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from fastgen.errors import FastgenError
from fastgen.io import atomic_write_json, replace_folder
from fastgen.pipelines.model_card import write_model_card

__all__ = ["ExportError", "ExportExistsError", "ExportPlan", "build_pipeline", "read_run_metrics", "write_pipeline"]


class ExportError(FastgenError):
    """An export could not be written (the message names the cause and the fix)."""


class ExportExistsError(ExportError, FileExistsError):
    """The export folder already exists and ``overwrite`` was not given."""


@dataclass
class ExportPlan:
    """What an export writes.

    Attributes:
        kind: ``"pipeline"`` or ``"lora"``.
        base: the teacher's loaded diffusers pipeline (its components are kept unless replaced).
        replace: component name -> new component (``{"unet": student, "scheduler": LCMScheduler(...)}``).
        model_index: ``model_index.json`` entries to rewrite, e.g. ``{"transformer": ["fastgen", "X"]}``.
        lora_weights: adapter weights of the ``lora`` kind (peft keys, without the ``unet.`` prefix).
        lora_metadata: the adapter's peft config (``save_lora_weights`` stores it).
        info: the facts written to ``fastgen_export.json`` (``method``, ``resolution``, ``num_inference_steps``,
            ``guidance_scale`` ... ; ``fastgen sample`` and the benchmarks read them).
        card: a function ``info -> model-card dict`` (:mod:`fastgen.pipelines.cards`).
        dtype: dtype of replaced modules in the export (``None``: as they are).
    """

    kind: Literal["pipeline", "lora"]
    base: Any
    replace: dict[str, Any] = field(default_factory=dict)
    model_index: dict[str, list[str]] = field(default_factory=dict)
    lora_weights: dict[str, torch.Tensor] | None = None
    lora_metadata: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    card: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    dtype: torch.dtype | None = None


def build_pipeline(base: Any, replace: dict[str, Any]) -> Any:
    """A pipeline of ``type(base)`` with ``base``'s components and config, ``replace`` swapped in."""
    pipe_cls = type(base)
    components = dict(base.components)
    components.update(replace)
    params = inspect.signature(pipe_cls.__init__).parameters
    for key in params:
        if key not in components and key != "self" and key in base.config:
            components[key] = base.config[key]
    if "requires_safety_checker" in params:
        components["requires_safety_checker"] = False
    return pipe_cls(**{k: v for k, v in components.items() if k in params})


@contextlib.contextmanager
def _kept_components_in_float32(pipe: Any, replaced: dict[str, Any]):
    """Write the teacher's kept components (text encoders a method held in ``teacher.dtype`` for training) in
    float32, the dtype the teacher is loaded in, and restore them afterwards: transformers loads a checkpoint
    in its stored dtype but diffusers in float32, so a bfloat16 text encoder beside a float32 UNet would not
    sample after a plain ``DiffusionPipeline.from_pretrained(folder)``."""
    lowered = []
    for name, module in pipe.components.items():
        if name in replaced or not isinstance(module, torch.nn.Module):
            continue
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
            lowered.append((module, dtype))
            module.to(torch.float32)
    try:
        yield
    finally:
        for module, dtype in lowered:
            module.to(dtype)


def _write_plan(plan: ExportPlan, folder: Path) -> None:
    if plan.kind == "pipeline":
        replace = dict(plan.replace)
        if plan.dtype is not None:
            import copy

            for name, module in replace.items():
                if isinstance(module, torch.nn.Module) and next(module.parameters()).dtype != plan.dtype:
                    replace[name] = copy.deepcopy(module).to(plan.dtype)
        pipe = build_pipeline(plan.base, replace)
        with _kept_components_in_float32(pipe, replace):
            pipe.save_pretrained(os.fspath(folder), safe_serialization=True)
        if plan.model_index:
            index_path = folder / "model_index.json"
            index = json.loads(index_path.read_text(encoding="utf-8"))
            index.update({k: list(v) for k, v in plan.model_index.items()})
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    elif plan.kind == "lora":
        if not plan.lora_weights:
            raise ExportError("a LoRA export needs lora_weights; the method's export plan has none")
        type(plan.base).save_lora_weights(
            os.fspath(folder),
            unet_lora_layers=plan.lora_weights,
            unet_lora_adapter_metadata=plan.lora_metadata,
            safe_serialization=True,
        )
        if "scheduler" in plan.replace:
            plan.replace["scheduler"].save_config(os.fspath(folder))
    else:
        raise ExportError(f"unknown export kind {plan.kind!r}; use 'pipeline' or 'lora'")


def write_pipeline(
    plan: ExportPlan,
    out_dir: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    protect: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``plan`` into ``out_dir`` atomically, with ``fastgen_export.json`` and a README.md model card.

    Args:
        metadata: facts for the card and the json (``metrics``: {name: value}, ``run_dir``, ...).
        overwrite: replace an earlier export in ``out_dir`` (only after the new export is complete; never a
            folder holding files that export did not write).
        protect: folders the export must not be, lie inside or contain (the run folder being exported).

    Raises:
        ExportExistsError: ``out_dir`` holds an export and ``overwrite`` is false.
        ExportError: ``out_dir`` is a file, not empty and not an export (a run folder, the user's files),
            an export holding files it did not write, one of ``protect`` (or inside/around it), cannot be
            written, or the plan is incomplete.
    """
    out = Path(out_dir)
    metadata = dict(metadata or {})
    info = dict(plan.info)
    info["metadata"] = {k: v for k, v in metadata.items() if k != "metrics"}
    info["metrics"] = metadata.get("metrics") or {}
    with replace_folder(out, "export", overwrite=overwrite, protect=protect, error=ExportError,
                        exists_error=ExportExistsError, tag="exporting") as tmp:
        _write_plan(plan, tmp)
        atomic_write_json(tmp / "fastgen_export.json", info)
        if plan.card is not None:
            write_model_card(tmp, plan.card(info))
    return out


def read_run_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The latest value of every numeric metric in ``run_dir/metrics.jsonl`` (empty if none; the
    wall-clock ``time`` column is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    metrics: dict[str, Any] = {}
    if not path.is_file():
        return metrics
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            for k, v in record.items():
                if k != "time" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics[k] = v
    return metrics
