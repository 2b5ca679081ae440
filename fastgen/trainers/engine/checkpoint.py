"""Atomic training checkpoints, the ``latest`` pointer and RNG state.

Layout (see :mod:`fastgen.trainers.method`)::

    RUN_DIR/checkpoints/
      checkpoint-000200/        a finished checkpoint (only ever created by a rename)
        model.safetensors       Method.checkpoint_state_dict()
        optimizers.pt           optimizer + LR scheduler (+ grad scaler) states, weights_only-safe
        trainer_state.json      step, epoch, data position (a stream: every rank's position), counters, file names
        rng.pt                  RNG states of rank 0 (rng-rank<r>.pt for the other ranks)
      latest                    text: the name of the newest finished checkpoint

How a kill at any moment stays harmless:

1. every file is written into ``checkpoints/.tmp-checkpoint-000200/`` and fsync'ed;
2. the folder is fsync'ed and renamed to ``checkpoint-000200`` (atomic on POSIX);
3. ``latest`` is rewritten atomically (temp file, fsync, :func:`os.replace`);
4. only then are checkpoints beyond the newest ``keep`` deleted.

A crash before 2 leaves a ``.tmp-*`` folder that the next save (or trainer start) removes; a
crash between 2 and 3 leaves a finished but unreferenced folder that ``latest`` does not name
(resume uses the previous one; the orphan is replaced when training reaches its step again).
``latest`` therefore only ever names a complete folder.

Nothing is unpickled: weights are safetensors, the rest loads with ``torch.load(weights_only=True)``
(RNG states are stored as tensors, ints and floats for that reason). A file that does not load (torn,
overwritten, a pickle carrying code) raises one :class:`CheckpointError` naming the file and the way
out: ``previous`` (``--resume previous``) is the newest finished checkpoint before the one ``latest``
names.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastgen.io import atomic_write_text, fsync_dir, fsync_file

from fastgen.errors import ModelLoadError

__all__ = [
    "CheckpointError",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "checkpoint_name",
    "checkpoints_dir",
    "list_checkpoints",
    "read_latest",
    "find_checkpoint",
    "checkpoint_step",
    "corrupt_file_error",
    "write_latest",
    "begin_checkpoint",
    "finish_checkpoint",
    "write_safetensors",
    "write_torch",
    "write_json",
    "load_model_state",
    "load_torch",
    "load_trainer_state",
    "rng_file_name",
    "capture_rng_state",
    "load_rng_state",
    "restore_rng_state",
    "remove_stale_temp",
    "save_checkpoint",
]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizers.pt"
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ModelLoadError, FileNotFoundError):
    """A checkpoint to resume from or to load is missing or incomplete (a FastgenError)."""


# --------------------------------------------------------------------------- names and lookup


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{int(step):06d}"


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(ckpt_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Finished checkpoint folders ``(step, path)`` sorted by step (temp folders excluded)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_latest(ckpt_dir: str | os.PathLike[str]) -> str | None:
    """The name written in ``checkpoints/latest``, or None when there is no such file."""
    f = Path(ckpt_dir) / LATEST_FILE
    try:
        name = f.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return name or None


def _is_complete(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / STATE_FILE).is_file()


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step in a checkpoint folder's name (``checkpoint-000200`` -> 200), None for other names."""
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _previous_of(ckpt_dir: Path, step: int) -> Path | None:
    older = [p for s, p in list_checkpoints(ckpt_dir) if s < step and _is_complete(p)]
    return older[-1] if older else None


