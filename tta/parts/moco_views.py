"""AdaContrast's four views of every test image (METHODS-ZOO Z.11), for a whole batch at once.

* ``t`` (test): the image itself (the reference's resize/centre crop to the same size is the identity);
* ``w`` (weak): horizontal flip with probability 1/2 (its RandomCrop(S) without padding is the identity);
* ``q``, ``k`` (strong, two independent draws of "moco-v2-light"): with probability 0.8 a colour jitter
  (brightness, contrast, saturation factors U[0.6, 1.4], hue shift U[-0.1, 0.1], the four ops in a random
  order per image, torchvision's formulas) -> grayscale with probability 0.2 -> with probability 1/2 PIL's
  Gaussian blur of radius U[0.1, 2.0] -> horizontal flip with probability 1/2. No crop.

Every image draws its own values (the reference builds views per image in its loader workers), yet every
op runs over the batch: the draws are tensors with one row per image and each op is applied to the rows
that drew it. All draws come from one ``torch.Generator`` (the adapter's), in a fixed order, so a seed
fixes the views.

The 8-bit grid (``pil_grid``): the reference converts each float image to PIL as ``uint8(x * 255)``
(truncation, not rounding), every PIL op stores its result as uint8 and the views come back through
ToTensor, i.e. on the grid ``k / 255``. With ``pil_grid=True`` (the default, for parity) the input is
truncated the same way and the strong views are rounded to the grid where PIL rounds: after the colour
jitter (not between its four ops), after the grayscale and after every blur pass. With
``pil_grid=False`` the views are computed from the float input and stay in float.

PIL's Gaussian blur is not a sampled Gaussian: ``ImageFilter.GaussianBlur(radius)`` (radius = the
standard deviation) runs three box blurs per axis, each of the fractional half-width ``l + a`` whose
variance makes the three passes' variance ``radius**2`` (its ``_gaussian_blur_radius``): the box holds
``2l + 1`` taps of weight 1 and one tap of weight ``a`` at each end, normalised by ``2(l + a) + 1``, with
the edge pixels repeated. :func:`pil_gaussian_blur` computes these six passes in float, and with ``grid``
rounds each to the 8-bit grid as PIL stores it. ``tests/test_adacontrast.py`` measures the difference
against PIL on real images: with the per-pass rounding at most one 8-bit level per pixel and about 0.1 on
average (PIL works in 24-bit fixed point); without it (float input) at most two levels, below 0.6 on
average.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .augment import _gray, colour_jitter

JITTER_P, GRAY_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))  # brightness, contrast, saturation, hue
BLUR_RADIUS = (0.1, 2.0)
PIL_BLUR_PASSES = 3


def to_pil_grid(x: torch.Tensor) -> torch.Tensor:
    """``uint8(x * 255) / 255``: the reference's float -> PIL conversion (truncation)."""
    return torch.floor((x * 255).clamp(0, 255)) / 255


