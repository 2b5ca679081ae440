"""The digits world: data, split, prompts and the digits-FID arithmetic."""

import numpy as np
import pytest
import torch

from fastgen.data import digits as dw
from fastgen.evaluation.digits_metrics import feature_stats, frechet_distance, quantize


def test_split_is_disjoint_and_complete():
    train, test = dw.split_indices("train"), dw.split_indices("test")
    assert len(set(train) & set(test)) == 0
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - dw.HELD_OUT_FRACTION) < 0.01
    # fixed: the same split every time
    assert np.array_equal(test, dw.split_indices("test"))


def test_dataset_items_are_tinted_and_captioned():
    ds = dw.DigitsDataset("train", resolution=32)
    assert len(ds) == len(dw.split_indices("train")) * len(dw.PALETTE)
    item = ds[7]
    assert item["pixels"].shape == (3, 32, 32)
    assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
    assert dw.DIGIT_NAMES[item["digit"]] in item["caption"]
    assert dw.COLOUR_NAMES[item["colour"]] in item["caption"]
    # the brightest pixel carries the palette colour: its dominant channel matches
    px = (item["pixels"] + 1) / 2
    flat = px.flatten(1)
    brightest = flat[:, flat.sum(0).argmax()]
    rgb = torch.tensor(dw.PALETTE[item["colour"]][1], dtype=torch.float32) / 255
    assert brightest.argmax() == rgb.argmax()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_all_pixels_matches_items():
    ds = dw.DigitsDataset("test", resolution=16)
    pix, digits, colours = ds.all_pixels()
    for i in (0, 5, 123):
        item = ds[i]
        assert torch.allclose(pix[i] * 2 - 1, item["pixels"], atol=1e-6)
        assert digits[i] == item["digit"] and colours[i] == item["colour"]


def test_eval_prompts_are_balanced_and_canonical():
    prompts, digits, colours = dw.eval_prompts(600, seed=3)
    assert len(prompts) == 600
    counts = torch.bincount(digits * len(dw.PALETTE) + colours, minlength=60)
    assert counts.min() == counts.max() == 10
    assert prompts[0] == dw.caption(int(digits[0]), int(colours[0]))
    assert dw.eval_prompts(600, seed=3)[0] == prompts


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    mu, s = feature_stats(a)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    # two Gaussians with identity covariance: the distance is the squared mean difference
    shift = np.array([1.0, 2.0, 0.0])
    eye = np.eye(3)
    assert frechet_distance(np.zeros(3), eye, shift, eye) == pytest.approx(5.0, abs=1e-6)
    # scaled covariance: Tr(I + 4I - 2*2I) = 3
    assert frechet_distance(np.zeros(3), eye, np.zeros(3), 4 * eye) == pytest.approx(3.0, abs=1e-6)


def test_quantize_rounds_to_8_bits():
    x = torch.tensor([0.0, 0.5, 0.50196, 1.2, -0.1])
    q = quantize(x)
    assert torch.allclose(q * 255, (q * 255).round())
    assert q[3] == 1.0 and q[4] == 0.0
