"""One entry point for training data: the ``data:`` section of a run -> a map-style dataset.

``data.source`` picks the kind:

==========================  ==================================================================
``digits``                  the embedded digits world (pixels in [-1, 1] + captions)
a folder of images          ``img.png`` + ``img.txt`` pairs or ``metadata.jsonl``
webdataset shards           a ``.tar`` path, a brace pattern or a folder of ``.tar`` files, read either
                            as a stream (``data.streaming=true``: encoded in the training step) or
                            once into a latent cache (``data.latent_cache=true``)
an embedding-cache folder   a complete :class:`~fastgen.data.cache.EmbeddingCache` (``index.json``)
``prompts``                 prompt-only data for data-free methods: ``data.prompts`` (a prompt file)
                            or ``data.num_samples`` balanced digits-world captions
``teacher-samples``         latents the teacher generated itself from those prompts, built once
                            (:mod:`fastgen.data.teacher_samples`)
==========================  ==================================================================

With ``latent_cache`` the images and captions are encoded once by the teacher (VAE latents and
text embeddings) into ``cache_dir`` and training reads the cache (no VAE encode or text encoder
per step). Items are dicts the default collate stacks: ``pixels``/``latents``, ``caption``,
``hidden``/``pooled`` (cached text), ``index``.

With ``streaming`` the shards are a :class:`~fastgen.data.shards.ShardStream`: nothing is encoded
before the first step, the trainer reads it through :mod:`fastgen.data.streaming` (per-rank shares,
a per-epoch shuffle seeded by ``train.seed``, a shuffle buffer of ``shuffle_buffer`` samples) and a
checkpoint records each rank's position in the stream, so a resume continues exactly. On the same
samples in the same order (``train.shuffle=false``) a streamed and a cached run take the same steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fastgen.data import digits as digits_world
from fastgen.data.cache import CachedDataset, EmbeddingCache, cache_key
from fastgen.data.digits import DigitsDataset
from fastgen.data.folders import ImageCaptionFolder
from fastgen.data.prompts import load_prompts
from fastgen.data.shards import SHARD_SUFFIXES, ImageCaptionShards, ShardStream, check_shards, expand_shards
from fastgen.data.teacher_samples import load_or_generate
from fastgen.errors import ConfigError, DataError

__all__ = ["DataConfig", "PromptList", "TeacherLike", "build_dataset", "build_latent_cache", "default_cache_root", "source_kind", "source_prompts"]


@dataclass
class DataConfig:
    """The ``data:`` section (shared by every method).

    Attributes:
        source: ``digits``, an image-caption folder, webdataset shards, an embedding-cache folder,
            ``prompts`` (prompt-only, data-free) or ``teacher-samples`` (see the module docstring).
        prompts: prompt file (.txt/.json/.jsonl/.csv) of the ``prompts`` and ``teacher-samples``
            sources; ``None`` = balanced digits-world captions.
        num_samples: number of prompts (and of teacher samples) those sources use.
        latent_cache: encode images and captions once with the teacher and train from the cache.
        streaming: train on webdataset shards as a stream, encoding each batch in the training step
            (no cache to build first; exactly resumable; see the module docstring).
        shuffle_buffer: samples in each process's shuffle buffer of a stream (0: shard order only). It
            holds where samples lie in their shards, not their pixels (compressed shards: their bytes).
        vae_sample: encode images with a sample of the VAE posterior instead of its mean (only
            without ``latent_cache``, which stores one latent per image; see the README).
        cache_dir: where caches go; ``None`` = ``$FASTGEN_CACHE`` (or ``~/.cache/fastgen``).
        cache_batch_size: encoder batch size while building the latent cache.
        teacher_steps: teacher sampling steps per generated sample (``teacher-samples``).
        teacher_batch_size: teacher pipeline batch while generating samples.
        seed: seed of the prompt order and of the teacher's sampling noise.
    """

    source: str = "digits"
    prompts: str | None = None
    num_samples: int = 1000
    latent_cache: bool = False
    streaming: bool = False
    shuffle_buffer: int = 10000
    vae_sample: bool = False
    cache_dir: str | None = None
    cache_batch_size: int = 64
    teacher_steps: int = 20
    teacher_batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "cache_batch_size", "teacher_steps", "teacher_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}; e.g. 10000 (0: no sample shuffle)")
        if self.streaming and self.latent_cache:
            raise ConfigError(
                "data.streaming=true and data.latent_cache=true exclude each other: stream the shards and encode "
                "each batch in the training step, or encode them once into a cache; turn one of them off"
            )
        if self.vae_sample and self.latent_cache:
            raise ConfigError(
                "data.vae_sample=true needs data.latent_cache=false (a cache stores one latent per image); "
                "turn one of them off"
            )


class TeacherLike(Protocol):
    """What the latent cache needs of a teacher (a :class:`fastgen.models.Teacher`)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_prompt(self, prompts: list[str]) -> Any: ...


