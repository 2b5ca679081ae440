"""fastgen.pipelines: export of trained methods to folders that stock diffusers loads.

``export_method(method, out_dir)`` writes atomically (temp folder, then rename);
``export_run(run_dir, out_dir, checkpoint="latest")`` loads a run's checkpoint first.
Model cards: ``render_model_card`` / ``write_model_card``.
"""

from fastgen.pipelines.export import ExportError, ExportExistsError, export_method, export_run, read_run_metrics
from fastgen.pipelines.model_card import render_model_card, write_model_card

__all__ = [
    "ExportError",
    "ExportExistsError",
    "export_method",
    "export_run",
    "read_run_metrics",
    "render_model_card",
    "write_model_card",
]
