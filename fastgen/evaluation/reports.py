"""Report helpers: markdown tables. Result files are written with :mod:`fastgen.io`
(``atomic_write_json``, ``atomic_write_text``, ``save_image_grid``)."""

from __future__ import annotations

from fastgen.io import atomic_write_json, atomic_write_text

# Aliases kept for the GPU benchmark scripts (benchmarks/gpu/); new code imports fastgen.io.
write_json = atomic_write_json

__all__ = ["atomic_write_text", "markdown_table", "write_json"]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (missing cells left empty)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out) + "\n"
