"""Constant tables of the reference generators, one entry per severity 1..5.

``CIFAR`` holds the constants of ``make_cifar_c.py`` (32 px), ``IMAGENET`` those of
``make_imagenet_c.py`` (224 px); both are transcribed from docs/METHODS.md 4.2 and 4.5.2. They live in
one place so that a reviewer can compare them with the documentation line by line, and so that a new
image size is one more table rather than edits scattered over the operations.

Size-dependent structure that is *not* a per-severity constant (plasma map side, frost down-scaling,
elastic anchors, glass-blur scan range) is derived from the image size inside the operations, except
the frost scale, which is listed in ``FROST_SCALE``.
"""
from __future__ import annotations

import numpy as np

from ...errors import TTAError


def _arange_list(stop: float, step: float = 0.01) -> tuple:
    """Zoom factors exactly as ``numpy.arange(1, stop, step)`` makes them (7/12/16/21/26 for CIFAR).

    The float arange is kept on purpose: it is what decides how many factors each severity has.
    """
    return tuple(float(z) for z in np.arange(1, stop, step))


CIFAR = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    # (disk radius, anti-alias sigma)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # (sigma, max_delta, iterations)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    # (radius, sigma) of ImageMagick's MotionBlurImage
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": tuple(_arange_list(a) for a in (1.06, 1.11, 1.16, 1.21, 1.26)),
    # (mean, std, zoom, threshold, blur radius, blur sigma, blend)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    # (image weight, frost weight)
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    # (strength, wibble decay)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (alpha, sigma, affine) in pixels
    "elastic_transform": ((0, 0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92), (3.2, 1.28, 1.6),
                          (3.2, 0.96, 0.96)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    # (mean, std, blur sigma, threshold, intensity / mud sigma, mode 0 water 1 mud)
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    # (scale, shift) of the HSV saturation
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}

IMAGENET = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": (_arange_list(1.11), _arange_list(1.16), _arange_list(1.21, 0.02),
                  _arange_list(1.26, 0.02), _arange_list(1.31, 0.03)),
    "snow": ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
             (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
             (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
    "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    # 244 (not 224) is the reference's own typo, kept for fidelity.
    "elastic_transform": tuple((244 * a, 244 * s, 244 * f) for a, s, f in
                               ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02),
                                (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "spatter": ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
                (0.67, 0.4, 1, 0.65, 1.5, 1)),
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
}

TABLES = {"cifar": CIFAR, "imagenet": IMAGENET}
SIZE_TO_TABLE = {32: "cifar", 224: "imagenet"}

# Frost pictures are down-scaled by this factor before the crop (CIFAR x0.2, ImageNet none).
FROST_SCALE = {"cifar": 0.2, "imagenet": 1.0}


def resolve_table(params, height: int, width: int) -> str:
    """Name of the parameter table for an image size, or the explicit ``params`` choice."""
    if params is not None:
        if params not in TABLES:
            raise TTAError(f"unknown corruption parameter set {params!r}; choose one of {sorted(TABLES)}")
        return params
    if height == width and height in SIZE_TO_TABLE:
        return SIZE_TO_TABLE[height]
    raise TTAError(
        f"no corruption parameters for {height}x{width} images: the reference constants exist for "
        f"32x32 (CIFAR) and 224x224 (ImageNet); pass params='cifar' or params='imagenet' to choose one")


def severity_params(name: str, severity: int, table: str):
    """The constants of ``name`` at ``severity`` (1..5) in ``table``."""
    return TABLES[table][name][severity - 1]
