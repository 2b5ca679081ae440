"""Training from a stream (no length, no random access): the contract between a stream and the trainer.

A map-style dataset is read by index (:class:`~fastgen.trainers.engine.trainer.ShardedBatchSampler`);
a *stream* such as :class:`~fastgen.data.shards.ShardStream` (webdataset shards read on the fly, so
10 M images need no encoding pass before the first step) instead provides :meth:`StreamingDataset.batches`:
an endless, deterministic iterator of collated micro-batches for one process, started at a saved
:class:`StreamPosition`.

How a stream stays exactly resumable
------------------------------------
Each process (rank) reads its own endless sequence of *raw* samples, epoch after epoch: epoch ``e``'s
order is fixed by ``(seed, e, rank, world_size)`` alone. The position of a process is
``(epoch, offset)``: ``offset`` raw samples of epoch ``epoch`` are behind it, whether they were
trained on or skipped as unreadable. Every raw sample yields exactly one item — the decoded sample or
a marker of an unreadable one — so with DataLoader workers (raw sample ``n`` of the iterator decoded
by worker ``n % num_workers``, which the DataLoader's round-robin returns in order) the main process
still sees the sequence in order and knows the position of each micro-batch it hands out. The trainer
saves every rank's position in the checkpoint (``trainer_state.json``: ``stream``) and a resume
starts each rank's stream there: the samples before it are skipped without being decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from fastgen.errors import DataError

__all__ = ["BAD_KEY", "LONG_CAPTION_KEY", "POSITION_KEY", "StreamBatches", "StreamPosition", "StreamingDataset", "start_position"]

#: item field carrying ``(epoch, offset)`` of the raw sample it came from (removed before collation)
POSITION_KEY = "_stream_position"
#: item field of a marker for an unreadable raw sample: ``"<name>: <reason>"``
BAD_KEY = "_stream_bad"
#: optional item field: True when the sample's caption is longer than the text encoder reads
LONG_CAPTION_KEY = "_long_caption"


@dataclass(frozen=True)
class StreamPosition:
    """Where one process's stream stands: ``offset`` raw samples of epoch ``epoch`` are consumed
    (trained on, or skipped as unreadable); ``samples`` counts the samples it trained on in total."""

    epoch: int = 0
    offset: int = 0
    samples: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StreamPosition":
        """Raises ``ValueError`` on anything but non-negative integers."""
        try:
            values = {k: int(data.get(k, 0)) for k in ("epoch", "offset", "samples")}
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a stream position: {data!r}") from exc
        if any(v < 0 for v in values.values()):
            raise ValueError(f"a stream position has non-negative epoch/offset/samples, got {data!r}")
        return cls(**values)


@runtime_checkable
class StreamingDataset(Protocol):
    """A training source without a length, read by the trainer through :meth:`batches`."""

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
    ) -> "StreamBatches":
        """This rank's endless iterator of collated micro-batches of ``batch_size`` samples from ``start``."""
        ...


