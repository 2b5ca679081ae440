"""Image + caption datasets read from a plain folder.

Two layouts are accepted (see :class:`ImageCaptionFolder`):

* **pairs**: ``cat.png`` next to ``cat.txt`` (png/jpg/jpeg/webp, searched recursively),
* **metadata**: a ``metadata.jsonl`` file at the root, one JSON object per line with
  ``file_name`` (relative to the root) and ``text`` (or ``caption``/``prompt``).

The image helpers here (:func:`decode_image`, :func:`resize_center_crop`,
:func:`image_to_tensor`) are shared with :mod:`fastgen.data.shards`.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from fastgen.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CAPTION_FIELDS",
    "ImageCaptionFolder",
    "VerifyReport",
    "check_valid_fraction",
    "decode_image",
    "image_to_tensor",
    "normalize_resolution",
    "resize_center_crop",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_FIELDS: tuple[str, ...] = ("text", "caption", "prompt")
METADATA_FILE = "metadata.jsonl"

_LAYOUTS = (
    "(a) image files (png/jpg/jpeg/webp) each with a same-name .txt caption, e.g. cat.png + cat.txt, "
    f"or (b) a {METADATA_FILE} file with one {{\"file_name\": ..., \"text\": ...}} object per line"
)


# --------------------------------------------------------------------------- image helpers


def normalize_resolution(resolution: int | Sequence[int]) -> tuple[int, int]:
    """Return ``(height, width)`` from an int or a 2-sequence; both must be positive."""
    if isinstance(resolution, bool):
        raise DataError(f"resolution must be an int or (height, width), got {resolution!r}; pass e.g. 512")
    if isinstance(resolution, int):
        h = w = resolution
    else:
        try:
            h, w = (int(v) for v in resolution)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"resolution must be an int or (height, width), got {resolution!r}; pass e.g. 512 or (512, 768)"
            ) from exc
    if h <= 0 or w <= 0:
        raise DataError(f"resolution must be positive, got {resolution!r}; pass e.g. 512")
    return h, w


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Fully decode an image (from bytes or a path) into RGB.

    The whole image is decoded here, so truncated or corrupt files raise immediately
    (any exception means "unreadable") rather than later during training.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        src: Any = io.BytesIO(bytes(data))
    else:
        src = str(data)
    with Image.open(src) as img:
        img.load()
        if img.mode == "RGB":
            return img.copy()
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            # Composite transparent images over white instead of black.
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def resize_center_crop(
    img: Image.Image,
    size: tuple[int, int],
    center_crop: bool = True,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """Resize (bicubic) so the image covers ``size=(h, w)``, then crop to exactly ``size``.

    For a square target this resizes the shorter side to the target. The crop is centred
    when ``center_crop`` is true, otherwise its offset is drawn at random.
    """
    th, tw = size
    w, h = img.size
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample=Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        left = int(torch.randint(0, nw - tw + 1, (1,), generator=generator))
        top = int(torch.randint(0, nh - th + 1, (1,), generator=generator))
    if (left, top, nw, nh) != (0, 0, tw, th):
        img = img.crop((left, top, left + tw, top + th))
    return img


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor ``[3, H, W]`` scaled to ``[-1, 1]``."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return tensor.div_(127.5).sub_(1.0)


def check_valid_fraction(
    num_bad: int, num_total: int, min_valid_fraction: float, bad_files: Sequence[str], what: str
) -> None:
    """Raise :class:`DataError` when ``(total - bad) / total`` fell below the floor."""
    if num_total <= 0 or num_bad <= 0:
        return
    valid = (num_total - num_bad) / num_total
    if valid < min_valid_fraction:
        shown = ", ".join(str(f) for f in list(bad_files)[:5])
        more = f" (and {len(bad_files) - 5} more)" if len(bad_files) > 5 else ""
        raise DataError(
            f"{num_bad} of {num_total} items in {what} could not be read "
            f"(valid fraction {valid:.2f} < min_valid_fraction={min_valid_fraction}); "
            f"bad files: {shown}{more}. Repair or remove them, or lower min_valid_fraction "
            "if losing them is acceptable"
        )


# --------------------------------------------------------------------------- dataset


@dataclass
class VerifyReport:
    """Result of :meth:`ImageCaptionFolder.verify`."""

    total: int
    ok: int
    bad: int
    bad_files: list[str] = field(default_factory=list)

    @property
    def valid_fraction(self) -> float:
        """Share of readable images (1.0 for an empty report)."""
        return self.ok / self.total if self.total else 1.0


def _caption_from_record(record: dict[str, Any]) -> str | None:
    for key in CAPTION_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            return value
    return None


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Map-style dataset of ``{"pixels", "caption", "index"}`` items read from a folder.

    Args:
        root: the folder (see the module docstring for the two accepted layouts).
        resolution: output size, an int (square) or ``(height, width)``.
        center_crop: centre crop after resizing (else a random crop).
        random_flip: flip horizontally with probability 0.5.
        min_valid_fraction: when the share of readable images seen so far falls below this,
            :class:`DataError` is raised instead of silently training on a broken set.
        caption_dropout: probability of replacing the caption by ``""`` (for CFG training).

    Items are ``{"pixels": float32 [3, H, W] in [-1, 1], "caption": str, "index": int}``.
    A corrupt or unreadable image never ends an epoch: it is logged once, recorded in
    :attr:`num_bad` / :attr:`bad_files`, and the next readable item (by index, wrapping
    around) is returned in its place, with that item's ``index``. With DataLoader workers
    each worker keeps its own counts.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int | tuple[int, int] = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        min_valid_fraction: float = 0.9,
        caption_dropout: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.size = normalize_resolution(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        if not 0.0 <= min_valid_fraction <= 1.0:
            raise DataError(f"min_valid_fraction must be in [0, 1], got {min_valid_fraction}; pass e.g. 0.9")
        if not 0.0 <= caption_dropout <= 1.0:
            raise DataError(f"caption_dropout must be in [0, 1], got {caption_dropout}; pass e.g. 0.1")
        self.min_valid_fraction = float(min_valid_fraction)
        self.caption_dropout = float(caption_dropout)
        self.files: list[Path] = []
        self.captions: list[str] = []
        self.layout: str = ""
        self.num_uncaptioned = 0
        self.num_bad = 0
        self.bad_files: list[str] = []
        self._bad_indices: set[int] = set()
        self._scan()

    # ------------------------------------------------------------------ discovery

    def _scan(self) -> None:
        if not self.root.exists():
            raise DataError(f"data folder '{self.root}' does not exist; check the path. Accepted layouts: {_LAYOUTS}")
        if not self.root.is_dir():
            raise DataError(f"data path '{self.root}' is not a folder; pass a folder holding {_LAYOUTS}")
        meta = self.root / METADATA_FILE
        if meta.is_file():
            self.layout = "metadata"
            self._scan_metadata(meta)
        else:
            self.layout = "pairs"
            self._scan_pairs()
        if not self.files:
            raise DataError(
                f"data folder '{self.root}' holds no usable image/caption pairs; lay it out as {_LAYOUTS}"
            )

    def _scan_pairs(self) -> None:
        images = sorted(
            p for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        missing: list[Path] = []
        for path in images:
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                missing.append(path)
                continue
            self.files.append(path)
            self.captions.append(txt.read_text(encoding="utf-8", errors="replace").strip())
        self.num_uncaptioned = len(missing)
        if images and not self.files:
            raise DataError(
                f"data folder '{self.root}' has {len(images)} images but no captions; "
                f"add a same-name .txt next to each image (e.g. {missing[0].stem}.txt) or a {METADATA_FILE}. "
                f"Accepted layouts: {_LAYOUTS}"
            )
        if missing:
            logger.warning(
                "%s: skipping %d of %d images without a same-name .txt caption (first: %s)",
                self.root, len(missing), len(images), missing[0],
            )

    def _scan_metadata(self, meta: Path) -> None:
        with meta.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{meta}:{lineno} is not valid JSON ({exc.msg}); write one JSON object per line, "
                        'e.g. {"file_name": "cat.png", "text": "a cat"}'
                    ) from exc
                if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
                    raise DataError(
                        f"{meta}:{lineno} has no string 'file_name'; each line needs "
                        '{"file_name": "<image path relative to the folder>", "text": "<caption>"}'
                    )
                caption = _caption_from_record(record)
                if caption is None:
                    raise DataError(
                        f"{meta}:{lineno} has no caption; add a 'text' (or 'caption'/'prompt') string field"
                    )
                self.files.append(self.root / record["file_name"])
                self.captions.append(caption.strip())

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> torch.Tensor:
        img = decode_image(self.files[index])
        img = resize_center_crop(img, self.size, self.center_crop)
        if self.random_flip and bool(torch.rand(()) < 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(img)

    def _mark_bad(self, index: int, exc: BaseException) -> None:
        if index in self._bad_indices:
            return
        self._bad_indices.add(index)
        self.num_bad += 1
        self.bad_files.append(str(self.files[index]))
        logger.warning("unreadable image %s (%s: %s); using another item instead",
                       self.files[index], type(exc).__name__, exc)
        check_valid_fraction(
            self.num_bad, len(self.files), self.min_valid_fraction, self.bad_files, f"'{self.root}'"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad_indices:
                continue
            try:
                pixels = self._load(i)
            except Exception as exc:  # corrupt, truncated, missing, permission...
                self._mark_bad(i, exc)
                continue
            caption = self.captions[i]
            if self.caption_dropout > 0 and bool(torch.rand(()) < self.caption_dropout):
                caption = ""
            return {"pixels": pixels, "caption": caption, "index": i}
        raise DataError(
            f"none of the {n} images in '{self.root}' could be read (e.g. {self.bad_files[:3]}); "
            "check the files are valid png/jpg/webp images"
        )

    def verify(self) -> VerifyReport:
        """Decode every image once, record the unreadable ones and return a report.

        Unreadable images found here are skipped by later ``__getitem__`` calls. The floor
        is not enforced here; compare ``report.valid_fraction`` yourself.
        """
        bad: list[str] = []
        for i, path in enumerate(self.files):
            try:
                with Image.open(path) as img:
                    img.load()
            except Exception as exc:
                bad.append(str(path))
                if i not in self._bad_indices:
                    self._bad_indices.add(i)
                    self.num_bad += 1
                    self.bad_files.append(str(path))
                    logger.warning("unreadable image %s (%s: %s)", path, type(exc).__name__, exc)
        return VerifyReport(total=len(self.files), ok=len(self.files) - len(bad), bad=len(bad), bad_files=bad)

    def __repr__(self) -> str:
        h, w = self.size
        return f"ImageCaptionFolder(root='{self.root}', items={len(self)}, layout={self.layout}, size={h}x{w})"
