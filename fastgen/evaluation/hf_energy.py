"""High-frequency energy: the share of an image's spectral energy above a radial frequency cut-off.

Reward hacking through a pixel-space reward model shows up as high-frequency patterns; this number
makes it visible next to FID. Per image: luminance (Rec. 601 weights), mean removed, 2-D power
spectrum; radial frequency ``r = sqrt(fx^2 + fy^2) / 0.5`` (1 = Nyquist along an axis); the score is
``sum(P[r > cutoff]) / sum(P)``. Images are rounded to 8 bits first, like every metric here.
"""

from __future__ import annotations

import torch

LUMA = (0.299, 0.587, 0.114)


def radial_frequency(h: int, w: int, device=None) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, device=device).abs()
    fx = torch.fft.fftfreq(w, device=device).abs()
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5


def hf_energy(images: torch.Tensor, cutoff: float = 0.5, quantize: bool = True) -> torch.Tensor:
    """Share of spectral energy above ``cutoff`` (fraction of Nyquist) for each image of ``[N,3,H,W]`` in [0,1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"hf_energy takes images [N,3,H,W] or [N,1,H,W], got {tuple(images.shape)}")
    x = images.detach().float()
    if quantize:
        x = (x.clamp(0, 1) * 255).round() / 255
    if x.shape[1] == 3:
        x = sum(c * x[:, i] for i, c in enumerate(LUMA))
    else:
        x = x[:, 0]
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2
    mask = radial_frequency(x.shape[-2], x.shape[-1], x.device) > cutoff
    total = power.sum(dim=(-2, -1)).clamp_min(1e-12)
    return (power * mask).sum(dim=(-2, -1)) / total
