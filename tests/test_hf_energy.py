"""The high-frequency energy measure: known spectra give known shares."""

import math

import pytest
import torch

from fastgen.evaluation.hf_energy import hf_energy


def _sinusoid(freq_cycles_per_px: float, size: int = 32) -> torch.Tensor:
    x = torch.arange(size).float()
    row = 0.5 + 0.4 * torch.cos(2 * math.pi * freq_cycles_per_px * x)
    return row.view(1, 1, 1, size).expand(1, 3, size, size).contiguous()


def test_pure_tones_fall_on_the_right_side_of_the_cutoff():
    low, high = _sinusoid(4 / 32), _sinusoid(12 / 32)  # 0.25 and 0.75 of Nyquist
    assert hf_energy(low, 0.5, quantize=False).item() == pytest.approx(0.0, abs=1e-6)
    assert hf_energy(high, 0.5, quantize=False).item() == pytest.approx(1.0, abs=1e-6)


def test_white_noise_share_equals_the_area_above_the_cutoff():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 3, 64, 64, generator=g)
    expected = 1 - math.pi * 0.25**2  # radius 0.25 cycles/px = 0.5 Nyquist, inside the [-0.5, 0.5]^2 square
    assert hf_energy(noise, 0.5).mean().item() == pytest.approx(expected, abs=0.02)


def test_adding_high_frequency_noise_raises_the_score_on_digits():
    from fastgen.data.digits import DigitsDataset

    pixels, _, _ = DigitsDataset("test").all_pixels(32)
    pixels = pixels[:64]
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float() * 0.1
    base, hacked = hf_energy(pixels), hf_energy((pixels + checker).clamp(0, 1))
    assert (hacked > base).all() and base.mean() < 0.2
    assert torch.equal(hf_energy(torch.full((2, 3, 8, 8), 0.3)), torch.zeros(2))  # a flat image has no energy
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        hf_energy(torch.rand(3, 8, 8))
