"""The in-training evaluation (fastgen.evaluation.training.TrainingEvaluator) on a duck-typed fake method."""

from __future__ import annotations

import pytest
import torch

from fastgen.data import digits as dw
from fastgen.evaluation.training import TrainingEvaluator

pytestmark = pytest.mark.usefixtures("one_thread")

SCORE_KEYS = {"digit_accuracy", "colour_accuracy", "digits_fid", "samples", "digits_fid_floor", "eval_steps"}


class FakeMethod:
    """Samples real held-out digits in the prompted colour (at ``resolution`` px), the source image and a
    little noise drawn from the generator; records every call's generator seed, chunk size and steps."""

    name = "fake"

    def __init__(self, plan: dict | None, resolution: int = 64):
        self.plan = plan
        self.resolution = resolution
        self.calls: list[tuple[int, int, int]] = []
        self.weight = torch.nn.Parameter(torch.zeros(1))
        ds = dw.DigitsDataset("test")
        self.by_digit = {d: ds.intensity[ds.targets == d] for d in range(10)}
        self.pairs = {dw.caption(d, c): (d, c) for d in range(10) for c in range(len(dw.PALETTE))}

    def evaluation_plan(self):
        return self.plan

    def parameters(self):
        yield self.weight

    def sample(self, prompts: list[str], num_steps: int, generator: torch.Generator) -> torch.Tensor:
        self.calls.append((generator.initial_seed(), len(prompts), num_steps))
        images = []
        for p in prompts:
            d, c = self.pairs[p]
            pool = self.by_digit[d]
            j = int(torch.randint(len(pool), (1,), generator=generator))
            images.append(dw.render(pool[j : j + 1], c, self.resolution))
        images = torch.cat(images)
        noise = torch.rand(images.shape, generator=generator)
        return (images + 0.03 * (noise - 0.5)).clamp(0, 1)


@pytest.fixture(scope="module")
def evaluator():
    return TrainingEvaluator()


def test_no_plan_and_other_worlds_give_no_scores(evaluator):
    method = FakeMethod(None)
    assert evaluator(method, 10) == {} and method.calls == []
    method = FakeMethod({"world": "coco", "samples": 10, "steps": 4, "seed": 0})
    with pytest.warns(UserWarning, match="'coco' is not supported"):
        assert evaluator(method, 10) == {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per world
        assert evaluator(method, 20) == {}
    assert method.calls == []
    with pytest.raises(ValueError, match="lacks steps, seed"):
        evaluator(FakeMethod({"world": "digits", "samples": 10}), 0)


def test_digits_scores_with_the_benchmark_seeding_rule(evaluator):
    plan = {"world": "digits", "samples": 250, "steps": 3, "seed": 7, "batch_size": 100}
    method = FakeMethod(plan)
    first = evaluator(method, 100)
    assert set(first) == SCORE_KEYS
    # chunk i (starting at prompt index i) is sampled with Generator(device).manual_seed(seed + i)
    assert method.calls == [(7, 100, 3), (107, 100, 3), (207, 50, 3)]
    assert first["samples"] == 250 and first["eval_steps"] == 3
    # real digits in the prompted colours: the classifier agrees, the FID is low and the floor is positive
    assert first["digit_accuracy"] > 0.85 and first["colour_accuracy"] > 0.95
    assert 0 < first["digits_fid_floor"] and first["digits_fid"] < 50
    assert first["digits_fid_floor"] == round(first["digits_fid_floor"], 3)
    # the same plan gives the same images, hence the same scores
    method.calls.clear()
    assert evaluator(method, 200) == first
    assert [c[0] for c in method.calls] == [7, 107, 207]
    # another seed draws other images; batch_size defaults to 250 (one chunk here)
    other = FakeMethod({**plan, "seed": 8})
    other.plan.pop("batch_size")
    scores = evaluator(other, 100)
    assert other.calls == [(8, 250, 3)] and scores["digits_fid"] != first["digits_fid"]
    # 32 px samples are scored as they are
    small = FakeMethod(plan, resolution=32)
    assert set(evaluator(small, 100)) == SCORE_KEYS
