"""Blur corruptions: defocus, glass, zoom and gaussian blur (docs/METHODS.md 4.2 rows 4, 5, 7, x2).

Notes on fidelity:

* defocus_blur builds the reference's anti-aliased disk kernel (OpenCV ``GaussianBlur`` of the disk,
  reflect-101 border, float32 kernel, not renormalised) and correlates with a reflect-101 border like
  OpenCV ``filter2D``. The kernel is cropped to its non-zero support, which changes nothing numerically.
* glass_blur keeps the reference's copy-not-swap quirk, computed exactly and in parallel by pointer
  jumping (METHODS.md 4.5.5) instead of a per-pixel Python loop.
* zoom_blur uses the float ``numpy.arange`` factor lists (7/12/16/21/26 factors for CIFAR).

Speed: on small images (``_core.SPARSE_MAX_PIXELS``, i.e. CIFAR) every fixed linear filter here - the
defocus correlation, each Gaussian, and the whole zoom average (image plus all its zooms) - is applied as
one precomputed sparse (H*W, H*W) matrix built by running the direct code below on the basis images, on
8-bit levels directly. Only the float64 summation order changes (~1e-13 of a level).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._core import (apply_operator, axis_matrix, clipped_zoom, correlate1d, gaussian_filter, gaussian_operator,
                    kron_operator, pad_index, truncate01, truncate255, use_operator)


def disk_kernel(radius: float, alias_sigma: float, device=None) -> torch.Tensor:
    """The reference's ``disk(radius, alias_blur)`` kernel (float32 values, returned as float64)."""
    half = 8 if radius <= 8 else int(radius)
    ksize = 3 if radius <= 8 else 5
    grid = torch.arange(-half, half + 1, dtype=torch.float64, device=device)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2).to(torch.float32)
    disk = (disk / disk.sum()).to(torch.float64)
    t = torch.arange(ksize, dtype=torch.float64, device=device) - (ksize - 1) / 2
    g = torch.exp(-t ** 2 / (2 * alias_sigma ** 2))
    g = g / g.sum()
    blurred = correlate1d(correlate1d(disk, g, -2, "mirror"), g, -1, "mirror")
    return blurred.to(torch.float32).to(torch.float64)


def _crop_support(kernel: torch.Tensor) -> torch.Tensor:
    """Cut the all-zero border of a centred odd kernel, keeping it centred."""
    half = kernel.shape[0] // 2
    nz = torch.nonzero(kernel)
    reach = int((nz - half).abs().max()) if nz.numel() else 0
    return kernel[half - reach:half + reach + 1, half - reach:half + reach + 1]


