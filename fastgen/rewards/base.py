"""The reward-model interface and the rewards every world has: the digits reward and weighted sums.

A :class:`RewardModel` maps images in [0,1] ``[N,3,H,W]`` and one prompt per image to one reward
per image, differentiable with respect to the images (trainers backpropagate through it); text
features are computed without gradients and cached per prompt string.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.errors import ConfigError, DataError


class RewardModel(nn.Module):
    """Base class: ``forward(images, prompts) -> rewards[N]``; frozen parameters, eval mode."""

    name: str = "reward"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def preference_scale(self) -> float:
        """Multiplier turning rewards into Bradley-Terry logits (e.g. CLIP's ``logit_scale.exp()``)."""
        return 1.0

    def describe(self) -> dict:
        return {"reward": self.name}

    @staticmethod
    def check_inputs(images: torch.Tensor, prompts: list[str]) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"reward models take images [N,3,H,W] in [0,1], got shape {tuple(images.shape)}")
        if len(prompts) < len(images):
            raise DataError(f"{len(prompts)} prompts for {len(images)} images: a reward needs one prompt per image")
        if len(prompts) > len(images):
            raise DataError(f"{len(prompts)} prompts for {len(images)} images: pass exactly one prompt per image")

    def freeze(self) -> "RewardModel":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "RewardModel":  # reward models never leave eval mode
        return super().train(False)


_DIGIT_RE = None


def parse_digits_prompt(prompt: str) -> tuple[int, int]:
    """(digit, colour) named by a digits-world caption in any of its templates."""
    global _DIGIT_RE
    from fastgen.data.digits import COLOUR_NAMES, DIGIT_NAMES

    if _DIGIT_RE is None:
        _DIGIT_RE = (re.compile(r"\b(" + "|".join(DIGIT_NAMES) + r")\b"), re.compile(r"\b(" + "|".join(COLOUR_NAMES) + r")\b"))
    d, c = _DIGIT_RE[0].search(prompt.lower()), _DIGIT_RE[1].search(prompt.lower())
    if not d or not c:
        raise DataError(f"prompt {prompt!r} names no digit ({'/'.join(DIGIT_NAMES)}) and colour "
                        f"({'/'.join(COLOUR_NAMES)}); the digits reward only scores digits-world captions")
    return DIGIT_NAMES.index(d.group(1)), COLOUR_NAMES.index(c.group(1))


class DigitsReward(RewardModel):
    """The digits classifier's log-probability of the prompted digit plus that of the prompted colour.

    The expert reward of the digits world: 0 is the best possible value; the classifier area-resizes
    its input to 32 px itself, so any resolution works.
    """

    name = "digits"

    def __init__(self, classifier: nn.Module | None = None, digit_weight: float = 1.0, colour_weight: float = 1.0):
        super().__init__()
        if classifier is None:
            from fastgen.zoo import paths

            classifier = paths.load_classifier()
        self.classifier = classifier
        self.digit_weight, self.colour_weight = digit_weight, colour_weight
        self.freeze()

    def labels(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [parse_digits_prompt(p) for p in prompts]
        return (torch.tensor([d for d, _ in pairs], device=device), torch.tensor([c for _, c in pairs], device=device))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        digits, colours = self.labels(prompts, images.device)
        d_logits, c_logits, _ = self.classifier(images.float())
        ld = F.log_softmax(d_logits.float(), -1).gather(1, digits[:, None])[:, 0]
        lc = F.log_softmax(c_logits.float(), -1).gather(1, colours[:, None])[:, 0]
        return self.digit_weight * ld + self.colour_weight * lc

    def describe(self) -> dict:
        return {"reward": self.name, "definition": "log p(digit | image) + log p(colour | image) under the digits classifier",
                "digit_weight": self.digit_weight, "colour_weight": self.colour_weight}


class WeightedReward(RewardModel):
    """``sum_i w_i * r_i(images, prompts)`` (e.g. HPSv2.1 + 0.1 ImageReward)."""

    name = "weighted"

    def __init__(self, rewards: dict[str, RewardModel], weights: dict[str, float]):
        super().__init__()
        if set(rewards) != set(weights):
            raise ConfigError(f"weighted reward: weights for {sorted(weights)} but rewards {sorted(rewards)}")
        if not rewards:
            raise ConfigError("weighted reward needs at least one reward model")
        self.rewards = nn.ModuleDict(rewards)
        self.weights = dict(weights)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        return sum(self.weights[k] * r(images, prompts) for k, r in self.rewards.items())

    def describe(self) -> dict:
        return {"reward": self.name, "terms": {k: {"weight": self.weights[k], **r.describe()} for k, r in self.rewards.items()}}


#: name -> factory(**options) -> RewardModel; other modules register theirs (hpsv2, pickscore, ...).
REWARDS: dict[str, Callable[..., RewardModel]] = {"digits": DigitsReward}


def register_reward(name: str, factory: Callable[..., RewardModel]) -> None:
    REWARDS[name] = factory


def load_reward(spec: str | dict) -> RewardModel:
    """A reward model from a name (``"digits"``) or a dict ``{"name": ..., **options}``; a dict with
    ``"weighted": {name: {"weight": w, **options}}`` builds a :class:`WeightedReward`."""
    from fastgen import rewards as _pkg  # noqa: F401 - registers the built-in rewards

    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    if "weighted" in spec:
        parts = {k: dict(v) for k, v in spec["weighted"].items()}
        weights = {k: float(v.pop("weight", 1.0)) for k, v in parts.items()}
        return WeightedReward({k: load_reward({"name": v.pop("name", k), **v}) for k, v in parts.items()}, weights)
    name = spec.pop("name", None)
    if name not in REWARDS:
        raise ConfigError(f"unknown reward model {name!r}; available: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**spec).freeze()