def round_to_grid(x: torch.Tensor) -> torch.Tensor:
    """Nearest value ``k / 255``: a view as ToTensor reads it back from an 8-bit image."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def pil_box_radius(sigma: torch.Tensor, passes: int = PIL_BLUR_PASSES) -> torch.Tensor:
    """The fractional box half-width ``l + a`` PIL uses for a Gaussian of std ``sigma`` in ``passes`` passes
    (Gwosdek et al. 2011, "Theoretical foundations of Gaussian convolution by extended box filtering")."""
    s2 = sigma.double() ** 2 / passes
    length = torch.sqrt(12 * s2 + 1)
    l = torch.floor((length - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    return (l + a).float()


def _box_pass(x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """One box blur of each image of ``x`` (n, C, H, W) along the last axis with its own fractional
    ``radius`` (n,), edges repeated."""
    l = radius.floor()
    reach = int(l.max()) + 1
    offsets = torch.arange(-reach, reach + 1, dtype=radius.dtype).abs()
    taps = torch.where(offsets <= l[:, None], 1.0, torch.where(offsets == l[:, None] + 1, (radius - l)[:, None], 0.0))
    taps = (taps / (2 * radius[:, None] + 1)).to(x).view(len(x), -1, 1, 1, 1)
    padded = F.pad(x, (reach, reach, 0, 0), mode="replicate")
    width = x.shape[-1]
    return sum(taps[:, j] * padded[..., j:j + width] for j in range(2 * reach + 1))


def pil_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, passes: int = PIL_BLUR_PASSES,
                      grid: bool = False) -> torch.Tensor:
    """PIL's ``GaussianBlur(sigma)`` of each image of ``x`` (n, C, H, W), one ``sigma`` (n,) per image
    (module docstring): ``passes`` box blurs along the width, then as many along the height. ``grid``:
    round every pass to the 8-bit grid as PIL stores it (for an input on the grid)."""
    radius = pil_box_radius(sigma.cpu(), passes)
    snap = round_to_grid if grid else (lambda v: v)
    for _ in range(passes):
        x = snap(_box_pass(x, radius))
    x = x.transpose(-1, -2)
    for _ in range(passes):
        x = snap(_box_pass(x, radius))
    return x.transpose(-1, -2)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(a.device).view(-1, 1, 1, 1), a, b)


def draw_strong(n: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """The moco-v2-light draws of ``n`` images (CPU tensors, one row per image)."""
    u = torch.rand(n, 4, generator=generator)
    low, high = torch.tensor(JITTER_RANGES).T
    return {
        "jitter": torch.rand(n, generator=generator) < JITTER_P,
        "factors": low + (high - low) * u,
        "order": torch.rand(n, 4, generator=generator).argsort(1),
        "gray": torch.rand(n, generator=generator) < GRAY_P,
        "blur": torch.rand(n, generator=generator) < BLUR_P,
        "radius": torch.empty(n).uniform_(*BLUR_RADIUS, generator=generator),
        "flip": torch.rand(n, generator=generator) < FLIP_P,
    }


def strong_view(x: torch.Tensor, p: Dict[str, torch.Tensor], grid: bool = False) -> torch.Tensor:
    """moco-v2-light of each image of ``x`` (n, 3, H, W) with the draws ``p`` of :func:`draw_strong`.
    ``grid``: round to the 8-bit grid where PIL stores an image: after the jitter, the grayscale, each blur
    pass (the jitter's four ops run in float in between)."""
    snap = round_to_grid if grid else (lambda v: v)
    x = x.clone()
    sel = p["jitter"].nonzero().squeeze(1)
    if len(sel):
        # augment.colour_jitter runs five ops (the fifth, gamma, is the identity at factor 1, placed last)
        factors = torch.cat([p["factors"][sel], torch.ones(len(sel), 1)], 1)
        order = torch.cat([p["order"][sel], torch.full((len(sel), 1), 4)], 1)
        idx = sel.to(x.device)
        x[idx] = snap(colour_jitter(x[idx].unsqueeze(1), factors, order).squeeze(1))
    x = _where(p["gray"], snap(_gray(x)).expand_as(x), x)
    sel = p["blur"].nonzero().squeeze(1)
    if len(sel):
        idx = sel.to(x.device)
        x[idx] = pil_gaussian_blur(x[idx], p["radius"][sel], grid=grid)
    return _where(p["flip"], x.flip(-1), x)


def moco_views(x: torch.Tensor, generator: torch.Generator,
               pil_grid: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, w, q, k)`` of the batch ``x`` (B, 3, H, W) in [0, 1], each (B, 3, H, W) (module docstring).
    Draw order: the weak flips (B), then the strong draws of q and k together (2B rows, q first)."""
    b = x.shape[0]
    t = to_pil_grid(x) if pil_grid else x
    w = _where(torch.rand(b, generator=generator) < FLIP_P, t.flip(-1), t)
    strong = strong_view(torch.cat([t, t]), draw_strong(2 * b, generator), grid=pil_grid)
    return t, w, strong[:b], strong[b:]


__all__ = ["moco_views", "strong_view", "draw_strong", "pil_gaussian_blur", "pil_box_radius", "to_pil_grid",
           "round_to_grid"]
