"""fastgen.pipelines: the one pipeline-folder writer, model cards and sampling of exported folders.

``write_pipeline(plan, out_dir)`` writes a method's :class:`ExportPlan` atomically (temp folder,
then rename); ``fastgen.workflows.export.export_run(run_dir, out_dir)`` loads a run's checkpoint
and calls it. This package never imports the trainers.
"""

from fastgen.pipelines.model_card import render_model_card, write_model_card
from fastgen.pipelines.writer import ExportError, ExportExistsError, ExportPlan, build_pipeline, read_run_metrics, write_pipeline

__all__ = [
    "ExportError",
    "ExportExistsError",
    "ExportPlan",
    "build_pipeline",
    "read_run_metrics",
    "render_model_card",
    "write_model_card",
    "write_pipeline",
]
