"""``fastgen export RUN OUT``: load a run's checkpoint and write its pipeline folder.

The method says what its export replaces (:meth:`~fastgen.trainers.method.Method.export_plan`);
:func:`fastgen.pipelines.writer.write_pipeline` writes it atomically. This module is the only place
that joins the two, so :mod:`fastgen.pipelines` never imports the trainers.

The export folder follows :func:`fastgen.io.check_folder`: absent, empty, or an earlier export
(``overwrite``), never a run folder, never the run being exported (``OUT`` is, lies inside or
contains ``RUN``), never a folder holding files fastgen did not write. It is checked before the
run is loaded, so a refused export costs nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastgen.io import check_folder
from fastgen.pipelines.writer import ExportError, ExportExistsError, read_run_metrics, write_pipeline
from fastgen.trainers.engine.run import load_method_from_run

__all__ = ["export_method", "export_run"]


def export_method(
    method: Any,
    out_dir: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    protect: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Export a trained method into ``out_dir`` (atomic; see :func:`~fastgen.pipelines.writer.write_pipeline`);
    ``protect``: folders the export must not be, lie inside or contain."""
    meta = {"method": getattr(method, "name", type(method).__name__), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update(dict(metadata or {}))
    return write_pipeline(method.export_plan(), out_dir, metadata=meta, overwrite=overwrite, protect=protect)


def export_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    checkpoint: str = "latest",
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Load the method of a run folder at ``checkpoint`` (``latest``, ``previous``, a name or a path) and
    export it; the model card gets the run folder, the checkpoint and the latest metrics of ``metrics.jsonl``.
    ``overwrite`` replaces an earlier export only, never the run folder itself or a folder around or in it."""
    protect = [run_dir]
    check_folder(out_dir, "export", overwrite=overwrite, protect=protect, error=ExportError, exists_error=ExportExistsError)
    method, _ = load_method_from_run(run_dir, checkpoint=checkpoint)
    meta: dict[str, Any] = {"run_dir": os.fspath(Path(run_dir).resolve()), "checkpoint": checkpoint}
    metrics = read_run_metrics(run_dir)
    if metrics:
        meta["metrics"] = metrics
    meta.update(dict(metadata or {}))
    return export_method(method, out_dir, meta, overwrite=overwrite, protect=protect)