def filter2d_reflect101(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """OpenCV ``filter2D`` (correlation, default reflect-101 border) of every channel of (B, C, H, W).

    Small kernels, and every kernel on the CPU, are applied as a sum of shifted copies: float64 ``conv2d`` is
    slow on CPU and unfolds the whole batch (a 21 x 21 defocus kernel on 100 ImageNet images would need
    53 GB); on a GPU large kernels use ``conv2d``. The shifted copies run over groups of images of about
    2 MB (85 CIFAR images, one ImageNet image), so each of the hundreds of taps stays in cache instead of
    streaming the batch through memory (12x faster at 224 px); the sums are the same, element by element.
    """
    b, c, h, w = x.shape
    k = kernel.shape[0]
    r = k // 2
    rows = pad_index(h, r, r, "mirror", x.device)
    cols = pad_index(w, r, r, "mirror", x.device)
    if k > 9 and x.device.type != "cpu":
        xp = x.index_select(2, rows).index_select(3, cols)
        out = F.conv2d(xp.reshape(b * c, 1, h + 2 * r, w + 2 * r), kernel.to(x.dtype)[None, None])
        return out.reshape(b, c, h, w)
    taps = [(i, j, float(kernel[i, j])) for i, j in torch.nonzero(kernel).tolist()]
    group = max(1, (1 << 18) // (c * h * w))
    out = torch.zeros_like(x)
    for g in range(0, b, group):
        xp = x[g:g + group].index_select(2, rows).index_select(3, cols)
        part = out[g:g + group]
        for i, j, weight in taps:
            part += weight * xp[:, :, i:i + h, j:j + w]
    return out


def defocus_blur(x: torch.Tensor, c, generator=None) -> torch.Tensor:
    """Correlate with an anti-aliased disk (deterministic)."""
    radius, alias = c
    if use_operator(x):
        h, w = x.shape[-2:]

        def terms():   # one (shifted rows, shifted columns) pair per kernel tap, reflect-101 borders
            kernel = _crop_support(disk_kernel(radius, alias))
            r = kernel.shape[0] // 2
            rows = F.one_hot(pad_index(h, r, r, "mirror", "cpu"), h).to(torch.float64)
            cols = F.one_hot(pad_index(w, r, r, "mirror", "cpu"), w).to(torch.float64)
            return [(float(kernel[i, j]) * rows[i:i + h], cols[j:j + w]) for i, j in torch.nonzero(kernel).tolist()]

        op = kron_operator(("defocus", float(radius), float(alias)), h, w, x.device, terms)
        return truncate255(apply_operator(op, x))
    kernel = _crop_support(disk_kernel(radius, alias, x.device))
    return truncate01(filter2d_reflect101(x / 255, kernel))


def gaussian_levels(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """``uint8(gaussian_filter(levels / 255) * 255)``: a Gaussian blur of 8-bit levels, truncated."""
    if use_operator(x):
        op = gaussian_operator(sigma, mode, truncate, x.shape[-2], x.shape[-1], x.device)
        return truncate255(apply_operator(op, x))
    return truncate01(gaussian_filter(x / 255, sigma, mode, truncate))


def gaussian_blur(x: torch.Tensor, sigma: float, generator=None) -> torch.Tensor:
    """scikit-image ``gaussian`` (mode 'nearest', truncate 4) per channel (deterministic)."""
    return gaussian_levels(x, sigma, "nearest", 4.0)


def glass_sources(height: int, width: int, delta: int, generator, batch: int, device) -> torch.Tensor:
    """Flat source index of every pixel after one pass of the reference's copy loop, per image (B, H*W).

    The loop visits rows ``H-delta .. delta+1`` and, within a row, columns ``W-delta .. delta+1``, both
    descending, and copies the pixel at ``p + (dy, dx)`` (dx, dy uniform on {-delta..delta-1}) into p.
    Every visited pixel is written once, so its final value is an original value at the end of a
    pointer chain: p inherits the final value of its source when the source was visited earlier (later
    row, or same row and later column), otherwise the source's original value. Chains are resolved by
    pointer jumping: ``nxt <- nxt[nxt]``, ``done <- done[nxt]`` until every pixel is done.
    """
    n = height * width
    lo_r, hi_r = delta + 1, height - delta         # scanned rows, inclusive
    lo_c, hi_c = delta + 1, width - delta
    nxt = torch.arange(n, device=device).repeat(batch, 1)
    done = torch.ones(batch, n, dtype=torch.bool, device=device)
    if hi_r < lo_r or hi_c < lo_c:
        return nxt
    rows = torch.arange(lo_r, hi_r + 1, device=device)
    cols = torch.arange(lo_c, hi_c + 1, device=device)
    offsets = torch.randint(-delta, delta, (batch, 2, rows.numel(), cols.numel()),
                            generator=generator, device=device)
    dx, dy = offsets[:, 0], offsets[:, 1]
    pr, pc = rows[None, :, None], cols[None, None, :]
    sr, sc = pr + dy, pc + dx
    in_region = (sr >= lo_r) & (sr <= hi_r) & (sc >= lo_c) & (sc <= hi_c)
    earlier = (sr > pr) | ((sr == pr) & (sc > pc))
    target = (pr * width + pc).expand(batch, -1, -1).reshape(batch, -1)
    nxt.scatter_(1, target, (sr * width + sc).reshape(batch, -1))
    done.scatter_(1, target, ~(in_region & earlier).reshape(batch, -1))
    while not bool(done.all()):
        owner_next, owner_done = nxt.gather(1, nxt), done.gather(1, nxt)
        nxt = torch.where(done, nxt, owner_next)
        done = done | owner_done
    return nxt


def glass_blur(x: torch.Tensor, c, generator) -> torch.Tensor:
    """Gaussian blur, truncate to uint8, locally shuffle pixels by the copy loop, blur again."""
    sigma, delta, iterations = c
    b, ch, h, w = x.shape
    levels = gaussian_levels(x, sigma, "nearest", 4.0)
    flat = levels.reshape(b, ch, h * w)
    for _ in range(iterations):
        src = glass_sources(h, w, delta, generator, b, x.device)
        flat = flat.gather(2, src[:, None, :].expand(-1, ch, -1))
    shuffled = flat.reshape(b, ch, h, w)
    return gaussian_levels(shuffled, sigma, "nearest", 4.0)


def _zoom_average(x: torch.Tensor, factors) -> torch.Tensor:
    acc = x.clone()
    for z in factors:
        acc += clipped_zoom(x, z)
    return acc / (len(factors) + 1)


def zoom_blur(x: torch.Tensor, factors, generator=None) -> torch.Tensor:
    """Average of the image and its central zooms by each factor (deterministic)."""
    if use_operator(x):
        h, w = x.shape[-2:]
        factors = tuple(float(z) for z in factors)

        def terms():   # the image itself, then each clipped zoom (separable: rows and columns alike)
            eye = [(torch.eye(h, dtype=torch.float64), torch.eye(w, dtype=torch.float64))]
            return eye + [(axis_matrix(lambda e: clipped_zoom(e, z), h, -2),
                           axis_matrix(lambda e: clipped_zoom(e, z), w, -1)) for z in factors]

        op = kron_operator(("zoom", factors), h, w, x.device, terms, divide=len(factors) + 1)
        return truncate255(apply_operator(op, x))
    return truncate01(_zoom_average(x / 255, factors))