def find_checkpoint(run_dir: str | os.PathLike[str], which: str | os.PathLike[str] = "latest", *, purpose: str = "resume") -> Path:
    """Resolve ``which`` to a finished checkpoint folder.

    ``which``: ``"latest"`` (what ``checkpoints/latest`` names; the newest finished folder when that
    file is lost), ``"previous"`` (the newest finished checkpoint before the one ``latest`` names: the
    way past a corrupt latest checkpoint), a checkpoint folder name, or a path.

    Raises:
        CheckpointError: naming the run folder, what is missing, and what to do instead.
    """
    run_dir = Path(run_dir)
    ckpt_dir = checkpoints_dir(run_dir)
    fix = (
        "start the training without --resume (a fresh run), or point --resume at an existing checkpoint folder"
        if purpose == "resume"
        else "train longer so that a checkpoint is written (train.checkpoint_every), or pass a run folder that has one"
    )
    which_s = str(which)
    if which_s in ("latest", "previous"):
        name = read_latest(ckpt_dir)
        finished = [p for _, p in list_checkpoints(ckpt_dir) if _is_complete(p)]
        if name is None or which_s == "previous" and checkpoint_step(name) is None:
            if not finished:
                raise CheckpointError(
                    f"no finished checkpoint in run folder '{run_dir}' (no '{ckpt_dir / LATEST_FILE}' and no "
                    f"complete checkpoint-* folder) to {purpose} from; {fix}"
                )
            # `latest` lost (deleted by hand): the newest complete folder is the best guess.
            name = finished[-1].name
        if which_s == "previous":
            previous = _previous_of(ckpt_dir, checkpoint_step(name))  # type: ignore[arg-type]
            if previous is None:
                raise CheckpointError(
                    f"no finished checkpoint before '{name}' in '{ckpt_dir}' to {purpose} from; "
                    + ("start a fresh run in a new folder (output_dir=...)" if purpose == "resume" else fix)
                )
            return previous
        path = ckpt_dir / name
        if not _is_complete(path):
            raise CheckpointError(
                f"'{ckpt_dir / LATEST_FILE}' names '{name}', but '{path}' is missing or lacks "
                f"{MODEL_FILE}/{STATE_FILE}; {_previous_hint(path, purpose)}"
            )
        return path
    path = Path(which_s)
    candidates = [path] if path.is_absolute() else [ckpt_dir / path, run_dir / path, path]
    for c in candidates:
        if c.is_dir() and _is_complete(c):
            return c
    raise CheckpointError(
        f"checkpoint '{which_s}' not found or incomplete (looked in: {', '.join(str(c) for c in candidates)}; "
        f"a finished checkpoint holds {MODEL_FILE} and {STATE_FILE}); pass 'latest', 'previous' or an existing "
        "checkpoint folder"
    )


def _previous_hint(checkpoint: Path, purpose: str) -> str:
    """What to do about a broken checkpoint folder: continue from the finished one before it."""
    step = checkpoint_step(checkpoint)
    previous = _previous_of(checkpoint.parent, step) if step is not None else None
    if previous is None:
        return ("there is no finished checkpoint before it; restore the file or start a fresh run in a new folder "
                "(output_dir=...)")
    finished = [p for _, p in list_checkpoints(checkpoint.parent) if _is_complete(p)]
    latest = read_latest(checkpoint.parent) or (finished[-1].name if finished else None)
    which = "previous" if checkpoint.name == latest else str(previous)
    how = f"--resume {which}" if purpose == "resume" else f"the checkpoint '{which}' (fastgen export RUN OUT --checkpoint {which})"
    return f"{how} continues from '{previous.name}', the finished checkpoint before it (or restore the file)"


def corrupt_file_error(file: str | os.PathLike[str], exc: BaseException | str, purpose: str = "resume") -> CheckpointError:
    """The one error for a checkpoint file that does not load: names the file, the cause, the way out."""
    file = Path(file)
    detail = str(exc) if isinstance(exc, str) else (str(exc).strip().splitlines() or [""])[0]
    if not isinstance(exc, str):
        module = type(exc).__module__.split(".")[0].lstrip("_")
        label = type(exc).__name__ if module == "builtins" else f"{module}.{type(exc).__name__}"
        detail = f"{label}: {detail}" if detail else label
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return CheckpointError(
        f"checkpoint file '{file}' is corrupt or unsafe to load ({detail}); {_previous_hint(file.parent, purpose)}"
    )


# --------------------------------------------------------------------------- durable writing


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors (moved to CPU, made contiguous, shared storage de-duplicated)."""
    from safetensors.torch import save_file

    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"checkpoint_state_dict() entry '{k}' is a {type(v).__name__}, not a tensor; store "
                "numbers as 0-dim tensors (e.g. torch.tensor(step))"
            )
        if type(v).__name__ == "DTensor":
            raise TypeError(
                f"checkpoint entry '{k}' is a sharded DTensor (FSDP); gather it first "
                "(fastgen.trainers.engine.sharding.full_state_dict), checkpoints hold full tensors"
            )
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()  # safetensors refuses tensors that share memory (tied weights, views)
        elif t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger storage
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    save_file(out, str(path), metadata=metadata)
    fsync_file(path)


def write_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` of plain containers of tensors and numbers (loadable with weights_only=True)."""
    path = Path(path)
    with open(path, "wb") as fh:
        torch.save(obj, fh)
    fsync_file(path)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    fsync_file(path)


def write_latest(ckpt_dir: str | os.PathLike[str], name: str) -> None:
    """Atomically point ``checkpoints/latest`` at ``name``."""
    atomic_write_text(Path(ckpt_dir) / LATEST_FILE, name + "\n")


