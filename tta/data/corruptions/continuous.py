"""Continuous severities in [0, 5] for the 224-px (ImageNet) constants, as CCC's generator defines them.

CCC (Press et al., NeurIPS 2023; ``oripress/CCC`` ``make_imagenet_c.py``, read for this) gives every
corruption a sixth, "severity 0" parameter set that leaves the image (almost) unchanged and interpolates
each parameter **linearly** between the six anchors 0, 1, ..., 5; the anchors 1..5 are ImageNet-C's
constants (``params.IMAGENET``). The rules below are CCC's:

* shot noise interpolates the reciprocal of its photon count (anchor 0: 1/c = 0, no noise);
* zoom blur interpolates (start, stop, step) of its ``arange`` of factors (anchor 0: (1, 1, 0.01), none);
* glass blur rounds its pixel distance (at least 1) and its iteration count with Python's ``round``;
* JPEG interpolates the quality from 85 at severity 0 and rounds it;
* severity 0 itself is the identity (CCC skips the corruption there).

Anchors at 0 (CCC's): gaussian 0, impulse 0, defocus (0, 0), glass (0, 0, 0), motion (0, 0), snow
(0.1, 0.3, 3, 1.0, 10, 4, 1.0), frost (1, 0), fog (0, 2), brightness 0, contrast 1, elastic (0, 999, 0),
pixelate 1. Ours, where the engine differs: a defocus radius above 8 uses the integer grid
``-int(r)..int(r)`` (the reference builds ``arange(-r, r + 1)``, a half-integer grid for fractional r);
motion-blur radii enter our ImageMagick kernel model as floats, like CCC's call. At integer severities the
parameters are exactly the engine's, so ``corrupt_levels(x, name, 5, g)`` equals the ImageNet-C op.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

from ...errors import TTAError
from .params import IMAGENET

# severity-0 anchor of each corruption (CCC's generator); shot noise is given as 1 / photon count
ZERO = {
    "gaussian_noise": 0.0, "shot_noise": 0.0, "impulse_noise": 0.0, "defocus_blur": (0.0, 0.0),
    "glass_blur": (0.0, 0.0, 0.0), "motion_blur": (0.0, 0.0), "zoom_blur": (1.0, 1.0, 0.01),
    "snow": (0.1, 0.3, 3, 1.0, 10, 4, 1.0), "frost": (1.0, 0.0), "fog": (0.0, 2.0), "brightness": 0.0,
    "contrast": 1.0, "elastic_transform": (0.0, 999.0, 0.0), "pixelate": 1.0, "jpeg_compression": 85,
}
# zoom blur's anchors as (start, stop, step) of numpy.arange (ImageNet-C's lists are these aranges)
ZOOM = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))


def _anchors(name: str) -> list:
    if name not in ZERO:
        raise TTAError(f"no continuous severities for {name!r}; available: {', '.join(ZERO)}")
    if name == "zoom_blur":
        return [ZERO[name], *ZOOM]
    if name == "shot_noise":
        return [0.0, *(1.0 / c for c in IMAGENET[name])]
    return [ZERO[name], *IMAGENET[name]]


def _lerp(a, b, t: float):
    if isinstance(a, tuple):
        return tuple((1 - t) * float(u) + t * float(v) for u, v in zip(a, b))
    return (1 - t) * float(a) + t * float(b)


def check_level(severity) -> float:
    if isinstance(severity, bool) or not isinstance(severity, (int, float)) or not 0 <= severity <= 5:
        raise TTAError(f"a continuous corruption severity must be a number in [0, 5], got {severity!r}")
    return float(severity)


def interpolated(name: str, severity: float):
    """The raw interpolated parameters of ``name`` at ``severity`` (before the op-specific rules)."""
    s = check_level(severity)
    anchors = _anchors(name)
    lo = min(int(math.floor(s)), 4)
    return _lerp(anchors[lo], anchors[lo + 1], s - lo)


def op_params(name: str, severity: float):
    """Parameters in the form the engine's operation takes (None at severity 0: identity)."""
    s = check_level(severity)
    if s == 0:
        return None
    if s == int(s):
        return IMAGENET[name][int(s) - 1]  # exactly the integer-severity constants
    c = interpolated(name, s)
    if name == "shot_noise":
        return 1.0 / c
    if name == "zoom_blur":
        return tuple(float(z) for z in np.arange(*c))
    if name == "glass_blur":
        return (c[0], max(1, round(c[1])), round(c[2]))
    if name == "jpeg_compression":
        return round(c)
    return c


def corrupt_levels(levels: torch.Tensor, name: str, severity: float, generator=None, frost_dir=None) -> torch.Tensor:
    """Corrupt float64 8-bit levels (B, 3, 224, 224) at a continuous severity; returns truncated levels."""
    from . import frost as frost_mod
    from .api import _IMPLS
    from .params import FROST_SCALE
    c = op_params(name, severity)
    if c is None:
        return levels
    if name == "frost":
        return frost_mod.frost(levels, c, generator, FROST_SCALE["imagenet"], frost_dir)
    return _IMPLS[name](levels, c, generator)


def grid(step: float = 0.25) -> Tuple[float, ...]:
    """Severity levels 0, step, ..., 5 (CCC's calibration grid has step 0.25: 21 levels)."""
    n = int(round(5 / step))
    if n < 1 or abs(n * step - 5) > 1e-9:
        raise TTAError(f"the severity grid step must divide 5, got {step!r}")
    return tuple(round(k * step, 10) for k in range(n + 1))
