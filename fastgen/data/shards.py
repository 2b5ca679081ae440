"""Image + caption samples streamed from webdataset ``.tar`` shards.

Reading uses the ``webdataset`` package's tar iterators (``tar_file_expander`` +
``group_by_keys``) on file objects this module opens itself, so no URL handling or
network access is involved; if ``webdataset`` cannot be imported, a plain :mod:`tarfile`
reader with the same grouping rules (sample key = member name up to the first dot of
its base name) is used instead.

A sample needs an image under one of the keys ``jpg``/``jpeg``/``png``/``webp`` and a
caption under ``txt``/``caption`` or inside a ``json`` member (``caption``/``text``/
``prompt`` field). Captions are UTF-8; a sample whose caption is not is skipped like any
other unreadable sample, with a message that says so.

:func:`check_shards` tells an empty, non-tar or sample-less shard file apart before training
starts (:func:`fastgen.data.sources.build_dataset` runs it).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from fastgen.data.folders import (
    CAPTION_FIELDS,
    _caption_limit,
    check_valid_fraction,
    set_sample_options,
    decode_image,
    decode_utf8,
    image_to_tensor,
    resize_center_crop,
    warn_long_captions,
    whitespace_tokens,
)
from fastgen.data.streaming import BAD_KEY, LONG_CAPTION_KEY, POSITION_KEY, StreamBatches, StreamPosition
from fastgen.errors import DataError
from fastgen.io import atomic_file

try:  # pragma: no branch
    from webdataset.tariterators import group_by_keys as _wds_group_by_keys
    from webdataset.tariterators import tar_file_expander as _wds_tar_file_expander

    HAVE_WEBDATASET = True
except Exception:  # pragma: no cover - exercised only without webdataset
    HAVE_WEBDATASET = False

__all__ = [
    "ImageCaptionShards", "ShardStream", "check_shards", "expand_shards", "write_shards", "IMAGE_KEYS", "CAPTION_KEYS", "SHARD_SUFFIXES",
]

logger = logging.getLogger(__name__)

IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS: tuple[str, ...] = ("txt", "caption")
MIN_SEEN_FOR_CHECK = 20
#: File endings read as webdataset shards.
SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")


# --------------------------------------------------------------------------- shard lists


def _braceexpand(pattern: str) -> list[str]:
    """Expand ``{000..003}`` ranges and ``{a,b}`` alternatives (nested braces supported)."""
    try:
        import braceexpand  # installed with webdataset

        return list(braceexpand.braceexpand(pattern))
    except ImportError:  # pragma: no cover
        pass
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.startswith("0") or b.startswith("0") else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [x for opt in options for x in _braceexpand(head + opt + tail)]


def expand_shards(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Resolve a shard source into an ordered list of existing shard paths.

    ``source`` may be a list of paths, a directory (all ``*.tar``/``*.tar.gz``/``*.tgz``
    inside, sorted) or a path/brace pattern such as ``data-{000..003}.tar``.

    Raises:
        DataError: when nothing matches or a listed shard does not exist.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            paths = sorted(str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
            if not paths:
                raise DataError(
                    f"shard folder '{path}' contains no .tar shards; point to a folder of webdataset "
                    "shards, a list of .tar files or a pattern like data-{000..009}.tar"
                )
            return paths
        paths = _braceexpand(text) if "{" in text else [text]
    else:
        paths = [os.fspath(p) for p in source]
        if not paths:
            raise DataError("the shard list is empty; pass at least one .tar shard path")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} shards do not exist (first: '{missing[0]}'); "
            "check the path or brace pattern, e.g. data-{000..009}.tar"
        )
    return paths


# --------------------------------------------------------------------------- tar reading


def _split_name(name: str) -> tuple[str | None, str | None]:
    """``dir/abc.txt`` -> ``("dir/abc", "txt")``; keys end at the first dot of the base name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def _plain_tar_samples(path: str, on_error) -> Iterator[dict[str, Any]]:
    """Fallback reader: group consecutive members of one tar by key, like webdataset."""
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = _split_name(info.name)
                if key is None or ext is None or os.path.basename(key).startswith("__"):
                    continue
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                if current is None or current["__key__"] != key:
                    if current:
                        yield current
                    current = {"__key__": key, "__url__": path}
                current[ext.lower()] = data
    except Exception as exc:
        on_error(exc)
    if current:
        yield current