def remove_stale_temp(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete leftovers of interrupted saves (``.tmp-*`` entries). Call on the main process only."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def begin_checkpoint(ckpt_dir: str | os.PathLike[str], step: int) -> Path:
    """Create (empty) the temp folder of the checkpoint of ``step``; main process only."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_checkpoint(ckpt_dir: str | os.PathLike[str], tmp: Path, step: int, keep: int = 0) -> Path:
    """Publish a fully written temp folder: fsync, rename, update ``latest``, prune old ones.

    ``keep`` > 0 keeps only the newest ``keep`` finished checkpoints (never the one ``latest``
    names). Main process only.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    fsync_dir(tmp)
    if final.exists():
        if read_latest(ckpt_dir) == final.name:
            raise CheckpointError(
                f"refusing to overwrite '{final}', which '{ckpt_dir / LATEST_FILE}' points to; "
                "move it away or resume from it"
            )
        # A finished but unreferenced folder (crash between rename and `latest`): replace it.
        trash = ckpt_dir / f"{TMP_PREFIX}replaced-{final.name}-{time.time_ns()}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    fsync_dir(ckpt_dir)
    write_latest(ckpt_dir, final.name)
    if keep and keep > 0:
        latest = final.name
        finished = list_checkpoints(ckpt_dir)
        for _, p in finished[:-keep]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- reading


def load_model_state(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, purpose: str = "load"
) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder (or a ``model.safetensors`` path).

    Raises:
        CheckpointError: the file is missing, or corrupt (named, with the finished checkpoint before it).
    """
    from safetensors.torch import load_file

    path = Path(path)
    f = path / MODEL_FILE if path.is_dir() else path
    if not f.is_file():
        raise CheckpointError(f"'{f}' is missing; the checkpoint folder is incomplete")
    try:
        return load_file(str(f), device=str(device))
    except Exception as exc:  # SafetensorError, OSError, ...: the file does not load
        raise corrupt_file_error(f, exc, purpose) from exc


def load_torch(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, purpose: str = "resume") -> Any:
    """``torch.load(weights_only=True)``: plain containers only, never code.

    Raises:
        CheckpointError: the file is missing, torn, or a pickle of anything but tensors and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"'{path}' is missing; the checkpoint folder is incomplete")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        # pickle.UnpicklingError (also a pickle that would run code), RuntimeError, EOFError, OSError, and
        # whatever else the unpickler trips over on arbitrary bytes (struct.error, ...)
        raise corrupt_file_error(path, exc, purpose) from exc


def load_trainer_state(path: str | os.PathLike[str], *, purpose: str = "resume") -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint folder (must hold the integer ``step``)."""
    f = Path(path) / STATE_FILE
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"'{f}' is missing; the checkpoint folder is incomplete") from None
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError, unreadable
        raise corrupt_file_error(f, exc, purpose) from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise corrupt_file_error(f, "no integer 'step' in it", purpose)
    return state


# --------------------------------------------------------------------------- RNG


def rng_file_name(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python ``random`` states as weights_only-safe values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(path: str | os.PathLike[str], *, purpose: str = "resume") -> dict[str, Any]:
    """An RNG state file (``rng.pt``) loaded with weights_only and checked for the expected entries."""
    state = load_torch(path, purpose=purpose)
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("torch"), torch.Tensor)
        and isinstance(state.get("numpy"), dict)
        and isinstance(state["numpy"].get("keys"), torch.Tensor)
        and isinstance(state.get("python"), dict)
        and isinstance(state["python"].get("internal"), torch.Tensor)
    )
    if not ok:
        raise corrupt_file_error(path, "not an RNG state written by the fastgen trainer", purpose)
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        elif cuda_states:
            torch.cuda.set_rng_state(cuda_states[0])


# --------------------------------------------------------------------------- one-call save


def save_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    step: int,
    model_state: Mapping[str, torch.Tensor],
    trainer_state: dict[str, Any],
    optimizer_state: Any | None = None,
    rng_state: Mapping[str, Any] | None = None,
    keep: int = 0,
) -> Path:
    """Single-process convenience: write and publish a checkpoint atomically; returns its folder."""
    tmp = begin_checkpoint(ckpt_dir, step)
    write_safetensors(tmp / MODEL_FILE, model_state)
    if optimizer_state is not None:
        write_torch(tmp / OPTIMIZER_FILE, optimizer_state)
    if rng_state is not None:
        write_torch(tmp / rng_file_name(0), rng_state)
    write_json(tmp / STATE_FILE, trainer_state)
    return finish_checkpoint(ckpt_dir, tmp, step, keep)
