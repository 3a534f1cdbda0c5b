"""Frost: blend with a random crop of one of five frost photographs (docs/METHODS.md 4.2 row 9, 4.5.2).

The pictures are data, not code: they are read from a folder given explicitly (``frost_dir``) or from
``<data root>/corruption_assets/frost`` (``TTA_DATA_DIR``, see ``tta.paths``), never copied into the
package. Like the reference, only frost1-5 are ever drawn (its ``randint(5)`` never picks frost6.jpg).

Deviations, documented: the pictures are decoded with Pillow instead of OpenCV (both use libjpeg; the
PNGs are lossless, the two JPEGs may differ by a level or so between decoders), and the OpenCV bilinear
down-scaling by 0.2 (CIFAR) is reproduced with OpenCV's half-pixel sampling rule, which for a factor of
exactly 1/5 picks every fifth pixel starting at index 2 with no interpolation.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ...paths import data_root
from ...errors import MissingFileError, TTAError
from ._core import rand_below, truncate255

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


def frost_folder(frost_dir=None) -> Path:
    """The folder the frost pictures are read from (see module docstring)."""
    if frost_dir is not None:
        return Path(frost_dir).expanduser()
    return data_root() / "corruption_assets" / "frost"


def _bilinear_scale(img: np.ndarray, scale: float) -> np.ndarray:
    """OpenCV ``resize(img, (0, 0), fx=scale, fy=scale)`` with INTER_LINEAR on an (H, W, 3) uint8 array."""
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    out_h, out_w = int(round(h * scale)), int(round(w * scale))

    def axis(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (1.0 / scale) - 0.5
        lo = np.floor(src).astype(np.int64)
        frac = src - lo
        frac[lo < 0] = 0.0
        lo = np.clip(lo, 0, n_in - 1)
        hi = np.clip(lo + 1, 0, n_in - 1)
        return lo, hi, frac

    r0, r1, fr = axis(h, out_h)
    c0, c1, fc = axis(w, out_w)
    img = img.astype(np.float64)
    rows = img[r0] * (1 - fr)[:, None, None] + img[r1] * fr[:, None, None]
    out = rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _load(folder: str, scale: float):
    from PIL import Image

    path = Path(folder)
    missing = [name for name in FROST_FILES if not (path / name).is_file()]
    if missing:
        raise MissingFileError(
            f"frost textures not found: {', '.join(missing)} missing in {path} (the frost corruption needs "
            f"{', '.join(FROST_FILES)} from hendrycks/robustness ImageNet-C/create_c; set TTA_DATA_DIR so that "
            f"they lie in <TTA_DATA_DIR>/corruption_assets/frost, or pass frost_dir)")
    pictures = []
    for name in FROST_FILES:
        with Image.open(path / name) as im:
            pictures.append(_bilinear_scale(np.array(im.convert("RGB")), scale))
    sizes = torch.tensor([p.shape[:2] for p in pictures], dtype=torch.long)
    hmax, wmax = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    stack = torch.zeros(len(pictures), 3, hmax, wmax, dtype=torch.uint8)
    for i, p in enumerate(pictures):
        stack[i, :, :p.shape[0], :p.shape[1]] = torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1)
    return stack, sizes


def load_frost(scale: float, frost_dir=None, device="cpu"):
    """Frost pictures as one zero-padded uint8 tensor (5, 3, Hmax, Wmax) plus their (H, W) sizes.

    Loading is cached per folder and scale; only the device copy is made per call.
    """
    stack, sizes = _load(str(frost_folder(frost_dir).resolve()), float(scale))
    return stack.to(device), sizes.to(device)


def frost(x: torch.Tensor, c, generator, scale: float, frost_dir=None) -> torch.Tensor:
    """``clip(a*x + b*crop)`` in 0..255 units with a random picture and crop per image."""
    a, b = c
    batch, _, h, w = x.shape
    stack, sizes = load_frost(scale, frost_dir, x.device)
    if bool((sizes[:, 0] <= h).any() or (sizes[:, 1] <= w).any()):
        raise TTAError(f"frost pictures at scale {scale} are too small for {h}x{w} crops")
    pick = torch.randint(0, len(FROST_FILES), (batch,), generator=generator, device=x.device)
    top = rand_below(sizes[pick, 0] - h, generator)
    left = rand_below(sizes[pick, 1] - w, generator)
    rows = top[:, None] + torch.arange(h, device=x.device)[None]
    cols = left[:, None] + torch.arange(w, device=x.device)[None]
    crop = stack[pick[:, None, None], :, rows[:, :, None], cols[:, None, :]]   # (B, H, W, 3)
    crop = crop.permute(0, 3, 1, 2).to(torch.float64)
    return truncate255(a * x + b * crop)