class PromptList(torch.utils.data.Dataset):
    """Prompt-only items ``{"caption": str, "index": int}`` (data-free methods)."""

    def __init__(self, prompts: Sequence[str]):
        prompts = list(prompts)
        if not prompts:
            raise DataError("the prompt list is empty; give data.prompts a file with at least one prompt")
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"caption": self.prompts[index], "index": index}


def default_cache_root() -> Path:
    """``$FASTGEN_CACHE``, else ``~/.cache/fastgen``."""
    return Path(os.environ.get("FASTGEN_CACHE") or Path.home() / ".cache" / "fastgen")


def _is_shards(source: str) -> bool:
    path = Path(source)
    return (
        source.endswith(SHARD_SUFFIXES)
        or "{" in source
        or (path.is_dir() and any(p.name.endswith(SHARD_SUFFIXES) for p in path.iterdir()))
    )


def source_kind(spec: DataConfig) -> str:
    """``digits``, ``prompts``, ``teacher-samples``, ``cache``, ``shards`` or ``folder``."""
    source = str(spec.source)
    if source in ("digits", "prompts", "teacher-samples"):
        return source
    path = Path(source)
    if (path / "index.json").is_file():
        return "cache"
    if _is_shards(source):
        return "shards"
    if path.is_dir():
        return "folder"
    raise DataError(
        f"data.source '{source}' is neither 'digits', 'prompts', 'teacher-samples' nor an existing folder of images "
        "with captions, webdataset shards (.tar / brace pattern) or an embedding cache; fix the path"
    )


def source_prompts(spec: DataConfig) -> list[str]:
    """The prompts of the ``prompts`` / ``teacher-samples`` sources (``num_samples`` of them)."""
    if spec.prompts:
        base = load_prompts(spec.prompts)
        return [base[i % len(base)] for i in range(spec.num_samples)]
    return digits_world.balanced_captions(spec.num_samples, spec.seed)


def build_latent_cache(spec: DataConfig, raw: Any, teacher: TeacherLike, teacher_id: str, resolution: int) -> CachedDataset:
    """Encode ``raw`` (pixels + captions) once with ``teacher`` into the latent cache of ``spec`` and return it."""
    key = cache_key("lcd-latents-v2", teacher_id, resolution, spec.source)  # v2: every image mode decoded to 8-bit RGB
    root = Path(spec.cache_dir) if spec.cache_dir else default_cache_root() / "lcd-latents" / key[:16]
    device = getattr(teacher, "device", torch.device("cpu"))

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        return teacher.encode(pixels.to(device=device, dtype=torch.float32)).float().cpu()

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        e = teacher.encode_prompt(captions)
        out = {"hidden": e.hidden.cpu()}
        if e.pooled is not None:
            out["pooled"] = e.pooled.cpu()
        return out

    return EmbeddingCache(root).build(raw, encode_images, encode_text, spec.cache_batch_size, key)


