"""ImageMagick's ``MotionBlurImage`` without ImageMagick (docs/METHODS.md 4.6), and the motion_blur op.

The reference scripts call ImageMagick through Wand. Its kernel is reproduced exactly: n = 2*ceil(radius)+1
one-sided taps with half-Gaussian weights, tap offsets ``ceil(j*cos(a) - 1/2)`` / ``ceil(j*sin(a) - 1/2)``
computed in float64 with ImageMagick's hypot normalisation, and edge-clamped sampling. The taps are
applied as n batched gathers (one per tap, all images and channels at once).

Deviation, documented: the final quantiser is build-dependent in ImageMagick. We use the Q16 non-HDRI
rule of ImageMagick 6.9.x (round to 16 bits, then truncate to 8 bits: ``floor(floor(257*O + 1/2) / 257)``),
which METHODS.md 4.6.2 reports as bit-exact against 6.9.11-60. Accumulation is float64.
"""
from __future__ import annotations

import math

import torch

from ._core import rand_uniform, truncate255


def motion_kernel(radius: float, sigma: float, angle_deg: torch.Tensor):
    """Tap weights ``w`` (n,) and integer offsets ``dx, dy`` (B, n) for per-image angles (degrees).

    A point is smeared onto ``p - (dx_j, dy_j)``: the streak trails opposite to the angle.
    """
    n = 2 * math.ceil(radius) + 1
    device = angle_deg.device
    j = torch.arange(n, dtype=torch.float64, device=device)
    w = torch.exp(-j ** 2 / (2 * float(sigma) ** 2))
    w = w / w.sum()
    a = math.pi * angle_deg.to(torch.float64) / 180
    px, py = n * torch.sin(a), n * torch.cos(a)
    length = torch.hypot(px, py)
    dx = torch.ceil(j[None] * (py / length)[:, None] - 0.5).long()
    dy = torch.ceil(j[None] * (px / length)[:, None] - 0.5).long()
    return w, dx, dy


def motion_blur_levels(x: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """Motion-blur 8-bit levels (B, C, H, W) with one angle per image; returns quantised levels."""
    b, c, h, w_ = x.shape
    weights, dx, dy = motion_kernel(radius, sigma, angle_deg)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w_, device=x.device)
    # Pixel-major layout so that one index moves all channels of a pixel together.
    flat = x.permute(0, 2, 3, 1).reshape(b * h * w_, c)
    base = (torch.arange(b, device=x.device) * (h * w_)).view(b, 1, 1)
    acc = torch.zeros(b * h * w_, c, dtype=torch.float64, device=x.device)
    for t in range(weights.numel()):
        r = (rows[None] + dy[:, t:t + 1]).clamp_(0, h - 1)          # (B, H)
        k = (cols[None] + dx[:, t:t + 1]).clamp_(0, w_ - 1)         # (B, W)
        idx = (base + r[:, :, None] * w_ + k[:, None, :]).reshape(-1)
        acc.add_(flat.index_select(0, idx), alpha=float(weights[t]))
    q = torch.floor(257 * acc + 0.5).clamp_(0, 65535)
    out = torch.floor(q / 257)
    return out.reshape(b, h, w_, c).permute(0, 3, 1, 2)


def motion_blur(x: torch.Tensor, c, generator) -> torch.Tensor:
    """Reference motion_blur: angle ~ U(-45, 45) degrees per image."""
    radius, sigma = c
    angle = rand_uniform((x.shape[0],), -45.0, 45.0, generator, x.device)
    return truncate255(motion_blur_levels(x, radius, sigma, angle))
