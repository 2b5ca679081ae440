"""Prompt lists for data-free distillation, sampling and evaluation.

:func:`load_prompts` reads ``.txt`` (one prompt per line; blank lines and ``#`` comments
skipped), ``.json`` (a list of strings or of objects with ``prompt``/``caption``/``text``,
or an object with a ``prompts`` list), ``.jsonl`` (one string or object per line) and
``.csv``/``.tsv`` (a ``prompt``/``caption``/``text`` column). Files are read as UTF-8 (a
leading byte-order mark is dropped); one that is not valid UTF-8 raises :class:`DataError`
naming it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fastgen.data.folders import read_utf8
from fastgen.errors import DataError

__all__ = ["load_prompts", "PromptDataset", "ensure_batch", "PROMPT_FIELDS"]

PROMPT_FIELDS: tuple[str, ...] = ("prompt", "caption", "text")
_FORMATS = ".txt, .json, .jsonl or .csv"


def _from_entry(entry: Any, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in PROMPT_FIELDS:
            if isinstance(entry.get(key), str):
                return entry[key]
        raise DataError(
            f"{where} is an object without a prompt; give it a 'prompt' (or 'caption'/'text') string field"
        )
    raise DataError(
        f"{where} is a {type(entry).__name__}, not a prompt; write prompts as strings or "
        'objects like {"prompt": "..."}'
    )


def _read_txt(path: Path) -> list[str]:
    prompts = []
    for line in read_utf8(path).splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            prompts.append(text)
    return prompts


def _read_json(path: Path) -> list[str]:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"prompt file '{path}' is not valid JSON ({exc}); fix the syntax") from exc
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise DataError(
            f"prompt file '{path}' must hold a JSON list of prompts (strings or objects with a 'prompt' "
            f"field), found a {type(data).__name__}; wrap the prompts in [...]"
        )
    return [_from_entry(e, f"{path} item {i}") for i, e in enumerate(data)]


def _read_jsonl(path: Path) -> list[str]:
    prompts = []
    with io.StringIO(read_utf8(path), newline=None) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno} is not valid JSON ({exc.msg}); write one JSON string or object per line"
                ) from exc
            prompts.append(_from_entry(entry, f"{path}:{lineno}"))
    return prompts


def _read_csv(path: Path) -> list[str]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with io.StringIO(read_utf8(path), newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = [c for c in (reader.fieldnames or [])]
        lookup = {c.strip().lower(): c for c in columns if c is not None}
        column = next((lookup[k] for k in PROMPT_FIELDS if k in lookup), None)
        if column is None:
            raise DataError(
                f"prompt file '{path}' has no prompt column (columns: {columns}); "
                "name the column 'prompt' or 'caption'"
            )
        return [row[column] for row in reader if row.get(column)]


def load_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Read prompts from a ``.txt``, ``.json``, ``.jsonl`` or ``.csv`` file.

    Prompts are stripped of surrounding whitespace; empty ones are dropped.

    Raises:
        DataError: missing file, unsupported extension, malformed content, or no prompts.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file '{p}' does not exist; check the path (accepted formats: {_FORMATS})")
    readers = {".txt": _read_txt, ".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv}
    reader = readers.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"prompt file '{p}' has unsupported extension '{p.suffix}'; use {_FORMATS}")
    prompts = [s.strip() for s in reader(p)]
    prompts = [s for s in prompts if s]
    if not prompts:
        raise DataError(f"prompt file '{p}' contains no prompts; add at least one prompt ({_FORMATS})")
    return prompts


def ensure_batch(prompts: Sequence[str], batch_size: int) -> Sequence[str]:
    """Check there are at least ``batch_size`` prompts; return ``prompts`` unchanged.

    Raises:
        DataError: e.g. "prompt list has 3 prompts but the batch size is 8; add prompts or
            lower batch_size".
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}; pass e.g. 8")
    if len(prompts) < batch_size:
        raise DataError(
            f"prompt list has {len(prompts)} prompts but the batch size is {batch_size}; "
            "add prompts or lower batch_size"
        )
    return prompts


class PromptDataset(torch.utils.data.IterableDataset):
    """Stream prompts (plain strings), endlessly when ``repeat`` is true.

    Each pass visits every prompt once (in a fresh shuffled order per pass when
    ``shuffle``); with DataLoader workers the prompts of a pass are divided among them,
    so a pass still yields each prompt once. ``len()`` is the number of prompts in one
    pass and ``dataset[i]`` returns prompt ``i``.
    """

    def __init__(
        self, prompts: Sequence[str], repeat: bool = True, shuffle: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        prompts = list(prompts)
        if not prompts:
            raise DataError("PromptDataset got an empty prompt list; pass at least one prompt")
        bad = next((i for i, s in enumerate(prompts) if not isinstance(s, str)), None)
        if bad is not None:
            raise DataError(
                f"prompt {bad} is a {type(prompts[bad]).__name__}, not a string; pass a list of strings"
            )
        self.prompts = prompts
        self.repeat = bool(repeat)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]

    def __iter__(self) -> Iterator[str]:
        info = torch.utils.data.get_worker_info()
        workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        n = len(self.prompts)
        epoch = 0
        while True:
            order = list(range(n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            if workers > 1 and n < workers and self.repeat:
                # Fewer prompts than workers: every worker cycles through all of them.
                picked = order
            else:
                picked = order[worker_id::workers]
            for i in picked:
                yield self.prompts[i]
            epoch += 1
            if not self.repeat:
                return
