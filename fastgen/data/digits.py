"""The digits world: a tiny, real text-to-image world built from scikit-learn's digits.

Each of sklearn's 1,797 handwritten 8x8 digits is upsampled and tinted with a colour from a
small palette on a dark background, and captioned ("a red handwritten digit seven"). A fixed
split *by source digit* keeps 20% of the source images out of every training set; those
images (in every colour) are the reference set of the digits-FID.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: (name, RGB in 0..255); the background is BACKGROUND.
PALETTE = (
    ("red", (235, 52, 52)),
    ("green", (60, 205, 70)),
    ("blue", (60, 110, 255)),
    ("yellow", (240, 220, 40)),
    ("cyan", (40, 215, 225)),
    ("magenta", (225, 60, 225)),
)
COLOUR_NAMES = tuple(name for name, _ in PALETTE)
BACKGROUND = (12, 12, 24)

#: Caption templates used for training; evaluation uses the first (canonical) one.
TEMPLATES = (
    "a {colour} handwritten digit {digit}",
    "the digit {digit} written in {colour}",
    "a handwritten {digit} in {colour}",
    "{colour} digit {digit}",
)

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 1234


def caption(digit: int, colour: int, template: int = 0) -> str:
    """The caption of a (digit, colour) pair; template 0 is the canonical evaluation prompt."""
    return TEMPLATES[template].format(colour=COLOUR_NAMES[colour], digit=DIGIT_NAMES[digit])


def labelled_captions() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every caption with its digit and colour labels, ordered by template, then digit, then colour
    (what the digits world's text encoders are trained to read)."""
    labels = [(d, c, t) for t in range(len(TEMPLATES)) for d in range(10) for c in range(len(PALETTE))]
    return ([caption(*lab) for lab in labels], torch.tensor([lab[0] for lab in labels]),
            torch.tensor([lab[1] for lab in labels]))


def all_captions() -> list[str]:
    """Every caption the world can produce (for tokenizer training)."""
    return [caption(d, c, t) for t in range(len(TEMPLATES)) for d in range(10) for c in range(len(PALETTE))]


@lru_cache(maxsize=1)
def _source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # [N, 8, 8] in [0, 1]
    return images, data.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Source-image indices of the fixed ``"train"`` or ``"test"`` split."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")
    images, _ = _source()
    n = len(images)
    if split == "all":
        return np.arange(n)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(HELD_OUT_FRACTION * n))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(idx)


def render(intensity: torch.Tensor, colour: torch.Tensor | int, resolution: int = 32) -> torch.Tensor:
    """Tint 8x8 intensities ``[B, 8, 8]`` in [0,1] with palette colours; returns ``[B, 3, R, R]`` in [0,1]."""
    if isinstance(colour, int):
        colour = torch.full((intensity.shape[0],), colour, dtype=torch.long)
    mask = F.interpolate(intensity[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)
    mask = mask.clamp(0, 1)
    rgb = torch.tensor([c for _, c in PALETTE], dtype=torch.float32)[colour] / 255.0  # [B, 3]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32) / 255.0
    return bg[None, :, None, None] * (1 - mask) + rgb[:, :, None, None] * mask


@dataclass
class DigitsBatch:
    pixels: torch.Tensor  # [B, 3, R, R] in [-1, 1]
    digits: torch.Tensor
    colours: torch.Tensor
    captions: list[str]


class DigitsDataset(Dataset):
    """Every (source digit, colour) pair of a split, rendered at ``resolution``.

    Items are dicts ``{"pixels" in [-1,1], "caption", "digit", "colour", "index"}``; the caption
    template is a fixed function of the index (canonical only when ``canonical=True``).
    """

    def __init__(self, split: str = "train", resolution: int = 32, canonical: bool = False):
        images, targets = _source()
        self.indices = split_indices(split)
        self.intensity = torch.from_numpy(images[self.indices])
        self.targets = torch.from_numpy(targets[self.indices])
        self.resolution = resolution
        self.canonical = canonical
        self.split = split

    def __len__(self) -> int:
        return len(self.indices) * len(PALETTE)

    def _decompose(self, index: int) -> tuple[int, int, int]:
        src, colour = divmod(index, len(PALETTE))
        template = 0 if self.canonical else (index * 7919 + src) % len(TEMPLATES)
        return src, colour, template

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        src, colour, template = self._decompose(index)
        pixels = render(self.intensity[src : src + 1], colour, self.resolution)[0]
        digit = int(self.targets[src])
        return {
            "pixels": pixels * 2 - 1,
            "caption": caption(digit, colour, template),
            "digit": digit,
            "colour": colour,
            "index": index,
        }

    def all_pixels(self, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All images at once: ``(pixels in [0,1], digits, colours)`` in item order."""
        res = resolution or self.resolution
        n_col = len(PALETTE)
        intensity = self.intensity.repeat_interleave(n_col, dim=0)
        colours = torch.arange(n_col).repeat(len(self.indices))
        digits = self.targets.repeat_interleave(n_col)
        return render(intensity, colours, res), digits, colours

    def captions(self) -> list[str]:
        return [caption(*self._labels(i)) for i in range(len(self))]

    def _labels(self, index: int) -> tuple[int, int, int]:
        src, colour, template = self._decompose(index)
        return int(self.targets[src]), colour, template


def eval_prompts(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``n`` canonical prompts, balanced over the 60 (digit, colour) pairs, in a seeded order."""
    pairs = [(d, c) for d in range(10) for c in range(len(PALETTE))]
    reps = -(-n // len(pairs))
    order = (pairs * reps)[:n]
    perm = np.random.default_rng(seed).permutation(n)
    order = [order[i] for i in perm]
    digits = torch.tensor([d for d, _ in order])
    colours = torch.tensor([c for _, c in order])
    return [caption(d, c) for d, c in order], digits, colours


def balanced_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` training captions balanced over the 60 (digit, colour) pairs, random templates, seeded order
    (the prompts of data-free methods and of teacher-generated data on the digits world)."""
    pairs = [(d, c) for d in range(10) for c in range(len(PALETTE))]
    reps = -(-n // len(pairs))
    rng = np.random.default_rng(seed)
    order = [pairs[i] for i in rng.permutation(len(pairs) * reps) % len(pairs)][:n]
    templates = rng.integers(0, len(TEMPLATES), size=n)
    return [caption(d, c, int(t)) for (d, c), t in zip(order, templates)]
