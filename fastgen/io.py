"""Durable, atomic file and folder writes: the one place fastgen writes "temp, fsync, rename".

Every result, checkpoint file, cache, config and export goes through these helpers, so a kill at
any moment leaves either the previous complete file/folder or the new complete one, never a torn
one. Files are created ``0644 & ~umask`` (results and exports are meant to be shared).

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: one file.
* :func:`atomic_file`: a context yielding a temp path to write with any library (PIL, numpy,
  safetensors, torch.save); the temp file is fsynced and renamed over the target on success.
* :func:`atomic_folder`: a context yielding a temp folder next to the target; on success the
  folder replaces the target (the previous one is moved aside first and removed afterwards).
* :func:`fsync_file` / :func:`fsync_dir`: flush a finished file / a folder's entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_file",
    "atomic_folder",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "save_image_grid",
    "temp_sibling",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_sibling(target: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A hidden, unique path next to ``target`` (same file system, so a rename is atomic)."""
    target = Path(target)
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path next to ``path``; when the block succeeds the temp file replaces ``path``.

    The suffix of ``path`` is kept (libraries such as PIL pick the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON (``default=str`` for paths and the like) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str], *, tag: str = "writing") -> Iterator[Path]:
    """Yield an empty temp folder next to ``target``; on success it replaces ``target``.

    An existing ``target`` is renamed aside first and deleted only after the new folder is in
    place, so at every moment one complete folder exists under ``target`` or its aside name. On
    failure the temp folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target, tag)
    tmp.mkdir()
    try:
        yield tmp
        aside = None
        if target.exists():
            aside = temp_sibling(target, "replaced")
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            if aside is not None:
                os.rename(aside, target)
            raise
        fsync_dir(target.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_image_grid(images: Any, path: str | os.PathLike[str], nrow: int, upscale: int = 1) -> Path:
    """Save images in [0, 1] ``[N, 3, H, W]`` (a torch tensor) as one PNG grid, ``nrow`` per row, atomically."""
    import torch
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
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
    return path
