"""Optional on-disk cache of VAE latents and text-encoder outputs.

Encoding every image and caption once and training from the cache removes the VAE and
text encoders from the training loop. Layout of a complete cache folder::

    <root>/
        index.json               # format, version, key, counts, shard list (written last)
        shard-000000.safetensors # "latents" [n, ...], "index" [n], "text.<name>" [n, ...];
        ...                      #   captions in the safetensors metadata (JSON list)

A build writes into a hidden sibling folder ``.<root name>.building-<pid>-<id>`` and
renames it to ``<root>`` only when every shard and the index are on disk, so a killed
build never leaves a folder that looks complete. The ``key`` (see :func:`cache_key`)
identifies what produced the cache (e.g. the model folder and the resolution); reading
or rebuilding with another key raises :class:`DataError`.

The folder follows :func:`fastgen.io.check_folder`: a build writes only into an absent or
empty folder or replaces an earlier cache (``overwrite``) that holds nothing but the files
a build wrote (listed in its ``.fastgen-folder`` marker); a folder of the user's files, a
run folder or an export is refused, naming what is in the way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from bisect import bisect_right
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastgen.errors import DataError
from fastgen.io import folder_kind, replace_folder

__all__ = ["EmbeddingCache", "CachedDataset", "cache_key", "INDEX_FILE"]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT_NAME = "fastgen-embedding-cache"
FORMAT_VERSION = 1
_TEXT_PREFIX = "text."


def cache_key(*parts: Any) -> str:
    """SHA-256 hex digest identifying a cache's inputs, e.g. ``cache_key(model_dir, 512)``.

    Parts are turned into text (mappings and lists as sorted JSON, paths as strings) and
    length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` give different keys.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (Mapping, list, tuple)):
            text = json.dumps(part, sort_keys=True, default=str)
        elif isinstance(part, bytes):
            text = part.hex()
        else:
            text = str(part if not isinstance(part, os.PathLike) else os.fspath(part))
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixels": torch.stack([b["pixels"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "index": torch.tensor([int(b.get("index", -1)) for b in batch], dtype=torch.int64),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddingCache:
    """A latent + text-embedding cache rooted at ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    def _temp_dirs(self) -> list[Path]:
        parent = self.root.parent
        if not parent.is_dir():
            return []
        return sorted(parent.glob(f".{self.root.name}.building-*"))

    def read_index(self) -> dict[str, Any] | None:
        """The index of a complete cache, or None when there is none (or it is unfinished)."""
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(index, dict) or index.get("format") != FORMAT_NAME or not index.get("complete"):
            return None
        shards = index.get("shards")
        if not isinstance(shards, list) or any(not (self.root / s["file"]).is_file() for s in shards):
            return None
        return index

    def is_complete(self) -> bool:
        """True when ``root`` holds a finished cache (index written, every shard present)."""
        return self.read_index() is not None

    def check_key(self, key: str) -> dict[str, Any]:
        """Return the index if the cache is complete and was built with ``key``.

        Raises:
            DataError: no complete cache, or a cache built from other inputs.
        """
        index = self.read_index()
        if index is None:
            leftovers = self._temp_dirs()
            hint = (
                f" (an unfinished build left {leftovers[0].name}; it is ignored and removed by the next build)"
                if leftovers else ""
            )
            raise DataError(
                f"no complete embedding cache at '{self.root}'{hint}; build it with "
                "EmbeddingCache(root).build(...) or point to another cache dir"
            )
        if index.get("key") != key:
            raise DataError(
                f"the embedding cache at '{self.root}' was built with key {str(index.get('key'))[:16]}... but "
                f"this run needs key {key[:16]}... (different model or resolution); rebuild it with "
                "build(..., overwrite=True) or pass a new cache dir"
            )
        return index

    def _remove_stale_builds(self) -> None:
        for tmp in self._temp_dirs():
            try:
                pid = int(tmp.name.rsplit(".building-", 1)[1].split("-", 1)[0])
            except (IndexError, ValueError):
                pid = -1
            if pid == os.getpid() or pid <= 0 or not _pid_alive(pid):
                logger.info("removing unfinished cache build %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)

    def build(
        self,
        dataset: Iterable[dict[str, Any]] | torch.utils.data.Dataset,
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], Mapping[str, torch.Tensor]],
        batch_size: int,
        key: str,
        *,
        items_per_shard: int = 4096,
        dtype: torch.dtype | None = None,
        num_workers: int = 0,
        overwrite: bool = False,
    ) -> "CachedDataset":
        """Encode ``dataset`` once and write the cache; return it as a :class:`CachedDataset`.

        Args:
            dataset: items ``{"pixels": [3, H, W], "caption": str, "index": int}`` (e.g.
                :class:`~fastgen.data.folders.ImageCaptionFolder`), map-style or iterable.
            encode_images: ``pixels [B, 3, H, W] -> latents [B, ...]``.
            encode_text: ``captions -> {name: tensor [B, ...]}`` (fixed shapes per item, e.g.
                pad the tokens to max length).
            batch_size: encoder batch size.
            key: identity of the inputs, stored and checked (see :func:`cache_key`).
            items_per_shard: items per safetensors file.
            dtype: optional floating dtype to store (e.g. ``torch.float16``).
            num_workers: DataLoader workers used to read ``dataset``.
            overwrite: replace an existing cache built with a different key (never a folder
                holding files a build did not write).

        A complete cache with the same key is reused without encoding anything.

        Raises:
            DataError: a cache with another key exists and ``overwrite`` is false, the
                folder is not a cache (the user's files, a run folder) or cannot be written,
                the dataset is empty, or the encoders return unusable outputs.
        """
        if batch_size <= 0 or items_per_shard <= 0:
            raise DataError("batch_size and items_per_shard must be positive; pass e.g. batch_size=16")
        if not isinstance(key, str) or not key:
            raise DataError("the cache key must be a non-empty string; build one with cache_key(model_dir, resolution)")
        existing = self.read_index()
        if existing is not None:
            if existing.get("key") == key:
                logger.info("embedding cache at %s is complete; reusing it", self.root)
                return CachedDataset(self.root, key=key)
            if not overwrite:
                self.check_key(key)  # raises the mismatch error
        elif self.root.exists() and not self.root.is_dir():
            raise DataError(f"cache path '{self.root}' is a file; pass a folder path for the cache")
        elif self.root.is_dir() and any(self.root.iterdir()) and not overwrite and folder_kind(self.root) == "cache":
            raise DataError(
                f"cache dir '{self.root}' is not empty but holds no complete cache; delete it, "
                "pass overwrite=True or choose a new cache dir"
            )

        self._remove_stale_builds()
        # written into .<root>.building-<pid>-<id>, renamed into place when every shard and the index are on disk
        with replace_folder(self.root, "cache", overwrite=overwrite, error=DataError, tag="building",
                            info={"key": key}) as tmp:
            index = self._encode_into(
                tmp, dataset, encode_images, encode_text, batch_size, key, items_per_shard, dtype, num_workers
            )
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
        return CachedDataset(self.root, key=key)

    def _encode_into(
        self,
        out: Path,
        dataset: Any,
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[list[str]], Mapping[str, torch.Tensor]],
        batch_size: int,
        key: str,
        items_per_shard: int,
        dtype: torch.dtype | None,
        num_workers: int,
    ) -> dict[str, Any]:
        loader = torch.utils.data.DataLoader(  # a private generator: building a cache leaves the global RNG alone
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
            generator=torch.Generator().manual_seed(0),
        )
        shards: list[dict[str, Any]] = []
        pending: dict[str, list[torch.Tensor]] = {}
        pending_captions: list[str] = []
        shapes: dict[str, list[int]] = {}
        total = 0

        def convert(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.contiguous()

        def flush() -> None:
            nonlocal pending, pending_captions
            if not pending_captions:
                return
            name = f"shard-{len(shards):06d}.safetensors"
            tensors = {k: torch.cat(v) for k, v in pending.items()}
            save_file(tensors, str(out / name), metadata={"captions": json.dumps(pending_captions)})
            shards.append({"file": name, "count": len(pending_captions)})
            pending, pending_captions = {}, []

        with torch.no_grad():
            for batch in loader:
                b = len(batch["caption"])
                outputs: dict[str, Any] = {"latents": encode_images(batch["pixels"]), "index": batch["index"]}
                text = encode_text(list(batch["caption"]))
                if not isinstance(text, Mapping):
                    raise DataError(
                        f"encode_text returned a {type(text).__name__}; it must return a dict of tensors, "
                        "e.g. {'prompt_embeds': ...}"
                    )
                for name, value in text.items():
                    if name in ("latents", "caption", "index"):
                        raise DataError(
                            f"encode_text returned a tensor named '{name}', which clashes with the cache's own "
                            "item fields; rename it (e.g. 'prompt_embeds')"
                        )
                    outputs[_TEXT_PREFIX + str(name)] = value
                for name, value in outputs.items():
                    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != b:
                        raise DataError(
                            f"encoder output '{name}' must be a tensor with the batch ({b}) as first dimension, "
                            f"got {getattr(value, 'shape', type(value).__name__)}; return one row per item"
                        )
                    shape = list(value.shape[1:])
                    if shapes.setdefault(name, shape) != shape:
                        raise DataError(
                            f"encoder output '{name}' changed shape from {shapes[name]} to {shape} between batches; "
                            "make it fixed per item (e.g. pad tokens to max_length)"
                        )
                    pending.setdefault(name, []).append(convert(value))
                pending_captions.extend(batch["caption"])
                total += b
                while len(pending_captions) >= items_per_shard:
                    # Split the pending rows so every shard except the last is full.
                    extra = {k: torch.cat(v)[items_per_shard:] for k, v in pending.items()}
                    extra_captions = pending_captions[items_per_shard:]
                    pending = {k: [torch.cat(v)[:items_per_shard]] for k, v in pending.items()}
                    pending_captions = pending_captions[:items_per_shard]
                    flush()
                    pending = {k: [v] for k, v in extra.items()} if extra_captions else {}
                    pending_captions = extra_captions
            flush()

        if total == 0:
            raise DataError("the dataset given to EmbeddingCache.build is empty; check the data source")
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "complete": True,
            "key": key,
            "num_items": total,
            "shards": shards,
            "text_keys": sorted(n[len(_TEXT_PREFIX):] for n in shapes if n.startswith(_TEXT_PREFIX)),
            "shapes": shapes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


class CachedDataset(torch.utils.data.Dataset):
    """Map-style view of a complete :class:`EmbeddingCache`.

    Items are ``{"latents": Tensor, "caption": str, "index": int, <text name>: Tensor, ...}``.
    One shard is held in memory at a time (the last one touched).

    Args:
        root: the cache folder.
        key: when given, the cache must have been built with this key.

    Raises:
        DataError: no complete cache at ``root`` or a key mismatch.
    """

    def __init__(self, root: str | os.PathLike[str], key: str | None = None) -> None:
        self.cache = EmbeddingCache(root)
        self.root = self.cache.root
        if key is not None:
            index = self.cache.check_key(key)
        else:
            index = self.cache.read_index()
            if index is None:
                index = self.cache.check_key("")  # raises the "no complete cache" error
        self.index = index
        self.key: str = index["key"]
        self.text_keys: list[str] = list(index.get("text_keys", []))
        self._counts = [int(s["count"]) for s in index["shards"]]
        self._starts: list[int] = []
        start = 0
        for c in self._counts:
            self._starts.append(start)
            start += c
        self._len = start
        self._loaded: tuple[int, dict[str, torch.Tensor], list[str]] | None = None

    def __len__(self) -> int:
        return self._len

    def _shard(self, s: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        if self._loaded is None or self._loaded[0] != s:
            path = str(self.root / self.index["shards"][s]["file"])
            tensors = load_file(path)
            with safe_open(path, framework="pt") as fh:
                captions = json.loads((fh.metadata() or {}).get("captions", "[]"))
            self._loaded = (s, tensors, captions)
        return self._loaded[1], self._loaded[2]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} cached items")
        i %= self._len
        s = bisect_right(self._starts, i) - 1
        tensors, captions = self._shard(s)
        row = i - self._starts[s]
        item: dict[str, Any] = {
            "latents": tensors["latents"][row],
            "caption": captions[row],
            "index": int(tensors["index"][row]),
        }
        for name in self.text_keys:
            item[name] = tensors[_TEXT_PREFIX + name][row]
        return item
