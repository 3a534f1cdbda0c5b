"""ImageMagick's ``MotionBlurImage`` without ImageMagick (docs/METHODS.md 4.6), and the motion_blur op.

The reference scripts call ImageMagick through Wand. Its kernel is reproduced exactly: n = 2*ceil(radius)+1
one-sided taps with half-Gaussian weights, tap offsets ``ceil(j*cos(a) - 1/2)`` / ``ceil(j*sin(a) - 1/2)``
computed in float64 with ImageMagick's hypot normalisation, and edge-clamped sampling. The taps are
applied as n batched gathers (one per tap, all images and channels at once), accumulated in tap order.

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
    flat = x.reshape(b, c, h * w_)
    # Per image and tap, the clamped source row (times W) and column; the flat source index of a pixel
    # is their sum, shared by all channels (an expanded index, no copy).
    src_row = (torch.arange(h, device=x.device)[None, None] + dy[:, :, None]).clamp_(0, h - 1).mul_(w_)
    src_col = (torch.arange(w_, device=x.device)[None, None] + dx[:, :, None]).clamp_(0, w_ - 1)
    # Three tensor calls per tap, into an index and a tap buffer made once (no allocation per tap).
    rows, cols = src_row[:, :, :, None].unbind(1), src_col[:, :, None, :].unbind(1)
    index = torch.empty(b, h, w_, dtype=torch.long, device=x.device)
    expanded = index.view(b, 1, h * w_).expand(b, c, h * w_)
    taps = torch.empty(b, c, h * w_, dtype=x.dtype, device=x.device)
    acc = torch.zeros(b, c, h * w_, dtype=torch.float64, device=x.device)
    for row, col, weight in zip(rows, cols, weights.tolist()):
        torch.add(row, col, out=index)
        acc.add_(torch.gather(flat, 2, expanded, out=taps), alpha=weight)
    q = torch.floor(257 * acc + 0.5).clamp_(0, 65535)
    return torch.floor(q / 257).reshape(b, c, h, w_)


def motion_blur(x: torch.Tensor, c, generator) -> torch.Tensor:
    """Reference motion_blur: angle ~ U(-45, 45) degrees per image."""
    radius, sigma = c
    angle = rand_uniform((x.shape[0],), -45.0, 45.0, generator, x.device)
    return truncate255(motion_blur_levels(x, radius, sigma, angle))
