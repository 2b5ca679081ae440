"""The digits reward, weighted sums and the reward registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgen.data import digits as dw
from fastgen.errors import ConfigError, DataError
from fastgen.rewards import DigitsReward, WeightedReward, load_reward, parse_digits_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reward():
    return load_reward("digits")


@pytest.fixture(scope="module")
def images():
    pixels, d, c = dw.DigitsDataset("test").all_pixels(32)
    return pixels[:24], d[:24], c[:24]


def test_prompts_of_every_template_parse_to_their_digit_and_colour():
    for t in range(len(dw.TEMPLATES)):
        for d in range(10):
            for c in range(len(dw.PALETTE)):
                assert parse_digits_prompt(dw.caption(d, c, t)) == (d, c)
    with pytest.raises(DataError, match="names no digit"):
        parse_digits_prompt("a photo of a cat")


def test_digits_reward_is_the_classifiers_log_probability(reward, images):
    pixels, d, c = images
    prompts = [dw.caption(int(a), int(b)) for a, b in zip(d, c)]
    got = reward(pixels, prompts)
    with torch.no_grad():
        dl, cl, _ = reward.classifier(pixels)
    want = F.log_softmax(dl, -1)[torch.arange(24), d] + F.log_softmax(cl, -1)[torch.arange(24), c]
    assert torch.allclose(got, want, atol=1e-6)
    wrong = [dw.caption((int(a) + 1) % 10, int(b)) for a, b in zip(d, c)]
    assert reward(pixels, wrong).mean() < got.mean() - 5  # the wrong digit is far less likely


def test_gradients_reach_the_images_and_not_the_classifier(reward, images):
    pixels, d, c = images
    x = pixels.clone().requires_grad_(True)
    reward(x, [dw.caption(int(a), int(b)) for a, b in zip(d, c)]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())
    reward.train()
    assert not reward.training  # reward models stay in eval mode


def test_weighted_sum_and_bad_input(reward, images):
    pixels, d, c = images
    prompts = [dw.caption(int(a), int(b)) for a, b in zip(d, c)]
    w = WeightedReward({"a": reward, "b": DigitsReward(reward.classifier, colour_weight=0.0)}, {"a": 1.0, "b": 0.5})
    assert torch.allclose(w(pixels, prompts), reward(pixels, prompts) + 0.5 * w.rewards["b"](pixels, prompts))
    spec = load_reward({"weighted": {"digits": {"weight": 2.0}}})
    assert torch.allclose(spec(pixels, prompts), 2 * reward(pixels, prompts))
    with pytest.raises(DataError, match="one prompt per image"):
        reward(pixels, prompts[:3])
    with pytest.raises(ConfigError, match="unknown reward model 'nope'"):
        load_reward("nope")
