"""Digits-world metrics: digit/colour accuracy and the digits-FID (Frechet distance of the
digits classifier's penultimate features)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round images in [0,1] to 8-bit levels, as writing them to PNG would."""
    return (images.clamp(0, 1) * 255).round() / 255


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclass
class DigitsScores:
    digit_accuracy: float
    colour_accuracy: float
    digits_fid: float
    samples: int

    def as_dict(self) -> dict:
        return {
            "digit_accuracy": round(self.digit_accuracy, 4),
            "colour_accuracy": round(self.colour_accuracy, 4),
            "digits_fid": round(self.digits_fid, 3),
            "samples": self.samples,
        }


class DigitsEvaluator:
    """Scores generated digits images against the held-out reference set of the digits world.

    The digits-FID goes through :class:`fastgen.evaluation.fid.FID` with the classifier's 64-d
    penultimate features as backend: images are quantised to 8 bits, box-resized to 32 px (a no-op
    for both shipped teachers, which draw 32 px images; larger images are area-reduced), and the reference statistics
    of the held-out split are cached like any other FID reference.
    """

    RESOLUTION = 32

    def __init__(self, classifier, batch_size: int = 500, cache_dir=None, use_cache: bool = True):
        from fastgen.evaluation.fid import FID, DigitsReference, Preprocess, digits_backend

        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.fid = FID(digits_backend(self.classifier), Preprocess(self.RESOLUTION, "box"), cache_dir=cache_dir,
                       batch_size=batch_size, use_cache=use_cache)
        self.fid.set_reference(DigitsReference("test", self.RESOLUTION))
        self._floor: float | None = None

    @torch.no_grad()
    def _run(self, images: torch.Tensor):
        outs = [self.classifier(images[i : i + self.batch_size].float()) for i in range(0, len(images), self.batch_size)]
        return [torch.cat([o[k] for o in outs]) for k in range(3)]

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self._run(images)[2].numpy()

    def fid_to_reference(self, images: torch.Tensor) -> float:
        return self.fid.score(images)

    def real_floor(self) -> float:
        """FID of the training split's images against the held-out reference: the best a model can expect."""
        if self._floor is None:
            from fastgen.data.digits import DigitsDataset

            train, _, _ = DigitsDataset("train").all_pixels(self.RESOLUTION)
            self._floor = self.fid_to_reference(train)
        return self._floor

    def describe(self) -> dict:
        return {**self.fid.describe(), "feature_extractor": "digits classifier penultimate features (64-d)",
                "accuracy": "argmax of the classifier heads vs the prompted digit / colour",
                "real_vs_real_fid_floor": round(self.real_floor(), 3)}

    def score(self, images: torch.Tensor, digits: torch.Tensor, colours: torch.Tensor) -> DigitsScores:
        """``images`` in [0,1] with the prompted digits and colours (quantised + resized like the FID input)."""
        prepped = self.fid.preprocess(images).float() / 255.0
        d_logits, c_logits, _ = self._run(prepped)
        return DigitsScores(
            digit_accuracy=float((d_logits.argmax(1) == digits).float().mean()),
            colour_accuracy=float((c_logits.argmax(1) == colours).float().mean()),
            digits_fid=self.fid.score(images),
            samples=len(images),
        )


def cached_digits_evaluator(owner) -> tuple["DigitsEvaluator", float] | None:
    """``(evaluator, real-vs-real floor)`` built once per ``owner`` (a trainer's method) and kept on it;
    ``None`` when the shipped digits classifier is not available."""
    cached = getattr(owner, "_digits_eval", None)
    if cached is None:
        from fastgen.errors import ModelLoadError
        from fastgen.zoo import paths

        try:
            classifier = paths.load_classifier()
        except ModelLoadError:
            return None
        evaluator = DigitsEvaluator(classifier)
        cached = (evaluator, evaluator.real_floor())
        object.__setattr__(owner, "_digits_eval", cached)
    return cached
