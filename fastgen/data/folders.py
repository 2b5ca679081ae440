"""Image + caption datasets read from a plain folder.

Two layouts are accepted (see :class:`ImageCaptionFolder`):

* **pairs**: ``cat.png`` next to ``cat.txt`` (png/jpg/jpeg/webp, searched recursively),
* **metadata**: a ``metadata.jsonl`` file at the root, one JSON object per line with
  ``file_name`` (relative to the root) and ``text`` (or ``caption``/``prompt``).

Captions (``.txt`` files and ``metadata.jsonl``) are read as UTF-8 (a leading byte-order
mark is dropped); a file that is not valid UTF-8 raises :class:`DataError` naming it.

The image helpers here (:func:`decode_image`, :func:`image_to_rgb`, :func:`resize_center_crop`,
:func:`image_to_tensor`) are shared with :mod:`fastgen.data.shards`. Every PIL image mode is
turned into 8-bit RGB by these rules:

* 16-bit greyscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and ``I`` (32-bit integers,
  which PIL uses for 16-bit data) -> ``round(value / 257)`` (= ``value * 255 / 65535``),
  clipped to 0..255;
* ``F`` (32-bit float) -> ``round(value * 255)`` when every finite value lies in [0, 1],
  else the values are read on the 0..255 scale (PIL's own convention); NaN -> 0;
* transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, and ``P``/``L``/
  ``RGB``/16-bit images with a ``transparency`` entry, e.g. a PNG ``tRNS`` chunk) is
  composited over :data:`ALPHA_BACKGROUND` (white):
  ``round(color * a / 255 + 255 * (1 - a / 255))``;
* everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through PIL's
  ``convert("RGB")`` (for ``CMYK``: ``R = (255 - C) * (255 - K) / 255``, likewise G and B).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from fastgen.errors import DataError

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_EXTENSIONS",
    "CAPTION_FIELDS",
    "ImageCaptionFolder",
    "VerifyReport",
    "check_valid_fraction",
    "decode_image",
    "decode_utf8",
    "image_to_rgb",
    "image_to_tensor",
    "normalize_resolution",
    "read_utf8",
    "resize_center_crop",
    "warn_long_captions",
    "whitespace_tokens",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_FIELDS: tuple[str, ...] = ("text", "caption", "prompt")
METADATA_FILE = "metadata.jsonl"
#: Transparent pixels are composited over this colour (white) when decoding.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
_INT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

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


def _has_alpha(img: Image.Image) -> bool:
    flag = getattr(img, "has_transparency_data", None)  # Pillow >= 10.1
    if flag is not None:
        return bool(flag)
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info  # pragma: no cover


def _composite(rgb: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    """``rgb`` ``[H, W, 3]`` and ``alpha`` ``[H, W]`` (both 0..255) -> RGB over the background."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if alpha is not None:
        a = np.asarray(alpha, dtype=np.float32)[..., None] / np.float32(255.0)
        rgb = rgb * a + np.asarray(ALPHA_BACKGROUND, dtype=np.float32) * (np.float32(1.0) - a)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _grey_levels(img: Image.Image) -> np.ndarray:
    """8-bit grey levels (float, 0..255) of a 16-bit, 32-bit integer or float image."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        finite = values[np.isfinite(values)]
        unit = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
        values = np.where(np.isnan(values), 0.0, values)
        levels = values * 255.0 if unit else values
    else:
        levels = values / 257.0  # 65535 -> 255
    return np.clip(np.rint(levels), 0.0, 255.0)


def image_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> an 8-bit ``RGB`` image, by the rules in the module docstring.

    An ``RGB`` image without transparency is returned as is (not copied).
    """
    mode = img.mode
    if mode in _INT_GREY_MODES or mode == "F":
        grey = _grey_levels(img)
        alpha = None
        transparent = img.info.get("transparency")
        if mode != "F" and isinstance(transparent, int):
            alpha = np.where(np.asarray(img) == transparent, 0.0, 255.0)
        return _composite(np.repeat(grey[..., None], 3, axis=2), alpha)
    if _has_alpha(img):
        rgba = np.asarray(img.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3])
    if mode == "RGB":
        return img
    return img.convert("RGB")


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Fully decode an image (from bytes or a path) into 8-bit RGB (see :func:`image_to_rgb`).

    The whole image is decoded here, so truncated or corrupt files raise immediately
    (any exception means "unreadable") rather than later during training.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        src: Any = io.BytesIO(bytes(data))
    else:
        src = str(data)
    with Image.open(src) as img:
        img.load()
        rgb = image_to_rgb(img)
        return rgb.copy() if rgb is img else rgb


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
    """PIL image (any mode, see :func:`image_to_rgb`) -> float32 tensor ``[3, H, W]`` in ``[-1, 1]``."""
    arr = np.asarray(image_to_rgb(img), dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return tensor.div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------- caption helpers


def decode_utf8(data: bytes, where: str) -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped).

    Raises:
        DataError: naming ``where`` and the offending byte, with the fix (save as UTF-8).
    """
    try:
        return bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = bytes(data)[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{where} is not valid UTF-8 (byte 0x{bytes(data)[exc.start]:02x} at offset {exc.start}, line {line}); "
            "save it as UTF-8 (choose UTF-8 when saving in an editor, or convert it with "
            "`iconv -f <its encoding> -t utf-8`)"
        ) from None


def read_utf8(path: str | Path) -> str:
    """The text of ``path`` read as UTF-8; :class:`DataError` naming the file if it is not UTF-8."""
    return decode_utf8(Path(path).read_bytes(), f"'{path}'")


def whitespace_tokens(caption: str) -> int:
    """Default caption length: the number of whitespace-separated words."""
    return len(caption.split())


def _caption_limit(max_caption_tokens: int | None) -> int | None:
    if max_caption_tokens is None:
        return None
    if isinstance(max_caption_tokens, bool) or not isinstance(max_caption_tokens, int) or max_caption_tokens < 1:
        raise DataError(
            f"max_caption_tokens must be a positive int or None, got {max_caption_tokens!r}; "
            "pass the text encoder's limit, e.g. 77"
        )
    return max_caption_tokens


def warn_long_captions(where: str, num_long: int, num_total: int, limit: int, count_tokens: Callable[[str], int]) -> None:
    """Log the one warning about captions longer than ``limit`` tokens."""
    how = "as whitespace-separated words" if count_tokens is whitespace_tokens else "with the given count_tokens"
    logger.warning(
        "%s: %d of %d captions are longer than %d tokens (counted %s); the text encoder keeps only "
        "the first %d tokens, so the rest of those captions is lost in training. Shorten them if that matters",
        where, num_long, num_total, limit, how, limit,
    )


def set_sample_options(source, resolution, center_crop: bool, random_flip: bool, min_valid_fraction: float,
                       caption_dropout: float) -> None:
    """Check and set an image-caption source's shared options on ``source``: ``size`` (from ``resolution``),
    ``center_crop``, ``random_flip``, ``min_valid_fraction`` and ``caption_dropout`` (both in [0, 1])."""
    if not 0.0 <= min_valid_fraction <= 1.0:
        raise DataError(f"min_valid_fraction must be in [0, 1], got {min_valid_fraction}; pass e.g. 0.9")
    if not 0.0 <= caption_dropout <= 1.0:
        raise DataError(f"caption_dropout must be in [0, 1], got {caption_dropout}; pass e.g. 0.1")
    source.size = normalize_resolution(resolution)
    source.center_crop = bool(center_crop)
    source.random_flip = bool(random_flip)
    source.min_valid_fraction = float(min_valid_fraction)
    source.caption_dropout = float(caption_dropout)


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
        max_caption_tokens: when set, captions longer than this many tokens are counted in
            :attr:`num_long_captions` and one warning names how many (the text encoder would
            cut them off); ``None`` (default) counts nothing.
        count_tokens: how a caption's tokens are counted, e.g. a tokenizer's
            ``lambda s: len(tok(s).input_ids)``; default :func:`whitespace_tokens`.

    Captions are read as UTF-8; a caption file (or ``metadata.jsonl``) that is not valid
    UTF-8 raises :class:`DataError` naming it.

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
        *,
        max_caption_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        self.root = Path(root)
        set_sample_options(self, resolution, center_crop, random_flip, min_valid_fraction, caption_dropout)
        self.files: list[Path] = []
        self.captions: list[str] = []
        self.layout: str = ""
        self.num_uncaptioned = 0
        self.num_bad = 0
        self.bad_files: list[str] = []
        self._bad_indices: set[int] = set()
        self.max_caption_tokens = _caption_limit(max_caption_tokens)
        self.count_tokens: Callable[[str], int] = count_tokens or whitespace_tokens
        self.num_long_captions = 0
        self._scan()
        if self.max_caption_tokens is not None:
            limit = self.max_caption_tokens
            self.num_long_captions = sum(1 for c in self.captions if self.count_tokens(c) > limit)
            if self.num_long_captions:
                warn_long_captions(f"'{self.root}'", self.num_long_captions, len(self.captions), limit, self.count_tokens)

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
            self.captions.append(read_utf8(txt).strip())
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
        text = read_utf8(meta)
        with io.StringIO(text, newline=None) as fh:
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
                decode_image(path)
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
