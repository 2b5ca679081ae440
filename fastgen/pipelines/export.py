"""Atomic export of a trained method to a diffusers folder.

:func:`export_method` asks the method to write into a hidden temp folder next to ``out_dir``
(``.<name>.exporting-<pid>-<id>``) and renames it to ``out_dir`` only when the export finished, so
a failure (or a kill) never leaves a half-written ``out_dir``. :func:`export_run` loads a method
from a run folder's checkpoint first (``fastgen.trainers.engine.run.load_method_from_run``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fastgen.errors import FastgenError

__all__ = ["ExportError", "ExportExistsError", "export_method", "export_run", "read_run_metrics"]


class ExportError(FastgenError):
    """An export could not be written (the message names the cause and the fix)."""


class ExportExistsError(ExportError, FileExistsError):
    """The export folder already exists and ``overwrite`` was not given."""


def _temp_sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def export_method(
    method: Any,
    out_dir: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export ``method`` (a :class:`~fastgen.trainers.method.Method`) into ``out_dir`` atomically.

    Args:
        method: the trained method; its ``export(folder, metadata)`` writes the files.
        out_dir: the folder to create (a diffusers pipeline folder or LoRA folder).
        metadata: extra facts for the model card (``metrics``: {name: value}, ``steps``, ...).
        overwrite: replace an existing ``out_dir`` (only after the new export is complete).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ExportExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ExportError: ``out_dir`` is a file.
        Whatever ``method.export`` raises, after removing the temp folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"export path '{out}' is a file; pass a folder path that does not exist yet")
    if out.exists() and not overwrite:
        raise ExportExistsError(
            f"export folder '{out}' already exists; choose a new folder or pass overwrite=True (--overwrite) to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"method": getattr(method, "name", type(method).__name__), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update(dict(metadata or {}))
    tmp = _temp_sibling(out, "exporting")
    tmp.mkdir()
    try:
        method.export(tmp, meta)
        if not any(tmp.iterdir()):
            raise ExportError(f"{type(method).__name__}.export wrote nothing; the method's export is broken")
        trash = None
        if out.exists():
            trash = _temp_sibling(out, "replaced")
            os.rename(out, trash)
        try:
            os.rename(tmp, out)
        except BaseException:
            if trash is not None:
                os.rename(trash, out)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    checkpoint: str = "latest",
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Load the method of a run folder at ``checkpoint`` and export it (see :func:`export_method`).

    The card gets the run folder, the checkpoint and the latest metrics of ``metrics.jsonl``.
    """
    from fastgen.trainers.engine.run import load_method_from_run  # lazy: the trainer imports heavy modules

    loaded = load_method_from_run(run_dir, checkpoint=checkpoint)
    method = loaded[0] if isinstance(loaded, tuple) else loaded
    meta: dict[str, Any] = {"run_dir": os.fspath(Path(run_dir).resolve()), "checkpoint": checkpoint}
    metrics = read_run_metrics(run_dir)
    if metrics:
        meta["metrics"] = metrics
    meta.update(dict(metadata or {}))
    return export_method(method, out_dir, meta, overwrite=overwrite)
