"""Which CLEAR backend ``auto`` runs on a CPU, from measured crossovers.

``benchmarks/clear_attention.py`` times, per (token grid, text length, radius), the exact backends
side by side (the dense-mask ``reference`` and compiled FlexAttention in raster and tiled order) and
writes the winner of each measured case to ``cpu_backends.json`` next to this module. ``auto`` then
picks, for a shape without gradients, the winner of the nearest measured case (distance in log2 of
the token count and in the fraction of (query, key) pairs the window keeps); with gradients it
picks ``reference``, the only CPU backend with a backward pass. Without a table, ``reference``.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from .mask import flop_fraction, normalize_radius

TABLE = Path(__file__).resolve().parent / "cpu_backends.json"
#: backend names of the benchmark -> (clear_attention backend, permute)
CHOICES = {"reference": ("reference", False), "flex_raster": ("flex", False), "flex_tiled": ("flex", True)}


@lru_cache(maxsize=4)
def load_table(path: str | None = None) -> tuple[dict, ...]:
    """The measured cases (``tokens``, ``ideal_flop_fraction``, ``best``, ...); empty when none were written."""
    p = Path(path) if path else TABLE
    if not p.is_file():
        return ()
    data = json.loads(p.read_text())
    return tuple(row for row in data.get("cases", []) if row.get("best") in CHOICES)


def cases_from_rows(rows: list[dict], text_len: int) -> list[dict]:
    """The per-case winners of ``clear_attention.json``-style ``rows`` (no-grad timings of one device):
    for every (grid, text length, radius) with a timed exact backend, the fastest of them and its margin."""
    by_case: dict[tuple, dict[str, float]] = {}
    info: dict[tuple, dict] = {}
    for row in rows:
        if row.get("status") != "ok" or row.get("backend") not in CHOICES or row.get("radius") is None:
            continue
        key = (row["grid"], int(row.get("text_len", text_len)), normalize_radius(row["radius"]))
        by_case.setdefault(key, {})[row["backend"]] = float(row["median_ms"])
        info[key] = {"grid": row["grid"], "text_len": key[1], "radius": key[2], "tokens": int(row["tokens"]),
                     "ideal_flop_fraction": float(row["ideal_flop_fraction"])}
    cases = []
    for key, times in sorted(by_case.items(), key=lambda kv: (info[kv[0]]["tokens"], kv[0][2])):
        best = min(times, key=times.get)
        ref = times.get("reference")
        cases.append({**info[key], "best": best, "median_ms": {k: round(v, 4) for k, v in times.items()},
                      "speedup_vs_reference": round(ref / times[best], 4) if ref else None})
    return cases


def pick_cpu_backend(height: int, width: int, text_len: int, radius: int | float, needs_grad: bool,
                     table: str | None = None) -> tuple[str, bool]:
    """``(backend, permute)`` for CLEAR attention on a CPU (see the module docstring)."""
    if needs_grad:
        return "reference", False
    cases = load_table(table)
    if not cases:
        return "reference", False
    tokens = text_len + height * width
    frac = flop_fraction(height, width, text_len, radius)["ideal"]

    def distance(case: dict) -> float:
        return abs(math.log2(tokens) - math.log2(case["tokens"])) + 4.0 * abs(frac - case["ideal_flop_fraction"])

    return CHOICES[min(cases, key=distance)["best"]]
