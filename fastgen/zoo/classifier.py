"""The digits classifier: digit and colour heads over a small CNN.

Its penultimate features (64-d) are the digits-FID features and its log-probabilities of the
prompted digit and colour are the digits reward. Saved and loaded like any diffusers model
(``save_pretrained`` / ``from_pretrained``: ``config.json`` + safetensors).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Images in [0,1] ``[B,3,H,W]`` (any size; resized to ``input_size``) -> digit and colour logits."""

    @register_to_config
    def __init__(self, num_digits: int = 10, num_colours: int = 6, width: int = 32, feature_dim: int = 64, input_size: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * w, feature_dim), nn.SiLU(),
        )
        self.digit_head = nn.Linear(feature_dim, num_digits)
        self.colour_head = nn.Linear(feature_dim, num_colours)

    @property
    def num_features(self) -> int:
        return self.config.feature_dim

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="area" if images.shape[-1] > size else "bilinear")
        return (images - 0.5) / 0.5

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self._prepare(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(digit_logits, colour_logits, features)``."""
        feats = self.features(images)
        return self.digit_head(feats), self.colour_head(feats), feats
