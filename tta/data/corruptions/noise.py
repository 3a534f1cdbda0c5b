"""Per-pixel noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle.

Each element (pixel and channel) is perturbed independently, exactly as in the reference; only the random
number generator differs (a ``torch.Generator`` instead of NumPy's unseeded global state), so results
match the reference in distribution, not bit for bit. Signature of every op here:
``op(x, c, generator)`` with ``x`` float64 levels 0..255 (B, 3, H, W) and ``c`` the severity constant.
"""
from __future__ import annotations

import torch

from ._core import truncate01


def gaussian_noise(x: torch.Tensor, sigma: float, generator) -> torch.Tensor:
    """``clip(x + N(0, sigma^2))``."""
    x = x / 255
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return truncate01(x + sigma * noise)


def shot_noise(x: torch.Tensor, scale: float, generator) -> torch.Tensor:
    """``clip(Poisson(x * scale) / scale)``: photon noise whose variance grows with brightness."""
    x = x / 255
    return truncate01(torch.poisson(x * scale, generator=generator) / scale)


def impulse_noise(x: torch.Tensor, amount: float, generator) -> torch.Tensor:
    """scikit-image ``random_noise(mode='s&p')``: each element flips with prob. ``amount`` to 0 or 1."""
    x = x / 255
    flip = torch.rand(x.shape, generator=generator, device=x.device) < amount
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    out = torch.where(flip, salt.to(x.dtype), x)
    return truncate01(out)


def speckle_noise(x: torch.Tensor, sigma: float, generator) -> torch.Tensor:
    """``clip(x + x * N(0, sigma^2))``: multiplicative noise."""
    x = x / 255
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return truncate01(x + x * sigma * noise)
