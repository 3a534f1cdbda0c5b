"""Registry, input checks and the public functional ops / ``corrupt`` dispatcher / ``Corrupt`` transform.

Every public op has the signature ``op(x, severity, generator=None, params=None)`` and takes a batch
(N, 3, H, W) of floats in [0, 1] on any device. Inputs are first cut to 8-bit levels with a truncating
cast (as torchvision's ToPILImage does before the reference ran), the corruption runs in float64 on those
levels, and the result comes back in the input's dtype as ``floor(255 * v) / 255`` - i.e. exactly what the
reference's final ``np.uint8`` cast keeps. Parameters come from the CIFAR table for 32 px images, from the
ImageNet table for 224 px, or from ``params='cifar' | 'imagenet'``.

Randomness is drawn only from ``generator`` (a ``torch.Generator`` on the input's device; ``None`` uses
torch's global generator), so the same seed gives the same output on the same device.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ...errors import InputError, TTAError
from . import blur, digital, elastic, frost as frost_mod, motion, noise, spatter as spatter_mod, weather
from ._core import to_levels
from .params import FROST_SCALE, resolve_table, severity_params

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS

# Operations on 8-bit levels: (levels, severity constants, generator) -> truncated levels.
_IMPLS: Dict[str, Callable] = {
    "gaussian_noise": noise.gaussian_noise, "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise, "speckle_noise": noise.speckle_noise,
    "defocus_blur": blur.defocus_blur, "glass_blur": blur.glass_blur, "zoom_blur": blur.zoom_blur,
    "gaussian_blur": blur.gaussian_blur, "motion_blur": motion.motion_blur,
    "snow": weather.snow, "fog": weather.fog, "frost": frost_mod.frost,
    "brightness": digital.brightness, "contrast": digital.contrast, "saturate": digital.saturate,
    "pixelate": digital.pixelate, "jpeg_compression": digital.jpeg_compression,
    "elastic_transform": elastic.elastic_transform, "spatter": spatter_mod.spatter,
}
# Corruptions whose output does not depend on the generator.
DETERMINISTIC = frozenset({"defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast",
                           "saturate", "pixelate", "jpeg_compression"})


def check_name(name: str) -> str:
    if name not in _IMPLS:
        raise TTAError(f"unknown corruption {name!r}; valid names: {', '.join(ALL_CORRUPTIONS)}")
    return name


def check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise TTAError(f"corruption severity must be an integer from 1 to 5, got {severity!r}")
    return severity


def check_images(x) -> torch.Tensor:
    """A float batch (N, 3, H, W) with finite values in [0, 1], else InputError saying what is wrong."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"corruptions take a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"corruptions take a batch of RGB images shaped (N, 3, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"corruptions take float images in [0, 1], got dtype {x.dtype} "
                         f"(divide uint8 images by 255, or use corrupt_dataset for uint8 arrays)")
    if x.numel() and bool(torch.isnan(x).any()):
        raise InputError("the image batch contains NaN values")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise InputError(f"image values must lie in [0, 1], got range [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    return x


def apply_levels(levels: torch.Tensor, name: str, severity: int, table: str, generator=None,
                 frost_dir=None) -> torch.Tensor:
    """Run corruption ``name`` on float64 8-bit levels (B, 3, H, W); returns truncated float64 levels."""
    c = severity_params(name, severity, table)
    if name == "frost":
        return frost_mod.frost(levels, c, generator, FROST_SCALE[table], frost_dir)
    return _IMPLS[name](levels, c, generator)


def corrupt(x: torch.Tensor, name: str, severity: int, generator: Optional[torch.Generator] = None,
            seed: Optional[int] = None, params: Optional[str] = None, frost_dir=None) -> torch.Tensor:
    """Corrupt a float batch (N, 3, H, W) in [0, 1] with ``name`` at ``severity`` (1..5).

    ``seed`` (when no ``generator`` is given) makes a fresh generator on the input's device.
    ``frost_dir`` overrides where the frost pictures are read from (frost only).
    """
    check_name(name)
    check_severity(severity)
    check_images(x)
    table = resolve_table(params, x.shape[-2], x.shape[-1])
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
    out = apply_levels(to_levels(x), name, severity, table, generator, frost_dir)
    return (out / 255).to(x.dtype)


def _make_op(name: str) -> Callable:
    def op(x: torch.Tensor, severity: int, generator: Optional[torch.Generator] = None,
           params: Optional[str] = None, **kwargs) -> torch.Tensor:
        return corrupt(x, name, severity, generator=generator, params=params, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = (f"{name} corruption of a float batch (N, 3, H, W) in [0, 1]; see ``corrupt``.\n\n"
                  f"{(_IMPLS[name].__doc__ or '').strip()}")
    return op


OPS: Dict[str, Callable] = {name: _make_op(name) for name in ALL_CORRUPTIONS}


class Corrupt:
    """Transform applying one corruption: ``Corrupt("fog", 5, seed=0)(x)``.

    Accepts a batch (N, 3, H, W) or one image (3, H, W). With a ``seed``, the transform owns a generator
    (created on the first input's device) whose stream advances from call to call, so a sequence of
    calls is reproducible; without one, torch's global generator is used.
    """

    def __init__(self, name: str, severity: int, seed: Optional[int] = None, params: Optional[str] = None,
                 frost_dir=None):
        self.name = check_name(name)
        self.severity = check_severity(severity)
        self.seed = seed
        self.params = params
        self.frost_dir = frost_dir
        self._generator: Optional[torch.Generator] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = isinstance(x, torch.Tensor) and x.ndim == 3
        batch = x.unsqueeze(0) if single else x
        if self.seed is not None and (self._generator is None or self._generator.device != batch.device):
            self._generator = torch.Generator(device=batch.device).manual_seed(int(self.seed))
        out = corrupt(batch, self.name, self.severity, generator=self._generator, params=self.params,
                      frost_dir=self.frost_dir)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"Corrupt(name={self.name!r}, severity={self.severity}, seed={self.seed})"