def _iter_tar_samples(path: str, on_error) -> Iterator[dict[str, Any]]:
    """Yield raw samples (``{"__key__", "__url__", ext: bytes}``) from one shard."""
    if not HAVE_WEBDATASET:
        yield from _plain_tar_samples(path, on_error)
        return

    def handler(exc: Exception) -> bool:
        on_error(exc)
        return True  # keep going with the next member / shard

    with open(path, "rb") as stream:
        source = [{"url": path, "stream": stream}]
        files = _wds_tar_file_expander(source, handler=handler)
        yield from _wds_group_by_keys(files, handler=handler)


def _caption_of(sample: dict[str, Any]) -> str | None:
    name = sample.get("__key__", "?")
    for key in CAPTION_KEYS:
        if key in sample:
            return decode_utf8(sample[key], f"caption member '{name}.{key}'").strip()
    if "json" in sample:
        record = json.loads(decode_utf8(sample["json"], f"caption member '{name}.json'"))
        if isinstance(record, dict):
            for key in CAPTION_FIELDS:
                if isinstance(record.get(key), str):
                    return record[key].strip()
    return None


def _decode_sample(sample: dict[str, Any], size: tuple[int, int], center_crop: bool) -> tuple[Image.Image, str]:
    """The image (resized / cropped to ``size``) and caption of a raw sample; raises on anything unreadable."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise DataError(f"no image member (expected one of {', '.join(IMAGE_KEYS)})")
    caption = _caption_of(sample)
    if caption is None:
        raise DataError("no caption (expected a txt/caption member or a json with a caption/text/prompt field)")
    img = decode_image(bytes(sample[image_key]))
    return resize_center_crop(img, size, center_crop), caption


def check_shards(paths: Iterable[str]) -> None:
    """Check that each shard is a readable tar holding at least one image+caption sample.

    Only the start of each shard is read: the check stops at its first complete sample.

    Raises:
        DataError: naming the first bad shard and what is wrong with it ("is empty",
            "is not a tar archive or is damaged", "holds no image+caption pair").
    """
    fix = "re-create it (e.g. with fastgen.data.shards.write_shards) or leave it out of data.source"
    for path in paths:
        if Path(path).stat().st_size == 0:
            raise DataError(f"shard '{path}' is empty (0 bytes); {fix}")
        members = 0
        current: dict[str, Any] = {}
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    members += 1
                    key, ext = _split_name(info.name)
                    if key is None or ext is None or os.path.basename(key).startswith("__"):
                        continue
                    if current.get("__key__") != key:
                        current = {"__key__": key}
                    ext = ext.lower()
                    if ext in IMAGE_KEYS:
                        current[ext] = b""  # presence is enough; images are not decoded here
                    elif ext in CAPTION_KEYS or ext == "json":
                        fh = tar.extractfile(info)
                        current[ext] = fh.read() if fh is not None else b""
                    if any(k in current for k in IMAGE_KEYS):
                        try:
                            if _caption_of(current) is not None:
                                break
                        except Exception:  # an unreadable caption: look further
                            pass
                else:
                    found = f"none of its {members} files form one" if members else "it has no files"
                    raise DataError(
                        f"shard '{path}' holds no image+caption pair ({found}); each sample needs an image member "
                        f"({'/'.join(IMAGE_KEYS)}) and a caption (.txt/.caption, or .json with a caption/text/prompt "
                        f"field) under the same key, e.g. 000001.png + 000001.txt; {fix}"
                    )
        except DataError:
            raise
        except PermissionError as exc:
            raise DataError(f"shard '{path}' cannot be read ({exc}); check its permissions") from exc
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(
                f"shard '{path}' is not a tar archive or is damaged ({type(exc).__name__}: {exc}); {fix}"
            ) from exc


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = 0, 1
    return (r if rank is None else rank), (w if world_size is None else world_size)


# --------------------------------------------------------------------------- dataset


class ImageCaptionShards(torch.utils.data.IterableDataset):
    """Stream ``{"pixels", "caption", "index", "key"}`` samples from webdataset shards.

    Args:
        shards: list of paths, a folder of ``.tar`` files or a brace pattern.
        resolution, center_crop, random_flip, caption_dropout, min_valid_fraction: as for
            :class:`~fastgen.data.folders.ImageCaptionFolder`.
        rank, world_size: this process's place among the training processes (defaults to
            ``torch.distributed`` when initialised, else 0 / 1).
        split: how the stream is divided among ``world_size x num_workers`` consumers.
            ``"shard"`` gives each consumer whole shards (cheap, but per-consumer counts
            follow the shard sizes); ``"sample"`` makes every consumer read every shard and
            keep every n-th sample (counts differ by at most one); ``"auto"`` uses
            ``"shard"`` when there are at least as many shards as consumers.
        shuffle_shards: shuffle the shard order each epoch (same order in every consumer,
            seeded by ``seed`` and :meth:`set_epoch`).
        shuffle_buffer: if > 0, shuffle samples within a buffer of this size.
        seed: base seed of the shuffles.
        max_caption_tokens, count_tokens: as for :class:`~fastgen.data.folders.ImageCaptionFolder`:
            captions longer than ``max_caption_tokens`` are counted in :attr:`num_long_captions`
            (over the current pass) and, at the end of the first pass that met any, one warning
            names how many.

    Every sample is produced exactly once per epoch across all consumers. ``index`` is the
    sample's position in the full, unsplit stream of the (possibly shuffled) shard list
    when ``split="sample"``, and its position within its shard combined with the shard
    number (``shard_number * 10**8 + position``) when ``split="shard"``; ``key`` is
    ``"<shard path>:<sample key>"`` and is unique.

    Corrupt samples (undecodable image, missing image or caption, broken json) are
    skipped, logged once and counted in :attr:`num_bad` / :attr:`bad_files`; once at least
    20 samples were seen, and again at the end of the stream, a valid fraction below
    ``min_valid_fraction`` raises :class:`DataError`. With DataLoader workers the counts
    live in each worker's copy of the dataset.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        resolution: int | tuple[int, int] = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        min_valid_fraction: float = 0.9,
        caption_dropout: float = 0.0,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        split: Literal["auto", "shard", "sample"] = "auto",
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        max_caption_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        set_sample_options(self, resolution, center_crop, random_flip, min_valid_fraction, caption_dropout)
        if split not in ("auto", "shard", "sample"):
            raise DataError(f"split must be 'auto', 'shard' or 'sample', got {split!r}; pass one of those")
        self.rank, self.world_size = _dist_info(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise DataError(
                f"rank {self.rank} is outside world_size {self.world_size}; pass 0 <= rank < world_size"
            )
        self.split = split
        self.shuffle_shards = bool(shuffle_shards)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.epoch = 0
        self.num_seen = 0
        self.num_bad = 0
        self.bad_files: list[str] = []
        self.shard_errors: list[str] = []
        self.max_caption_tokens = _caption_limit(max_caption_tokens)
        self.count_tokens: Callable[[str], int] = count_tokens or whitespace_tokens
        self.num_long_captions = 0
        self._warned_long_captions = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used to seed the shuffles (call before iterating)."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ helpers

    def _consumer(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers

    def _mode(self, consumers: int) -> str:
        if self.split != "auto":
            return self.split
        return "shard" if len(self.shards) >= consumers else "sample"

    def _on_shard_error(self, shard: str):
        def record(exc: BaseException) -> None:
            msg = f"{shard}: {type(exc).__name__}: {exc}"
            self.shard_errors.append(msg)
            logger.warning("error while reading shard %s; skipping the rest of it", msg)

        return record

    def _decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, str]:
        img, caption = _decode_sample(sample, self.size, self.center_crop)
        if self.random_flip and bool(torch.rand(()) < 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(img), caption

    def _check_floor(self) -> None:
        check_valid_fraction(
            self.num_bad, self.num_seen, self.min_valid_fraction, self.bad_files,
            f"the shards ({len(self.shards)} files, rank {self.rank})",
        )

    def _raw_stream(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Yield ``(index, shard, raw_sample)`` for this consumer's share of the epoch."""
        consumer, consumers = self._consumer()
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        mode = self._mode(consumers)
        if mode == "shard":
            for pos in order[consumer::consumers]:
                shard = self.shards[pos]
                for j, sample in enumerate(_iter_tar_samples(shard, self._on_shard_error(shard))):
                    yield pos * 10**8 + j, shard, sample
        else:
            index = 0
            for pos in order:
                shard = self.shards[pos]
                for sample in _iter_tar_samples(shard, self._on_shard_error(shard)):
                    if index % consumers == consumer:
                        yield index, shard, sample
                    index += 1

    def _shuffled(self, stream: Iterable[Any]) -> Iterator[Any]:
        if self.shuffle_buffer <= 1:
            yield from stream
            return
        consumer, _ = self._consumer()
        rng = random.Random(self.seed * 1_000_003 + self.epoch * 7919 + consumer)
        buffer: list[Any] = []
        for item in stream:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                k = rng.randrange(len(buffer))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        limit = self.max_caption_tokens
        self.num_long_captions = 0
        num_captions = 0
        for index, shard, sample in self._shuffled(self._raw_stream()):
            name = f"{shard}:{sample.get('__key__')}"
            self.num_seen += 1
            try:
                pixels, caption = self._decode(sample)
            except Exception as exc:
                self.num_bad += 1
                self.bad_files.append(name)
                logger.warning("skipping unreadable sample %s (%s: %s)", name, type(exc).__name__, exc)
                if self.num_seen >= MIN_SEEN_FOR_CHECK:
                    self._check_floor()
                continue
            if self.num_seen >= MIN_SEEN_FOR_CHECK and self.num_bad:
                self._check_floor()
            if limit is not None:
                num_captions += 1
                if self.count_tokens(caption) > limit:
                    self.num_long_captions += 1
            if self.caption_dropout > 0 and bool(torch.rand(()) < self.caption_dropout):
                caption = ""
            yield {"pixels": pixels, "caption": caption, "index": index, "key": name}
        self._check_floor()
        if limit is not None and self.num_long_captions and not self._warned_long_captions:
            self._warned_long_captions = True
            warn_long_captions(
                f"the shards ({len(self.shards)} files, rank {self.rank})", self.num_long_captions, num_captions,
                limit, self.count_tokens,
            )

    def __repr__(self) -> str:
        h, w = self.size
        return (
            f"ImageCaptionShards(shards={len(self.shards)}, size={h}x{w}, rank={self.rank}/"
            f"{self.world_size}, split={self.split})"
        )


# --------------------------------------------------------------------------- streaming for training

_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
#: raw sample refs: (shard number, position in the shard, key, members); a member is (offset, size) in
#: an uncompressed shard (read when the sample is decoded) or the member's bytes (compressed shards)
_Ref = tuple[int, int, str, dict[str, Any]]
#: at most this many names of unreadable samples are kept for error messages
_MAX_BAD_NAMES = 1000


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(6)
    return any(head.startswith(m) for m in _COMPRESSED_MAGIC)


def _scan_shard(path: str, want: Callable[[], bool], on_error) -> Iterator[tuple[str, dict[str, Any]]]:
    """The samples of one shard in tar order as ``(key, members)`` (webdataset's grouping: consecutive
    members with the same key), reading as little as possible.

    An uncompressed shard is read header by header (``members``: ext -> ``(offset, size)`` of the data,
    which is read only when the sample is decoded); a compressed one (gz/bz2/xz) front to back, keeping
    a sample's bytes only when ``want()`` (asked once, when the sample's first member is met) is true.
    A read error ends the shard (``on_error(exc)``); the samples before it are yielded.
    """
    compressed = _is_compressed(path)
    key: str | None = None
    members: dict[str, Any] = {}
    keep = True
    try:
        with tarfile.open(path, mode="r|*" if compressed else "r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                tar.members.clear()  # tarfile remembers every member; a shard is read once, in order
                if not info.isreg():
                    continue
                k, ext = _split_name(info.name)
                if k is None or ext is None or os.path.basename(k).startswith("__"):
                    continue
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                    keep = want() if compressed else True
                if not compressed:
                    members[ext.lower()] = (info.offset_data, info.size)
                elif keep:
                    fh = tar.extractfile(info)
                    members[ext.lower()] = fh.read() if fh is not None else b""
    except Exception as exc:  # a damaged shard: keep what was read before the damage
        on_error(exc)
    if key is not None:
        yield key, members


class _MemberReader:
    """Reads ``(offset, size)`` members of uncompressed shards through a few open files."""

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._files: dict[str, Any] = {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        fh = self._files.pop(path, None) or open(path, "rb")
        self._files[path] = fh  # most recently used last
        while len(self._files) > self.max_open:
            self._files.pop(next(iter(self._files))).close()
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise DataError(f"the shard ends inside this sample ({len(data)} of {size} bytes); it is truncated")
        return data

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


class ShardStream(torch.utils.data.IterableDataset):
    """Webdataset shards as an endless, exactly resumable training stream (no latent cache needed).

    Items are ``{"pixels", "caption", "index", "key"}`` as from :class:`ImageCaptionShards` (``index`` =
    shard number x 10**8 + position in the shard); the VAE and the text encoder run in the training step.
    The trainer reads it through :meth:`batches` (the :class:`~fastgen.data.streaming.StreamingDataset`
    contract), which sets the process's place and the data order:

    * **order of epoch e** (``shuffle``): the shard list in a permutation drawn from ``(seed, e)``, read
      sample by sample; without ``shuffle`` the listed order, every epoch;
    * **per-rank split**: sample ``g`` of epoch ``e`` (counted over all shards) goes to rank ``g % world_size``,
      so ranks see disjoint shares whose sizes differ by at most one, and together every sample once per epoch;
    * **shuffle buffer**: each rank shuffles its share through a buffer of ``shuffle_buffer`` samples (a
      generator seeded by ``(seed, e, rank)``). The buffer holds where each sample lies in its shard, not
      its bytes (compressed shards: its bytes), so a buffer of 10,000 costs little memory;
    * **position**: ``(epoch, offset)`` = raw samples of the epoch already consumed, unreadable ones
      included; a resume skips them reading tar headers only (nothing is decoded).

    Flips (``random_flip``) and caption dropout draw from a generator seeded by the sample's position, so
    they too repeat exactly after a resume and do not depend on DataLoader workers. Unreadable samples
    are skipped and counted; once 20 samples were seen, and at every epoch end, a valid fraction below
    ``min_valid_fraction`` raises :class:`DataError` naming them. Captions longer than
    ``max_caption_tokens`` (counted with ``count_tokens``) are reported once, after the first epoch with any.

    Iterating a ShardStream directly yields rank 0 of 1's samples endlessly (seed 0, shuffled);
    :meth:`iter_epoch` yields one epoch of this configuration.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        resolution: int | tuple[int, int] = 512,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        min_valid_fraction: float = 0.9,
        shuffle_buffer: int = 10000,
        max_caption_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        set_sample_options(self, resolution, center_crop, random_flip, min_valid_fraction, caption_dropout)
        if shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}; pass e.g. 10000 (0: no sample shuffle)")
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_caption_tokens = _caption_limit(max_caption_tokens)
        self.count_tokens: Callable[[str], int] = count_tokens or whitespace_tokens
        self._warned_long_captions = False
        # the place and order of this stream (set by batches / configured)
        self.rank, self.world_size, self.seed, self.shuffle = 0, 1, 0, True
        self.start = StreamPosition()
        self.shard_errors: list[str] = []

    # ------------------------------------------------------------------ configuration
    def configured(self, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                   start: StreamPosition = StreamPosition()) -> "ShardStream":
        """A copy reading rank ``rank`` of ``world_size``'s share in the order of ``seed`` from ``start``."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size")
        stream = copy.copy(self)
        stream.rank, stream.world_size, stream.seed, stream.shuffle = int(rank), int(world_size), int(seed), bool(shuffle)
        stream.start = start
        stream.shard_errors = []
        return stream

    def batches(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: StreamPosition = StreamPosition(),
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> StreamBatches:
        """This rank's endless micro-batches from ``start`` (:class:`~fastgen.data.streaming.StreamBatches`)."""
        stream = self.configured(rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, start=start)
        return StreamBatches(stream, batch_size, start=start, num_workers=num_workers, pin_memory=pin_memory, seed=seed,
                             on_bad=stream._check_bad, on_epoch_end=stream._epoch_done)

    # ------------------------------------------------------------------ the raw sequence
    def _on_shard_error(self, shard: str):
        def record(exc: BaseException) -> None:
            msg = f"{shard}: {type(exc).__name__}: {exc}"
            self.shard_errors.append(msg)
            logger.warning("error while reading shard %s; skipping the rest of it", msg)

        return record

    def _shard_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))]

    def _rank_share(self, epoch: int) -> Iterator[_Ref]:
        """This rank's raw samples of ``epoch`` in shard order (every world_size-th one)."""
        counter = 0  # samples of the epoch so far, over all shards and ranks
        rank, world = self.rank, self.world_size

        def want() -> bool:
            return counter % world == rank

        for pos in self._shard_order(epoch):
            shard = self.shards[pos]
            for j, (key, members) in enumerate(_scan_shard(shard, want, self._on_shard_error(shard))):
                if counter % world == rank:
                    yield pos, j, key, members
                counter += 1
        if counter < world:
            raise DataError(
                f"the shards hold {counter} readable sample(s) in epoch {epoch}, fewer than the {world} training "
                f"processes (rank {rank} gets none); add data or use fewer processes"
            )

    def epoch_refs(self, epoch: int) -> Iterator[_Ref]:
        """This rank's raw samples of ``epoch`` in the order they are trained on (after the shuffle buffer)."""
        share = self._rank_share(epoch)
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from share
            return
        rng = random.Random(f"fastgen-shard-stream:{self.seed}:{epoch}:{self.rank}")
        buffer: list[_Ref] = []
        for ref in share:
            buffer.append(ref)
            if len(buffer) >= self.shuffle_buffer:
                k = rng.randrange(len(buffer))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    # ------------------------------------------------------------------ items
    def _item(self, ref: _Ref, epoch: int, offset: int, reader: _MemberReader) -> dict[str, Any]:
        pos, j, key, members = ref
        shard = self.shards[pos]
        name = f"{shard}:{key}"
        position = (epoch, offset)
        try:
            image_key = next((k for k in IMAGE_KEYS if k in members), None)
            wanted = [k for k in (image_key, *CAPTION_KEYS, "json") if k is not None and k in members]
            sample = {k: (members[k] if isinstance(members[k], bytes) else reader.read(shard, *members[k])) for k in wanted}
            sample["__key__"] = key
            img, caption = _decode_sample(sample, self.size, self.center_crop)
        except Exception as exc:
            logger.warning("skipping unreadable sample %s (%s: %s)", name, type(exc).__name__, exc)
            return {POSITION_KEY: position, BAD_KEY: f"{name}: {type(exc).__name__}: {exc}"}
        long_caption = self.max_caption_tokens is not None and self.count_tokens(caption) > self.max_caption_tokens
        if self.random_flip or self.caption_dropout > 0:
            rng = random.Random(f"fastgen-shard-sample:{self.seed}:{epoch}:{self.rank}:{offset}")
            if self.random_flip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
                caption = ""
        item: dict[str, Any] = {"pixels": image_to_tensor(img), "caption": caption, "index": pos * 10**8 + j, "key": name,
                                POSITION_KEY: position}
        if long_caption:
            item[LONG_CAPTION_KEY] = True
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every raw sample from :attr:`start` on, epoch after epoch, as an item or an unreadable-sample marker;
        DataLoader worker ``w`` of ``K`` produces raw samples ``n`` (counted from the start) with ``n % K == w``."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        reader = _MemberReader()
        epoch, skip, n = self.start.epoch, self.start.offset, 0
        try:
            while True:
                for offset, ref in enumerate(self.epoch_refs(epoch)):
                    if skip:
                        skip -= 1
                        continue
                    if n % workers == worker:
                        yield self._item(ref, epoch, offset, reader)
                    n += 1
                epoch += 1
        finally:
            reader.close()

    def iter_epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """One epoch of this rank's readable samples, in training order (unreadable ones left out)."""
        reader = _MemberReader()
        try:
            for offset, ref in enumerate(self.epoch_refs(epoch)):
                item = self._item(ref, epoch, offset, reader)
                if BAD_KEY not in item:
                    item.pop(POSITION_KEY)
                    item.pop(LONG_CAPTION_KEY, None)
                    yield item
        finally:
            reader.close()

    # ------------------------------------------------------------------ checks (main process)
    def _where(self) -> str:
        return f"the shards ({len(self.shards)} files, rank {self.rank} of {self.world_size})"

    def _check_bad(self, num_bad: int, num_seen: int, bad_files: list[str], epoch_end: bool) -> None:
        del bad_files[_MAX_BAD_NAMES:]
        if epoch_end or num_seen >= MIN_SEEN_FOR_CHECK:
            check_valid_fraction(num_bad, num_seen, self.min_valid_fraction, bad_files, self._where())

    def _epoch_done(self, epoch: int, stats: dict[str, int]) -> None:
        limit = self.max_caption_tokens
        if limit is not None and stats["long_captions"] and not self._warned_long_captions:
            self._warned_long_captions = True
            warn_long_captions(self._where(), stats["long_captions"], stats["seen"] - stats["bad"], limit, self.count_tokens)

    def __repr__(self) -> str:
        h, w = self.size
        return (f"ShardStream(shards={len(self.shards)}, size={h}x{w}, rank={self.rank}/{self.world_size}, "
                f"shuffle={self.shuffle}, shuffle_buffer={self.shuffle_buffer}, start={self.start})")


# --------------------------------------------------------------------------- writing


def _image_bytes(image: Any, fmt: str) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
        img = image.convert("RGB") if pil_format == "JPEG" and image.mode != "RGB" else image
        img.save(buf, format=pil_format)
        return buf.getvalue()
    raise DataError(f"write_shards got an image of type {type(image).__name__}; pass PIL images or encoded bytes")


def write_shards(
    items: Iterable[Any],
    out_dir: str | os.PathLike[str],
    per_shard: int,
    *,
    prefix: str = "data",
    image_format: Literal["png", "jpg", "jpeg", "webp"] = "png",
    caption_format: Literal["txt", "json"] = "txt",
) -> list[str]:
    """Write ``(image, caption)`` items into webdataset shards ``<prefix>-000000.tar`` ...

    ``image`` is a PIL image (encoded as ``image_format``) or already-encoded bytes;
    items may also be dicts ``{"image": ..., "caption": ..., "key": ...}``. Captions go into a
    ``.txt`` member or a ``.json`` member ``{"caption": ...}``. Each shard is written to a
    temporary name then renamed. Returns the shard paths in order.
    """
    if per_shard <= 0:
        raise DataError(f"per_shard must be positive, got {per_shard}; pass e.g. 1000")
    if image_format not in ("png", "jpg", "jpeg", "webp"):
        raise DataError(f"image_format {image_format!r} is not supported; use png, jpg or webp")
    if caption_format not in ("txt", "json"):
        raise DataError(f"caption_format {caption_format!r} is not supported; use txt or json")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    tar: tarfile.TarFile | None = None
    writing = None  # the open fastgen.io.atomic_file context of the current shard
    count = 0

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        assert tar is not None
        tar.addfile(info, io.BytesIO(data))

    def close() -> None:
        nonlocal tar, writing
        if tar is not None and writing is not None:
            tar.close()
            writing[0].__exit__(None, None, None)  # fsync + rename into place
            paths.append(str(writing[1]))
        tar, writing = None, None

    try:
        for item in items:
            if isinstance(item, dict):
                image, caption, key = item.get("image"), item.get("caption"), item.get("key")
            else:
                image, caption = item
                key = None
            if count % per_shard == 0:
                close()
                final = out / f"{prefix}-{len(paths):06d}.tar"
                ctx = atomic_file(final)
                writing = (ctx, final)
                tar = tarfile.open(ctx.__enter__(), mode="w")
            key = key or f"{count:09d}"
            add(f"{key}.{image_format}", _image_bytes(image, image_format))
            if caption is not None:
                if caption_format == "txt":
                    add(f"{key}.txt", str(caption).encode("utf-8"))
                else:
                    add(f"{key}.json", json.dumps({"caption": caption}).encode("utf-8"))
            count += 1
        close()
    except BaseException as exc:
        if tar is not None:
            tar.close()
        if writing is not None:
            writing[0].__exit__(type(exc), exc, exc.__traceback__)  # removes the temp file
        raise
    return paths