def build_dataset(
    spec: DataConfig,
    *,
    resolution: int,
    teacher: TeacherLike | None = None,
    teacher_id: str = "",
    generate: Callable[[list[str]], torch.Tensor] | None = None,
    generation_key: Sequence[Any] = (),
    accepts: Sequence[str] = ("digits", "folder", "shards", "cache"),
    count_tokens: Callable[[str], int] | None = None,
    max_caption_tokens: int | None = None,
) -> torch.utils.data.Dataset:
    """The training dataset of ``spec``: map-style, or a :class:`~fastgen.data.shards.ShardStream`
    (``data.streaming``; a :class:`~fastgen.data.streaming.StreamingDataset` the trainer reads by position).

    Args:
        resolution: image size of image sources.
        teacher: encodes the latent cache (``latent_cache``).
        teacher_id: identity of the teacher in cache keys (its resolved folder).
        generate: ``prompts -> latents [N, C, h, w]`` for ``teacher-samples``.
        generation_key: everything else that determines the teacher samples (steps, guidance, ...).
        accepts: the source kinds the calling method can train on.
        count_tokens, max_caption_tokens: captions of folders and shards longer than this many tokens
            (counted with ``count_tokens``, e.g. the teacher's tokenizer) are counted and reported once.

    Raises:
        DataError / ConfigError: an unknown or unusable source, naming the fix.
    """
    kind = source_kind(spec)
    if kind not in accepts:
        raise ConfigError(f"data.source '{spec.source}' is a {kind} source, but this method trains on {' / '.join(accepts)}")
    if spec.streaming and kind != "shards":
        raise ConfigError(
            f"data.streaming=true streams webdataset shards, but data.source '{spec.source}' is a {kind} source "
            "(read by index already); set data.streaming=false"
        )
    if kind == "prompts":
        return PromptList(source_prompts(spec))
    if kind == "teacher-samples":
        if generate is None:
            raise ConfigError("data.source=teacher-samples needs a method that generates teacher samples")
        prompts = source_prompts(spec)
        key = cache_key("teacher-samples-v1", teacher_id, resolution, spec.teacher_steps, spec.seed, list(generation_key), prompts)
        root = Path(spec.cache_dir) if spec.cache_dir else default_cache_root() / "teacher-samples"
        meta = {"teacher": teacher_id, "resolution": resolution, "steps": spec.teacher_steps, "seed": spec.seed,
                "generation": [str(g) for g in generation_key]}
        return load_or_generate(root / key[:16], key, prompts, generate, meta)
    if kind == "cache":
        ds = CachedDataset(Path(spec.source))
        if "hidden" not in ds.text_keys:
            raise DataError(
                f"embedding cache '{spec.source}' has text keys {ds.text_keys}, not the 'hidden' (and 'pooled') it needs; "
                "rebuild it with data.latent_cache=true and data.source=<the image data>"
            )
        return ds
    captions = {"max_caption_tokens": max_caption_tokens, **({"count_tokens": count_tokens} if count_tokens else {})}
    if kind == "digits":
        raw: Any = DigitsDataset("train", resolution)
    elif kind == "shards":
        # An empty, non-tar or sample-less shard is named here, before any advice about the cache.
        check_shards(expand_shards(spec.source))
        if spec.streaming:
            return ShardStream(spec.source, resolution=resolution, shuffle_buffer=spec.shuffle_buffer, **captions)
        # the cache holds the samples in shard order (index i = the i-th sample a stream reads without shuffling);
        # the trainer's sampler shuffles
        raw = ImageCaptionShards(spec.source, resolution=resolution, rank=0, world_size=1, split="shard", **captions)
    else:
        raw = ImageCaptionFolder(Path(spec.source), resolution=resolution, **captions)
    if spec.latent_cache:
        if teacher is None:
            raise ConfigError("data.latent_cache=true needs a method with a teacher to encode the data")
        return build_latent_cache(spec, raw, teacher, teacher_id, resolution)
    if isinstance(raw, torch.utils.data.IterableDataset):
        raise DataError(
            f"data.source '{spec.source}' is webdataset shards, which train as a stream or from a cache: set "
            "data.streaming=true to encode each batch in the training step (no pass over the data first), or "
            "data.latent_cache=true to encode the shards once into a cache"
        )
    return raw
