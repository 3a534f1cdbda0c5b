"""Building blocks shared by the corruption operations.

Every operation works on a float64 tensor ``x`` of shape (B, 3, H, W) holding the *integer* pixel values
0..255 of the reference's 8-bit image and returns float64 values in [0, 255] that are already cut to
integers with the reference's truncating ``uint8`` cast. float64 is used because the reference computes
in float64 (NumPy) and the final truncation turns tiny precision differences into whole-level ones.

Boundary modes follow docs/METHODS.md 4.5.5: SciPy/scikit-image ``nearest`` = replicate, SciPy
``reflect`` = half-sample symmetric, OpenCV's default ``BORDER_REFLECT_101`` = SciPy ``mirror``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Hashable

import torch
import torch.nn.functional as F

# Tolerance (in 0..255 units) of the truncating casts. Float32 inputs on the 1/255 grid are off the grid by
# up to ~2e-5 levels, so inputs snap with 1e-3; outputs use 1e-6 so that a value the reference would make
# exactly k but our different operation order makes k - 1 ulp still gives k.
INPUT_EPS = 1e-3
OUTPUT_EPS = 1e-6


def to_levels(x01: torch.Tensor, check=None) -> torch.Tensor:
    """[0, 1] floats -> float64 integer levels 0..255, truncating like torchvision's ToPILImage.

    The result is contiguous (NCHW) whatever the input's layout: a batch made by ``permute`` from NHWC
    images would otherwise carry its strides through every operation of the corruption (about 2x slower).
    ``check(lo, hi)``, when given, is called with the smallest and largest input value (NaN when there is
    one), taken from the scaled copy in one pass: ``255 * x`` is exact in float64 for float32 and narrower
    inputs, so ``lo / 255`` and ``hi / 255`` are the input's own extremes. A checked input lies in [0, 1], so
    the final clamp is skipped."""
    levels = x01.to(torch.float64, memory_format=torch.contiguous_format, copy=True).mul_(255)
    if check is not None and levels.numel():
        lo, hi = (float(v) / 255 for v in torch.aminmax(levels))
        check(lo, hi)
        return torch.floor_(levels.add_(INPUT_EPS))
    return torch.floor_(levels.add_(INPUT_EPS)).clamp_(0, 255)


def truncate255(v: torch.Tensor) -> torch.Tensor:
    """Values in 0..255 units -> clipped and truncated to integers (the reference's ``np.uint8`` cast).

    ``floor(v + eps)`` clamped to 0..255 equals ``floor(clip(v, 0, 255) + eps)`` value for value (inside the
    range it is the same operation; outside, both give 0 or 255), in three passes instead of four."""
    return torch.add(v, OUTPUT_EPS).floor_().clamp_(0, 255)


def truncate01(v: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] -> ``uint8(clip(v, 0, 1) * 255)`` as float64 levels (clipping after the scaling
    gives the same values: ``clip(v, 0, 1) * 255`` is ``v * 255`` inside the range, 0 or 255 outside)."""
    return torch.mul(v, 255).add_(OUTPUT_EPS).floor_().clamp_(0, 255)


def pad_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source indices for padding a length-``n`` axis; works for pads wider than the axis itself.

    ``nearest`` clamps, ``reflect`` is half-sample symmetric (period 2n), ``mirror`` is whole-sample
    symmetric / reflect-101 (period 2n-2).
    """
    i = torch.arange(-before, n + after, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect":
        m = i.remainder(2 * n)
        return torch.where(m < n, m, 2 * n - 1 - m)
    if mode == "mirror":
        if n == 1:
            return torch.zeros_like(i)
        m = i.remainder(2 * n - 2)
        return torch.where(m < n, m, 2 * n - 2 - m)
    raise ValueError(f"unknown boundary mode {mode!r}")


def correlate1d(x: torch.Tensor, kernel: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """Correlate along ``dim`` (-1 or -2) with an odd-length kernel, padding with boundary ``mode``."""
    k = kernel.numel()
    r = k // 2
    if k == 1:
        return x * kernel[0]
    n = x.shape[dim]
    xp = x.index_select(dim, pad_index(n, r, r, mode, x.device))
    if k <= 31:
        out = kernel[0] * xp.narrow(dim, 0, n)
        for t in range(1, k):
            out = out + kernel[t] * xp.narrow(dim, t, n)
        return out
    moved = xp.movedim(dim, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, shape[-1])
    out = F.conv1d(flat, kernel.to(flat.dtype).view(1, 1, -1)).reshape(*shape[:-1], n)
    return out.movedim(-1, dim)


def gaussian_kernel(sigma: float, truncate: float, device, dtype=torch.float64) -> torch.Tensor:
    """SciPy's 1-D Gaussian: radius ``int(truncate*sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """scikit-image ``filters.gaussian`` / SciPy ``gaussian_filter`` over the last two axes only."""
    if sigma <= 1e-15:
        return x
    k = gaussian_kernel(sigma, truncate, x.device, x.dtype)
    return correlate1d(correlate1d(x, k, -2, mode), k, -1, mode)


def zoom_crop_size(size: int, z: float) -> int:
    """``ceil(size / z)`` in float64, as the reference computes it (z = 1.12 sits on a boundary)."""
    return int(math.ceil(size / z))


def clipped_zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """The reference's ``clipped_zoom``: central crop of side ceil(S/z), SciPy ``zoom(order=1)``, trim.

    SciPy's order-1 zoom equals bilinear interpolation with ``align_corners=True`` to the size
    ``round(side * z)`` (METHODS.md 4.5.5). Works on (B, C, H, W).
    """
    h, w = x.shape[-2:]
    ch, cw = zoom_crop_size(h, z), zoom_crop_size(w, z)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    oh, ow = int(round(ch * z)), int(round(cw * z))
    zoomed = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)
    th, tw = (oh - h) // 2, (ow - w) // 2
    return zoomed[..., th:th + h, tw:tw + w]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """scikit-image ``rgb2hsv`` on (B, 3, H, W) in [0, 1], including its tie order (blue > green > red)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.amax(1)
    delta = v - x.amin(1)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    s = torch.where(delta == 0, torch.zeros_like(v), delta / torch.where(v == 0, torch.ones_like(v), v))
    h = (g - b) / safe
    h = torch.where(g == v, 2.0 + (b - r) / safe, h)
    h = torch.where(b == v, 4.0 + (r - g) / safe, h)
    h = torch.remainder(h / 6.0, 1.0)
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    return torch.stack((h, s, v), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """scikit-image ``hsv2rgb`` on (B, 3, H, W)."""
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = hi.remainder(6).long().unsqueeze(1)
    choices = torch.stack([
        torch.stack((v, t, p), 1), torch.stack((q, v, p), 1), torch.stack((p, v, t), 1),
        torch.stack((p, q, v), 1), torch.stack((t, p, v), 1), torch.stack((v, p, q), 1)], 0)
    return choices.gather(0, sector.unsqueeze(0).expand(1, -1, 3, -1, -1)).squeeze(0)


def rand_uniform(shape, low: float, high: float, generator, device) -> torch.Tensor:
    """U(low, high) in float64 from ``generator``."""
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64) * (high - low) + low


def rand_below(high: torch.Tensor, generator) -> torch.Tensor:
    """One integer uniform on {0, ..., high[i]-1} per entry of ``high`` (a long tensor)."""
    u = torch.rand(high.shape, generator=generator, device=high.device, dtype=torch.float64)
    return torch.minimum((u * high).long(), high - 1)


# Largest image (H * W pixels) for which a fixed linear filter is applied as one precomputed sparse
# (H*W, H*W) matrix. At 32 x 32 that matrix has a few thousand to a few ten thousand non-zeros and one
# sparse-dense product replaces dozens of shifted-copy passes; bigger images keep the direct code.
SPARSE_MAX_PIXELS = 48 * 48


_OPERATORS: dict = {}


def _cached_operator(cache_key, device, make_dense: Callable) -> torch.Tensor:
    op = _OPERATORS.get(cache_key)
    if op is None:
        with warnings.catch_warnings():          # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            op = make_dense().to_sparse_csr().to(device)
        if len(_OPERATORS) >= 64:
            _OPERATORS.clear()
        _OPERATORS[cache_key] = op
    return op


def linear_operator(key: Hashable, height: int, width: int, device, build: Callable) -> torch.Tensor:
    """The fixed linear map ``build`` on (B, 1, H, W) float64 images as a sparse CSR (H*W, H*W) matrix.

    ``build`` is the direct implementation itself, applied once to the H*W basis images, so the matrix
    holds exactly its weights (boundary handling included); the result differs from ``build(x)`` only by
    float64 summation order (~1e-13 of a level here). Cached per ``key`` (which must identify ``build``
    and its constants), size and device.
    """
    def make_dense():
        n = height * width
        basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, height, width)
        return build(basis).reshape(n, n).T.contiguous()    # column j = image of the j-th basis pixel

    return _cached_operator(("basis", key, int(height), int(width), str(torch.device(device))), device, make_dense)


def axis_matrix(build: Callable, n: int, dim: int) -> torch.Tensor:
    """(n, n) matrix of a linear map that acts along one axis (``dim`` -2: rows, -1: columns) only.

    ``build`` is applied to the n basis images of shape (n, 1, n, 1) or (n, 1, 1, n); it must leave a
    length-1 other axis alone.
    """
    shape = (n, 1, n, 1) if dim == -2 else (n, 1, 1, n)
    return build(torch.eye(n, dtype=torch.float64).reshape(shape)).reshape(n, n).T.contiguous()


def kron_operator(key: Hashable, height: int, width: int, device, terms: Callable,
                  divide: float = 1.0) -> torch.Tensor:
    """Like ``linear_operator`` for a sum of separable maps: ``terms()`` gives (row matrix, column matrix)
    pairs (from ``axis_matrix``), the operator is the sum of their Kronecker products divided by ``divide``.
    Much cheaper to build than applying the map to all H*W basis images."""
    def make_dense():
        rows, cols = zip(*terms())
        rows, cols = torch.stack(rows), torch.stack(cols)            # (T, H, H), (T, W, W)
        total = torch.einsum("tab,tcd->acbd", rows, cols).reshape(height * width, height * width)
        return total / divide if divide != 1.0 else total

    return _cached_operator(("kron", key, int(height), int(width), str(torch.device(device))), device, make_dense)


def gaussian_operator(sigma: float, mode: str, truncate: float, height: int, width: int, device) -> torch.Tensor:
    """``gaussian_filter(., sigma, mode, truncate)`` on (H, W) images as a cached sparse operator."""
    def terms():
        if sigma <= 1e-15:
            return [(torch.eye(height, dtype=torch.float64), torch.eye(width, dtype=torch.float64))]
        k = gaussian_kernel(sigma, truncate, "cpu")
        return [(axis_matrix(lambda e: correlate1d(e, k, -2, mode), height, -2),
                 axis_matrix(lambda e: correlate1d(e, k, -1, mode), width, -1))]

    return kron_operator(("gaussian", float(sigma), mode, float(truncate)), height, width, device, terms)


def apply_operator(op: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply an (H*W, H*W) operator from ``linear_operator`` to every channel of (B, C, H, W) float64.

    The result is a transposed view (pixel-major strides); a caller that goes on to gather or to run many
    operations on it should make it contiguous first, one that only truncates and stores it need not."""
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).T.contiguous()
    return (op @ flat).T.reshape(b, c, h, w)


def use_operator(x: torch.Tensor) -> bool:
    """Whether images of this size take the sparse-operator path (float64 only)."""
    return x.dtype == torch.float64 and x.shape[-2] * x.shape[-1] <= SPARSE_MAX_PIXELS
