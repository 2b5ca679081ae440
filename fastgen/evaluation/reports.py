"""Writing results: sample grids (PNG), JSON and markdown tables, atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, upscale: int = 1) -> Path:
    """Save ``images`` in [0,1] ``[N,3,H,W]`` as one PNG grid with ``nrow`` images per row."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    pad = 2
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path


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
