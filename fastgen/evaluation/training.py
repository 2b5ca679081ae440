"""The evaluation run during training: a few hundred student samples scored every ``train.eval_every`` steps.

The trainer calls ``evaluator(method, step)`` on the main process, already in eval mode, without
gradients and with its RNG streams saved and restored around the call. What to evaluate is the
method's to say, through ``method.evaluation_plan()``::

    None                      # no evaluation
    {"world": "digits",       # the only world scored here (other worlds: {} and a one-time warning)
     "samples": 500,          # canonical digits prompts, fastgen.data.digits.eval_prompts(samples, seed=0)
     "steps": 4,              # sampling steps passed to method.sample
     "seed": 0,               # chunk starting at prompt i is sampled with Generator(device).manual_seed(seed + i)
     "batch_size": 250}       # optional, default 250

The seeding rule is the benchmark's (:func:`fastgen.evaluation.bench.sample_pipeline`), so an evaluation
during training and ``fastgen bench`` on the export draw the same noise seeds per prompt chunk.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_BATCH_SIZE", "TrainingEvaluator", "method_device"]

DEFAULT_BATCH_SIZE = 250
RESOLUTION = 32  # the digits classifier's input size
_REQUIRED = ("samples", "steps", "seed")


def method_device(method: Any) -> torch.device:
    """The device of ``method``'s first parameter (CPU for a method without parameters)."""
    try:
        return next(iter(method.parameters())).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


class TrainingEvaluator:
    """Scores a method's samples during training: digit / colour accuracy and digits-FID (the shipped
    digits classifier; :func:`fastgen.evaluation.digits_metrics.cached_digits_evaluator`), plus the
    real-vs-real floor ``digits_fid_floor`` and ``eval_steps``. ``{}`` when the method's plan is
    ``None``, names another world, or the classifier is not available.

    The classifier, the reference statistics and the floor are built on the first call and kept on
    this object, so one evaluator serves a whole run.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    @torch.no_grad()
    def __call__(self, method: Any, step: int) -> dict[str, float]:
        plan = method.evaluation_plan()
        if plan is None:
            return {}
        world = plan.get("world")
        if world != "digits":
            self._warn_once(f"world:{world}", f"in-training evaluation of world {world!r} is not supported (only "
                                              f"'digits'); method {getattr(method, 'name', type(method).__name__)!r} "
                                              "is trained without evaluation rows")
            return {}
        missing = [k for k in _REQUIRED if k not in plan]
        if missing:
            raise ValueError(f"evaluation_plan() of {type(method).__name__} lacks {', '.join(missing)}; a digits plan "
                             "needs samples, steps and seed (batch_size optional)")
        samples, steps, seed = int(plan["samples"]), int(plan["steps"]), int(plan["seed"])
        batch_size = int(plan.get("batch_size", DEFAULT_BATCH_SIZE))
        if samples <= 0:
            return {}
        if batch_size < 1:
            raise ValueError(f"evaluation_plan() of {type(method).__name__}: batch_size must be >= 1, got {batch_size}")

        from fastgen.data.digits import eval_prompts
        from fastgen.evaluation.digits_metrics import cached_digits_evaluator

        cached = cached_digits_evaluator(self)
        if cached is None:
            self._warn_once("classifier", "the shipped digits classifier is not available; in-training evaluation "
                                          "is skipped (build it with `fastgen zoo build`)")
            return {}
        evaluator, floor = cached
        prompts, digits, colours = eval_prompts(samples, seed=0)
        device = method_device(method)
        chunks = []
        for i in range(0, len(prompts), batch_size):
            generator = torch.Generator(device=device).manual_seed(seed + i)
            chunks.append(method.sample(prompts[i : i + batch_size], steps, generator).float().cpu())
        images = torch.cat(chunks)
        if tuple(images.shape[-2:]) != (RESOLUTION, RESOLUTION):
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        scores = evaluator.score(images, digits, colours).as_dict()
        scores["digits_fid_floor"] = round(float(floor), 3)
        scores["eval_steps"] = steps
        return scores
