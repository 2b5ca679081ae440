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

Folder safety (one rule for run folders, exports and caches): fastgen writes into a folder only if
it is absent, empty, or a folder fastgen made for the same purpose (:func:`check_folder`,
:func:`claim_folder`, :func:`replace_folder`). Such folders carry a marker file
``.fastgen-folder`` (JSON: ``kind`` = ``run`` | ``export`` | ``cache``, and for folders written as
a whole the list of ``files`` fastgen wrote); folders written before the marker existed are
recognised by their contents (:func:`folder_kind`). A folder replaced as a whole (``overwrite``)
must hold only files fastgen wrote; anything else is refused, naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastgen.errors import ConfigError, FastgenError

__all__ = [
    "FOLDER_KINDS",
    "FOLDER_MARKER",
    "check_folder",
    "claim_folder",
    "folder_kind",
    "foreign_files",
    "list_files",
    "read_folder_marker",
    "replace_folder",
    "write_folder_marker",
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


# --------------------------------------------------------------------------- folder safety

FOLDER_MARKER = ".fastgen-folder"
#: the kinds of folders fastgen makes, as messages name them
FOLDER_KINDS: dict[str, str] = {
    "run": "training run folder",
    "export": "exported pipeline folder",
    "cache": "latent cache folder",
}
#: kinds written as a whole (a temp folder renamed into place): an existing one is replaced only with
#: ``overwrite`` and only when it holds nothing but files fastgen wrote. Run folders are written in
#: place and continued (resume), never replaced.
WHOLE_FOLDER_KINDS = ("export", "cache")
#: top-level files of exports written before the marker existed (plus the component folders
#: that their model_index.json names)
_LEGACY_EXPORT_FILES = frozenset(
    {"fastgen_export.json", "README.md", "model_index.json", "pytorch_lora_weights.safetensors", "scheduler_config.json"}
)
#: files of latent caches written before the marker existed
_LEGACY_CACHE_FILE = re.compile(r"^(index\.json|shard-\d+\.safetensors)$")
_CACHE_FORMAT = "fastgen-embedding-cache"
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def read_folder_marker(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of a folder fastgen made (``{"kind": ..., ...}``), or None."""
    try:
        data = json.loads((Path(path) / FOLDER_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in FOLDER_KINDS else None


def write_folder_marker(path: str | os.PathLike[str], kind: str, *, files: Any = None, **info: Any) -> Path:
    """Mark ``path`` as a fastgen folder of ``kind``; ``files``: what fastgen wrote there (folders written as a whole)."""
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; use one of {', '.join(FOLDER_KINDS)}")
    data: dict[str, Any] = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    if files is not None:
        data["files"] = sorted(str(f) for f in files)
    return atomic_write_json(Path(path) / FOLDER_MARKER, data)


def list_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file under ``path`` as sorted relative POSIX paths (links count as files; the marker is left out)."""
    root = Path(path)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in [*filenames, *links]:
            out.append((rel / name).as_posix())
    return sorted(f for f in out if f != FOLDER_MARKER)


def _legacy_kind(path: Path) -> str | None:
    """Recognise a folder fastgen wrote before the marker existed."""
    if (path / "fastgen_export.json").is_file():
        return "export"
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        import yaml

        try:
            data = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("method"), str) and data["method"]:
            return "run"
    names = [p.name for p in path.iterdir()]
    if names and all(_LEGACY_CACHE_FILE.match(n) and (path / n).is_file() for n in names):
        if "index.json" in names:
            try:
                index = json.loads((path / "index.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            if not (isinstance(index, dict) and index.get("format") == _CACHE_FORMAT):
                return None
        return "cache"
    return None


def folder_kind(path: str | os.PathLike[str]) -> str | None:
    """``"run"``, ``"export"`` or ``"cache"`` for a folder fastgen made (by its marker, or by the contents of one
    written before the marker existed: a run folder has config.yaml with a ``method:`` key and checkpoints/, an
    export has fastgen_export.json, a cache only index.json and shard-*.safetensors); None otherwise."""
    path = Path(path)
    if not path.is_dir():
        return None
    marker = read_folder_marker(path)
    if marker is not None:
        return str(marker["kind"])
    return _legacy_kind(path)


def foreign_files(path: str | os.PathLike[str], kind: str | None = None) -> list[str]:
    """Files under ``path`` that fastgen did not write as part of a ``kind`` folder (relative paths).

    With a marker listing ``files``: everything else. Without one (a folder from before the marker):
    an export may hold its known top-level files and the component folders its model_index.json names,
    a cache its index and shards; a folder of no fastgen kind: every file is foreign. Run folders are
    never replaced, so nothing in them counts as foreign.
    """
    path = Path(path)
    files = list_files(path)
    marker = read_folder_marker(path)
    if marker is not None and isinstance(marker.get("files"), list):
        own = {str(f) for f in marker["files"]}
        return [f for f in files if f not in own]
    kind = kind or folder_kind(path)
    if kind == "run":
        return []
    if kind == "export":
        components: set[str] = set()
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        if isinstance(index, dict):
            components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
        return [f for f in files if not (f in _LEGACY_EXPORT_FILES or ("/" in f and f.split("/", 1)[0] in components))]
    if kind == "cache":
        return [f for f in files if not _LEGACY_CACHE_FILE.match(f)]
    return files


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _names(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{x}'" for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _abs(path: Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _check_writable(folder: Path, target: Path, what: str, error: type[Exception]) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(
            f"cannot write the {what} '{target}': '{folder}' is not writable (permission denied); choose a folder "
            f"you can write to (output folder / export path), or make '{folder}' writable"
        )


def _check_creatable(path: Path, what: str, error: type[Exception]) -> None:
    ancestor = Path(os.path.abspath(path)).parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"cannot create the {what} '{path}': '{ancestor}' is a file, not a folder; choose another path")
    _check_writable(ancestor, path, what, error)


def _write_failed(path: Path, what: str, exc: OSError, error: type[Exception]) -> Exception:
    where = f" ('{exc.filename}')" if exc.filename else ""
    return error(
        f"cannot write the {what} '{path}': {exc.strerror or exc}{where}; choose a folder you can write to (with "
        "free space), or fix the folder's permissions"
    )


def check_folder(
    path: str | os.PathLike[str],
    kind: str,
    *,
    overwrite: bool = False,
    protect: Any = (),
    error: type[Exception] = ConfigError,
    exists_error: type[Exception] | None = None,
) -> str:
    """Check that fastgen may write a ``kind`` folder (:data:`FOLDER_KINDS`) at ``path``; writes nothing.

    The rule: the folder is absent, empty, or a fastgen folder of the same kind. A run folder is
    continued in place; an export or cache (written as a whole) is replaced only with ``overwrite``
    and only if every file in it is one fastgen wrote there. Never a folder that is, lies inside or
    contains one of ``protect`` (e.g. the run being exported). The folder (or its nearest existing
    parent) must be writable.

    Returns:
        ``"absent"``, ``"empty"`` or ``"same"`` (a fastgen folder of this kind).

    Raises:
        ``error`` (a FastgenError class) naming the folder, what is in the way and the fix;
        ``exists_error`` (default ``error``) for an existing folder of this kind without ``overwrite``.
    """
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; use one of {', '.join(FOLDER_KINDS)}")
    path = Path(path)
    what = FOLDER_KINDS[kind]
    target = _abs(path)
    for guarded_path in [protect] if isinstance(protect, (str, os.PathLike)) else list(protect or ()):
        guarded = _abs(Path(guarded_path))
        if target == guarded or guarded in target.parents or target in guarded.parents:
            relation = "is" if target == guarded else ("lies inside" if guarded in target.parents else "contains")
            raise error(
                f"'{path}' {relation} '{guarded_path}', the folder this {kind} is made from; writing there could "
                f"destroy it. Choose a folder outside it, e.g. '{guarded.parent / (guarded.name + '-' + kind)}'"
            )
    if path.exists() and not path.is_dir():
        raise error(f"'{path}' is a file, not a folder; pass a new (or empty) folder path for the {what}")
    if not path.exists():
        if path.is_symlink():
            raise error(f"'{path}' is a broken link; remove it or choose another folder for the {what}")
        _check_creatable(path, what, error)
        return "absent"
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise _write_failed(path, what, exc, error) from exc
    whole = kind in WHOLE_FOLDER_KINDS
    if not entries:
        _check_writable(target.parent if whole else path, path, what, error)
        return "empty"
    found = folder_kind(path)
    if found is None:
        raise error(
            f"'{path}' is not empty and was not made by fastgen (it holds {_names(entries)}); fastgen writes {_a(what)} "
            "only into a new or empty folder or one it made itself, and never changes files it did not write. "
            "Choose a new folder, or move those files away"
        )
    if found != kind:
        never = " (a run folder is never replaced)" if found == "run" else ""
        raise error(f"'{path}' is a fastgen {FOLDER_KINDS[found]}, not {_a(what)}{never}; choose another folder for the {what}")
    if not whole:
        _check_writable(path, path, what, error)
        return "same"
    if not overwrite:
        raise (exists_error or error)(
            f"'{path}' already holds {_a(what)}; choose a new folder, or pass --overwrite (overwrite=True) to replace it"
        )
    foreign = foreign_files(path, kind)
    if foreign:
        raise error(
            f"cannot replace the {what} '{path}': it holds files fastgen did not write there ({_names(foreign)}); "
            "move them away first, or choose a new folder"
        )
    _check_writable(target.parent, path, what, error)
    return "same"


def claim_folder(
    path: str | os.PathLike[str],
    kind: str,
    *,
    error: type[Exception] = ConfigError,
    info: dict[str, Any] | None = None,
) -> Path:
    """:func:`check_folder`, then create ``path`` (a folder written in place, e.g. a run folder) and mark it.

    Raises:
        ``error``: the rule refuses the folder, or it cannot be created or written (permissions,
        read-only file system, no space), naming the folder and the fix.
    """
    path = Path(path)
    if kind in WHOLE_FOLDER_KINDS:
        raise ValueError(f"a {kind} folder is written as a whole; use replace_folder")
    check_folder(path, kind, error=error)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if read_folder_marker(path) is None:
            write_folder_marker(path, kind, **(info or {}))
    except OSError as exc:
        raise _write_failed(path, FOLDER_KINDS[kind], exc, error) from exc
    return path


@contextlib.contextmanager
def replace_folder(
    target: str | os.PathLike[str],
    kind: str,
    *,
    overwrite: bool = False,
    protect: Any = (),
    error: type[Exception] = ConfigError,
    exists_error: type[Exception] | None = None,
    tag: str = "writing",
    info: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Write a whole ``kind`` folder (an export, a cache) atomically under :func:`check_folder`'s rule.

    Yields an empty temp folder next to ``target``; when the block succeeds the marker (listing every
    file written) is added and the folder replaces ``target`` (:func:`atomic_folder`). Permission,
    read-only and disk-full errors become ``error`` naming the folder.
    """
    target = Path(target)
    if kind not in WHOLE_FOLDER_KINDS:
        raise ValueError(f"a {kind} folder is written in place; use claim_folder")
    check_folder(target, kind, overwrite=overwrite, protect=protect, error=error, exists_error=exists_error)
    try:
        with atomic_folder(target, tag=tag) as tmp:
            yield tmp
            write_folder_marker(tmp, kind, files=list_files(tmp), **(info or {}))
    except OSError as exc:
        if isinstance(exc, FastgenError) or exc.errno not in _WRITE_ERRNOS:
            raise
        raise _write_failed(target, FOLDER_KINDS[kind], exc, error) from exc


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
