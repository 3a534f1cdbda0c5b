"""Registry, input checks and the public functional ops / ``corrupt`` dispatcher / ``Corrupt`` transform.

Every public op has the signature ``op(x, severity, generator=None, params=None)`` and takes a batch
(N, 3, H, W) of floats in [0, 1] on any device. Inputs are first cut to 8-bit levels with a truncating
cast (as torchvision's ToPILImage does before the reference ran), the corruption runs in float64 on those
levels, and the result comes back in the input's dtype as ``floor(255 * v) / 255`` - i.e. exactly what the
reference's final ``np.uint8`` cast keeps. Parameters come from the CIFAR table for 32 px images, from the
ImageNet table for 224 px, or from ``params='cifar' | 'imagenet'``.

Randomness is drawn only from ``generator`` (a ``torch.Generator`` on the input's device; ``None`` uses
torch's global generator), so the same seed gives the same output on the same device.

Batches are worked through in chunks of ``RNG_CHUNK`` (100) images, on worker threads (``_workers``):
a whole 10,000-image float64 batch no longer fits in any cache and one short OpenMP region per operation
stalls on a busy machine; chunks of 100 do neither. A batch of at most 100 images draws from
``generator`` directly; a larger batch first draws one seed per chunk from it (in chunk order) and each
chunk then draws from its own generator, so the output is the same whatever the number of threads.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ...errors import InputError, TTAError
from . import blur, digital, elastic, frost as frost_mod, motion, noise, spatter as spatter_mod, weather
from ._core import to_levels
from ._workers import run_chunks
from .params import FROST_SCALE, resolve_table, severity_params

# Images per chunk: the unit of work of the engine's threads and of its random draws (see module docstring).
RNG_CHUNK = 100

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


def check_images(x, values: bool = True) -> torch.Tensor:
    """A float batch (N, 3, H, W) with finite values in [0, 1], else InputError saying what is wrong.

    ``values=False`` checks type and shape only: ``corrupt`` checks the values chunk by chunk, from the
    scaled copy it makes of each chunk anyway (``to_levels(check=...)`` and :func:`check_range`), instead of
    in extra passes over the whole batch.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"corruptions take a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"corruptions take a batch of RGB images shaped (N, 3, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"corruptions take float images in [0, 1], got dtype {x.dtype} "
                         f"(divide uint8 images by 255, or use corrupt_dataset for uint8 arrays)")
    if values:
        check_values(x)
    return x


def check_values(x: torch.Tensor, first: Optional[int] = None) -> None:
    """NaN or values outside [0, 1] are an InputError (one pass: ``aminmax`` propagates NaN).
    ``first``: where ``x`` starts in the caller's batch when it is a chunk of it (named in the message)."""
    if x.numel():
        check_range(*(float(v) for v in torch.aminmax(x)), x.shape[0], first)


def check_range(lo: float, hi: float, count: int, first: Optional[int] = None) -> None:
    """The smallest and largest value of ``count`` images (NaN if any) -> InputError unless in [0, 1]."""
    where = "" if first is None else f" (in images {first}..{first + count - 1})"
    if lo != lo or hi != hi:
        raise InputError(f"the image batch contains NaN values{where}")
    if lo < 0 or hi > 1:
        raise InputError(f"image values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]{where}")


def apply_levels(levels: torch.Tensor, name: str, severity: int, table: str, generator=None,
                 frost_dir=None) -> torch.Tensor:
    """Run corruption ``name`` on float64 8-bit levels (B, 3, H, W); returns truncated float64 levels."""
    c = severity_params(name, severity, table)
    if name == "frost":
        return frost_mod.frost(levels, c, generator, FROST_SCALE[table], frost_dir)
    return _IMPLS[name](levels, c, generator)


def apply_levels_seeded(levels: torch.Tensor, name: str, severity: int, table: str, groups,
                        frost_dir=None) -> torch.Tensor:
    """``apply_levels`` for independent groups of images, each with its own seed, on the engine's workers.

    ``groups``: a list of (indices into ``levels``, seed). The result equals ``apply_levels`` of each group
    with ``torch.Generator(levels.device).manual_seed(seed)``, whatever the number of threads; it is the
    entry point for callers that seed per group of stream positions (``tta.data.lazy.CorruptedSource``).
    """
    out = torch.empty_like(levels)

    def one(k: int) -> None:
        index, seed = groups[k]
        gen = torch.Generator(device=levels.device).manual_seed(int(seed))
        out[index] = apply_levels(levels[index], name, severity, table, gen, frost_dir)

    run_chunks(one, len(groups), levels.device, pixels=levels.shape[-2] * levels.shape[-1])
    return out


def corrupt(x: torch.Tensor, name: str, severity: int, generator: Optional[torch.Generator] = None,
            seed: Optional[int] = None, params: Optional[str] = None, frost_dir=None) -> torch.Tensor:
    """Corrupt a float batch (N, 3, H, W) in [0, 1] with ``name`` at ``severity`` (1..5).

    ``seed`` (when no ``generator`` is given) makes a fresh generator on the input's device.
    ``frost_dir`` overrides where the frost pictures are read from (frost only).
    """
    check_name(name)
    check_severity(severity)
    check_images(x, values=False)
    table = resolve_table(params, x.shape[-2], x.shape[-1])
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
    n = x.shape[0]
    count = -(-n // RNG_CHUNK)
    seeds = chunk_seeds(generator, count, x.device) if count > 1 else None
    out = torch.empty_like(x, memory_format=torch.contiguous_format)

    def one(k: int) -> None:
        lo, hi = k * RNG_CHUNK, min(n, (k + 1) * RNG_CHUNK)
        gen = generator if seeds is None else torch.Generator(device=x.device).manual_seed(seeds[k])
        levels = to_levels(x[lo:hi], check=lambda a, b: check_range(a, b, hi - lo, lo if count > 1 else None))
        levels = apply_levels(levels, name, severity, table, gen, frost_dir)
        torch.div(levels, 255, out=out[lo:hi])       # converts to the input's dtype as it writes

    run_chunks(one, count, x.device, pixels=x.shape[-2] * x.shape[-1])
    return out


def chunk_seeds(generator: Optional[torch.Generator], count: int, device) -> list:
    """One seed per ``RNG_CHUNK``-image chunk, drawn in chunk order from ``generator`` (``None``: torch's
    global generator of ``device``): a large batch costs its caller's generator exactly one draw."""
    where = generator.device if generator is not None else torch.device(device)
    return torch.randint(0, 2 ** 62, (count,), generator=generator, device=where).tolist()


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
