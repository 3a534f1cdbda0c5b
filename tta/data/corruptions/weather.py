"""Weather corruptions: snow and fog (docs/METHODS.md 4.2 rows 8 and 10, 4.3); frost lives in frost.py.

snow blurs its flake layer with the ImageMagick motion-blur model of motion.py (no ImageMagick needed).
fog uses the reference's diamond-square plasma fractal, vectorised over the batch, keeping its quirk that
the random offset added at each refinement is ``wibble * U(-wibble, wibble)`` (amplitude ~ wibble^2).
Deviation, documented: the reference computes snow in float32; we use float64 throughout (the flake
noise is drawn as float32 normals, then converted). The image part of snow runs in 8-bit level units,
which changes only the float64 rounding order.
"""
from __future__ import annotations

import torch

from ._core import (apply_operator, axis_matrix, clipped_zoom, kron_operator, rand_uniform, truncate01,
                    truncate255, use_operator)
from .motion import motion_blur_levels


def _zoomed(x: torch.Tensor, z: float) -> torch.Tensor:
    """``clipped_zoom`` (as a cached sparse operator on small images)."""
    if use_operator(x):
        h, w = x.shape[-2:]
        op = kron_operator(("clipped_zoom", float(z)), h, w, x.device,
                           lambda: [(axis_matrix(lambda e: clipped_zoom(e, z), h, -2),
                                     axis_matrix(lambda e: clipped_zoom(e, z), w, -1))])
        return apply_operator(op, x).contiguous()     # the motion blur gathers from it
    return clipped_zoom(x, z)


def snow(x: torch.Tensor, c, generator) -> torch.Tensor:
    """Zoomed, thresholded noise flakes, motion-blurred downwards, added twice (once rotated by 180 deg)."""
    mean, std, zoom, threshold, blur_radius, blur_sigma, blend = c
    batch, _, h, w = x.shape
    noise = torch.randn((batch, 1, h, w), generator=generator, device=x.device, dtype=torch.float32)
    layer = _zoomed(noise.to(x.dtype).mul_(std).add_(mean), zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    angle = rand_uniform((batch,), -135.0, -45.0, generator, x.device)
    flakes = motion_blur_levels(truncate01(layer), blur_radius, blur_sigma, angle)
    # The rest in 8-bit level units (x is levels): x <- blend x + (1 - blend) max(x, 1.5 gray + 1/2).
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    out = torch.maximum(x, gray.mul_(1.5).add_(127.5)).mul_(1 - blend).add_(x, alpha=blend)
    return truncate255(out.add_(flakes).add_(flakes.flip(-1, -2)))


def plasma_fractal(batch: int, size: int, decay: float, generator, device, normalise: bool = True) -> torch.Tensor:
    """Diamond-square height maps (B, size, size), ``size`` a power of two, rescaled to [0, 1].

    Corner (0, 0) starts at 0 with ``wibble = 100``. Each level fills square centres with the mean of
    their 4 corners and then edge midpoints with the mean of their 4 diamond neighbours (both with
    cyclic wrap-around), each plus ``wibble * U(-wibble, wibble)``; then the step halves and
    ``wibble /= decay``. ``normalise=False`` returns the raw map (used by the tests).
    """
    grid = torch.zeros(batch, size, size, dtype=torch.float64, device=device)
    step, wibble = size, 100.0

    def wibbled_mean(total):
        return total / 4 + wibble * rand_uniform(total.shape, -wibble, wibble, generator, device)

    while step >= 2:
        half = step // 2
        corners = grid[:, 0::step, 0::step]
        square = corners + corners.roll(-1, 1)
        square = square + square.roll(-1, 2)
        grid[:, half::step, half::step] = wibbled_mean(square)
        centres = grid[:, half::step, half::step]
        corners = grid[:, 0::step, 0::step]
        # Midpoints of horizontal edges: corners left/right, centres below/above.
        grid[:, 0::step, half::step] = wibbled_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        # Midpoints of vertical edges: corners above/below, centres right/left.
        grid[:, half::step, 0::step] = wibbled_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step = half
        wibble /= decay
    if not normalise:
        return grid
    flat = grid.reshape(batch, -1)
    flat = flat - flat.amin(1, keepdim=True)
    return (flat / flat.amax(1, keepdim=True)).reshape(batch, size, size)


def fog(x: torch.Tensor, c, generator) -> torch.Tensor:
    """Add a plasma height map, then rescale by ``max / (max + strength)`` (image-wide max)."""
    strength, decay = c
    batch, _, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()
    x = x / 255
    peak = x.reshape(batch, -1).amax(1).view(batch, 1, 1, 1)
    plasma = plasma_fractal(batch, size, decay, generator, x.device)[:, None, :h, :w]
    return truncate01((x + strength * plasma) * peak / (peak + strength))