def start_position(saved: Mapping[str, Any] | None, rank: int, world_size: int) -> tuple[StreamPosition, str | None]:
    """The position rank ``rank`` of ``world_size`` starts at, from a checkpoint's ``stream`` entry
    (``{"world_size": W, "ranks": [position dict per rank]}``); returns it and a warning (or None).

    With the same number of processes every rank continues exactly where it stopped. With another number
    the split of the raw sequence among ranks changes, so the nearest position is taken: the earliest
    saved epoch, at the raw sample the slowest saved rank had reached (rank-local offset x old world size
    / new world size); the data order then differs from the original run's.

    Raises:
        ValueError: a malformed entry.
    """
    if saved is None:
        return StreamPosition(), None
    if not isinstance(saved, Mapping) or not isinstance(saved.get("ranks"), Sequence):
        raise ValueError(f"'stream' must be {{'world_size': N, 'ranks': [...]}}, got {saved!r}")
    positions = [StreamPosition.from_dict(p) for p in saved["ranks"]]
    old_world = int(saved.get("world_size", len(positions)))
    if not positions or old_world != len(positions):
        raise ValueError(f"'stream' lists {len(positions)} rank positions for world_size {old_world}")
    if old_world == world_size:
        return positions[rank], None
    epoch = min(p.epoch for p in positions)
    offset = min(p.offset for p in positions if p.epoch == epoch)
    samples = sum(p.samples for p in positions) // world_size
    pos = StreamPosition(epoch, offset * old_world // world_size, samples)
    return pos, (
        f"the stream position was saved by {old_world} process(es) and is resumed by {world_size}: every rank "
        f"continues at epoch {pos.epoch}, raw sample {pos.offset} of its share (the nearest position; the data "
        "order differs from the original run)"
    )


class StreamBatches:
    """Collated micro-batches from a stream of position-tagged items (see the module docstring).

    Args:
        dataset: an ``IterableDataset`` yielding, for every raw sample in order, one dict with
            :data:`POSITION_KEY` = ``(epoch, offset)`` and either the sample's fields or :data:`BAD_KEY`.
        batch_size: samples per micro-batch.
        start: the position ``dataset`` starts at (the first item's position is at or after it).
        num_workers, pin_memory: of the DataLoader that runs ``dataset``.
        seed: seeds the DataLoader's private generator (the global torch RNG is never drawn from).
        on_bad: ``on_bad(num_bad, num_seen, bad_names, epoch_end)``, called after every item once a sample
            was unreadable and at every epoch end (``epoch_end=True``), e.g. to enforce a minimum valid
            fraction by raising.
        on_epoch_end: ``on_epoch_end(epoch, stats)`` once the stream moves past ``epoch``; ``stats`` holds
            ``seen``, ``bad`` and ``long_captions`` (items flagged :data:`LONG_CAPTION_KEY`) of that epoch.
        collate: how a list of sample dicts becomes a batch (default: torch's ``default_collate``).

    :attr:`position` is the position after the last micro-batch handed out (what a checkpoint saves).
    """

    def __init__(
        self,
        dataset: torch.utils.data.IterableDataset,
        batch_size: int,
        *,
        start: StreamPosition = StreamPosition(),
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        on_bad: Callable[[int, int, list[str], bool], None] | None = None,
        on_epoch_end: Callable[[int, dict[str, int]], None] | None = None,
        collate: Callable[[list[dict[str, Any]]], Any] = torch.utils.data.default_collate,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.position = start
        self.on_bad, self.on_epoch_end, self.collate = on_bad, on_epoch_end, collate
        self.num_seen = 0
        self.num_bad = 0
        self.bad_files: list[str] = []
        self._epoch = start.epoch
        self._epoch_stats = {"seen": 0, "bad": 0, "long_captions": 0}
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,  # one raw sample per fetch: the round-robin over workers keeps the order
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=False,
        )
        self._items: Iterator[dict[str, Any]] | None = None
        self._closed = False

    def __iter__(self) -> "StreamBatches":
        return self

    def _next_item(self) -> dict[str, Any]:
        if self._closed:
            raise DataError("these stream batches were closed; start new ones at their position (dataset.batches(start=...))")
        if self._items is None:
            self._items = iter(self._loader)
        try:
            return next(self._items)
        except StopIteration:
            raise DataError("the data stream ended; a training stream must be endless (epoch after epoch)") from None

    def _finish_epoch(self, new_epoch: int) -> None:
        stats, self._epoch_stats = self._epoch_stats, {"seen": 0, "bad": 0, "long_captions": 0}
        if stats["seen"] and stats["seen"] == stats["bad"]:
            raise DataError(
                f"epoch {self._epoch} of the data stream had no readable sample ({stats['bad']} unreadable, e.g. "
                f"{self.bad_files[0] if self.bad_files else '?'}); check the data source"
            )
        if self.on_bad is not None and self.num_bad:
            self.on_bad(self.num_bad, self.num_seen, self.bad_files, True)
        if self.on_epoch_end is not None:
            self.on_epoch_end(self._epoch, stats)
        self._epoch = new_epoch

    def __next__(self) -> Any:
        items: list[dict[str, Any]] = []
        last = None
        while len(items) < self.batch_size:
            item = self._next_item()
            epoch, offset = (int(v) for v in item.pop(POSITION_KEY))
            if epoch != self._epoch:
                self._finish_epoch(epoch)
            last = (epoch, offset)
            self.num_seen += 1
            self._epoch_stats["seen"] += 1
            bad = item.get(BAD_KEY)
            if bad is not None:
                self.num_bad += 1
                self._epoch_stats["bad"] += 1
                self.bad_files.append(str(bad).split(": ", 1)[0])
            elif item.pop(LONG_CAPTION_KEY, False):
                self._epoch_stats["long_captions"] += 1
            if self.num_bad and self.on_bad is not None:
                self.on_bad(self.num_bad, self.num_seen, self.bad_files, False)
            if bad is None:
                items.append(item)
        assert last is not None
        self.position = StreamPosition(last[0], last[1] + 1, self.position.samples + len(items))
        return self.collate(items)

    def close(self) -> None:
        """Stop the DataLoader workers (if any); no batch can be read after this (:attr:`position` stays)."""
        self._closed = True
        items, self._items = self._items, None
        shutdown = getattr(items, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict[str, int]:
        return self.position.to_dict()

