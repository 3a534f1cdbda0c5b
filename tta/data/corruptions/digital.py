"""Colour and "digital" corruptions: brightness, contrast, saturate, pixelate, jpeg_compression.

* brightness / saturate go through scikit-image's HSV conversion, reimplemented in torch with its tie
  rules (``_core.rgb_to_hsv``), so results agree with scikit-image to float rounding.
* pixelate reproduces Pillow's BOX resampling bit for bit as two fixed-point weight-matrix products
  (horizontal pass first, rounded to 8 bits, then vertical), batched over images (METHODS.md 4.5.5).
* jpeg_compression is the one per-image loop: a real codec (Pillow, quality q, otherwise Pillow's
  defaults, i.e. 4:2:0 chroma subsampling), as in the reference.
"""
from __future__ import annotations

import functools
import io

import numpy as np
import torch

from ._core import hsv_to_rgb, rgb_to_hsv, truncate01

PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling (32 - 8 - 2)


def brightness(x: torch.Tensor, c: float, generator=None) -> torch.Tensor:
    """Add ``c`` to the HSV value channel (deterministic)."""
    hsv = rgb_to_hsv(x / 255)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return truncate01(hsv_to_rgb(hsv))


def saturate(x: torch.Tensor, c, generator=None) -> torch.Tensor:
    """``S <- clip(S * scale + shift)`` in HSV (deterministic)."""
    scale, shift = c
    hsv = rgb_to_hsv(x / 255)
    hsv[:, 1] = (hsv[:, 1] * scale + shift).clamp(0, 1)
    return truncate01(hsv_to_rgb(hsv))


def contrast(x: torch.Tensor, c: float, generator=None) -> torch.Tensor:
    """Scale each channel's deviation from its spatial mean by ``c`` (deterministic)."""
    x = x / 255
    mean = x.mean(dim=(2, 3), keepdim=True)
    return truncate01((x - mean) * c + mean)


@functools.lru_cache(maxsize=64)
def box_weights(n_in: int, n_out: int) -> torch.Tensor:
    """Pillow's fixed-point BOX coefficients as an (n_out, n_in) float64 matrix of integers.

    Output pixel ``i`` has footprint centre ``(i + 0.5) * n_in / n_out``; its support is widened to the
    scale when down-sampling; an input pixel counts when its centre offset ``t`` (in footprint units)
    satisfies ``-0.5 < t <= 0.5``; weights are normalised and rounded to ``2**22`` fixed point.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        t = (np.arange(lo, hi) - centre + 0.5) / filterscale
        w = ((t > -0.5) & (t <= 0.5)).astype(np.float64)
        if w.sum() > 0:
            w = w / w.sum()
        weights[i, lo:hi] = np.floor(w * (1 << PRECISION_BITS) + 0.5)
    return torch.from_numpy(weights)


def _resample_axis(x: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """One Pillow BOX pass along ``dim`` (-1 columns, -2 rows) on 8-bit levels, rounded back to 8 bits."""
    weights = box_weights(x.shape[dim], n_out).to(device=x.device, dtype=x.dtype)
    moved = x.movedim(dim, -1)
    acc = moved @ weights.T + (1 << (PRECISION_BITS - 1))
    out = torch.floor(acc / (1 << PRECISION_BITS)).clamp_(0, 255)
    return out.movedim(-1, dim)


def pil_box_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``PIL.Image.resize((width, height), Image.BOX)`` on float64 8-bit levels (B, C, H, W)."""
    if x.shape[-1] != width:
        x = _resample_axis(x, width, -1)
    if x.shape[-2] != height:
        x = _resample_axis(x, height, -2)
    return x


def pixelate(x: torch.Tensor, c: float, generator=None) -> torch.Tensor:
    """BOX-downscale to ``int(side * c)`` and BOX-upscale back (deterministic)."""
    h, w = x.shape[-2:]
    small = pil_box_resize(x, int(h * c), int(w * c))
    return pil_box_resize(small, h, w)


def jpeg_compression(x: torch.Tensor, quality: int, generator=None) -> torch.Tensor:
    """Encode and decode each image with Pillow's JPEG codec at ``quality`` (deterministic)."""
    from PIL import Image

    images = x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return torch.from_numpy(out).to(device=x.device, dtype=torch.float64).permute(0, 3, 1, 2)
