"""Model cards (README.md) of exported students.

A card is built from a plain dict so every method can fill it the same way::

    {
        "title": str, "method": str, "teacher": str, "pipeline_class": str, "scheduler": str,
        "steps": str | int, "guidance": str, "weights": str, "resolution": int | None,
        "metrics": {name: value}, "metadata": {name: value}, "usage": str (python code),
        "training": {option: value}, "tags": [str], "base_model": str (a hub id, optional),
    }

Missing entries are left out of the card. The card starts with Hugging Face YAML front matter
(``library_name: diffusers``, tags, ``base_model`` when given) so hubs index it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["render_model_card", "write_model_card"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _table(rows: dict[str, Any], head: tuple[str, str]) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {_fmt(v).replace('|', '/')} |")
    return lines


def render_model_card(card: dict[str, Any]) -> str:
    """The markdown text of a model card (see the module docstring for the keys)."""
    front: dict[str, Any] = {"library_name": "diffusers", "tags": list(card.get("tags") or ["fastgen"])}
    if card.get("base_model"):
        front["base_model"] = card["base_model"]
    if card.get("pipeline_class"):
        front["pipeline_tag"] = "text-to-image"
    out = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    out.append(f"# {card.get('title') or 'fastgen student'}")
    out.append("")
    out.append("Produced by fastgen, a toolkit that distils diffusion teachers into few-step students.")
    out.append("")

    summary = {}
    for key, label in (
        ("method", "Method"),
        ("teacher", "Teacher"),
        ("pipeline_class", "Pipeline class"),
        ("scheduler", "Scheduler"),
        ("steps", "Recommended steps"),
        ("resolution", "Resolution"),
    ):
        if card.get(key) not in (None, ""):
            summary[label] = card[key]
    if summary:
        out += _table(summary, ("", "")) + [""]

    if card.get("guidance"):
        out += ["## Guidance", "", str(card["guidance"]), ""]
    if card.get("weights"):
        out += ["## Weights", "", str(card["weights"]), ""]
    if card.get("usage"):
        out += ["## Usage", "", "```python", str(card["usage"]).rstrip(), "```", ""]

    metrics = card.get("metrics") or {}
    out += ["## Metrics", ""]
    if metrics:
        out += _table(dict(metrics), ("metric", "value")) + [""]
    else:
        out += ["No evaluation was attached to this export (run `fastgen bench` and re-export with metrics).", ""]

    if card.get("training"):
        out += ["## Training options", ""] + _table(dict(card["training"]), ("option", "value")) + [""]
    if card.get("metadata"):
        out += ["## Run", ""] + _table(dict(card["metadata"]), ("key", "value")) + [""]
    return "\n".join(out).rstrip() + "\n"


def write_model_card(folder: str | os.PathLike[str], card: dict[str, Any]) -> Path:
    """Write ``README.md`` into ``folder`` and return its path."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(card), encoding="utf-8")
    return path
