"""elastic_transform: random affine jitter, then a smooth random displacement field (METHODS.md 4.2 row 13).

(1) Three anchor points around the centre move by U(-affine, affine); the image is warped by the affine
map they define, sampled bilinearly with a reflect-101 border (OpenCV ``warpAffine``): ``grid_sample``
with ``align_corners=True`` and reflection padding. (2) Two U(-1, 1) fields are smoothed by a Gaussian
(SciPy 'reflect' = half-sample symmetric, truncate 3; index-based padding so radii wider than the image
work, as at ImageNet severity 1) and scaled by alpha. (3) The warped image is resampled at
(row + dy, col + dx) like SciPy ``map_coordinates(order=1, mode='reflect')``: ``grid_sample`` with
``align_corners=False`` and reflection padding.

Deviations, documented: float64 instead of the reference's float32, and OpenCV's warpAffine quantises
sample positions to 1/32 pixel while ``grid_sample`` does not (differences of order 1e-4 of full scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._core import apply_operator, gaussian_filter, gaussian_operator, rand_uniform, truncate01, use_operator


def _affine_grid(src_pts: torch.Tensor, dst_pts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling grid (B, H, W, 2) of ``warpAffine(M)`` where M maps ``src_pts`` to ``dst_pts`` (x, y)."""
    batch = dst_pts.shape[0]
    ones = torch.ones(batch, 3, 1, dtype=torch.float64, device=dst_pts.device)
    a = torch.cat((src_pts.expand(batch, -1, -1), ones), 2)              # (B, 3, 3)
    m = torch.linalg.solve(a, dst_pts).transpose(1, 2)                   # (B, 2, 3): dst = M [x y 1]
    lin_inv = torch.linalg.inv(m[:, :, :2])
    shift_inv = -(lin_inv @ m[:, :, 2:])
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=dst_pts.device),
                            torch.arange(w, dtype=torch.float64, device=dst_pts.device), indexing="ij")
    coords = torch.stack((xs, ys), 0).reshape(2, -1)                     # (2, H*W) output (x, y)
    src = lin_inv @ coords + shift_inv                                   # (B, 2, H*W)
    gx = 2 * src[:, 0] / max(w - 1, 1) - 1
    gy = 2 * src[:, 1] / max(h - 1, 1) - 1
    return torch.stack((gx, gy), -1).reshape(batch, h, w, 2)


def elastic_transform(x: torch.Tensor, c, generator) -> torch.Tensor:
    """Affine jitter plus elastic displacement; bilinear sampling with reflecting borders."""
    alpha, sigma, affine = c
    batch, _, h, w = x.shape
    x = x / 255
    cy, cx = float(h // 2), float(w // 2)
    half = min(h, w) // 3
    # (x, y) anchors built like the reference (which indexes the centre as (H//2, W//2) in that order).
    src_pts = torch.tensor([[cy + half, cx + half], [cy + half, cx - half], [cy - half, cx - half]],
                           dtype=torch.float64, device=x.device)[None]
    jitter = rand_uniform((batch, 3, 2), -affine, affine, generator, x.device)
    dst_pts = (src_pts + jitter).to(torch.float32).to(torch.float64)
    grid = _affine_grid(src_pts, dst_pts, h, w)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    if alpha == 0:
        return truncate01(warped)
    fields = rand_uniform((batch, 2, h, w), -1.0, 1.0, generator, x.device)
    if use_operator(fields):        # the same Gaussian as one cached sparse matrix (see _core)
        smooth = apply_operator(gaussian_operator(sigma, "reflect", 3.0, h, w, x.device), fields)
    else:
        smooth = gaussian_filter(fields, sigma, "reflect", 3.0)
    dx, dy = (smooth * alpha).unbind(1)
    cols = torch.arange(w, dtype=torch.float64, device=x.device)[None, None, :] + dx
    rows = torch.arange(h, dtype=torch.float64, device=x.device)[None, :, None] + dy
    grid = torch.stack(((2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1), -1)
    out = F.grid_sample(warped, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return truncate01(out)
