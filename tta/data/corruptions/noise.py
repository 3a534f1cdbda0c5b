"""Per-pixel noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle.

Each element (pixel and channel) is perturbed independently, exactly as in the reference; only the random
number generator differs (a ``torch.Generator`` instead of NumPy's unseeded global state), so results
match the reference in distribution, not bit for bit. Signature of every op here:
``op(x, c, generator)`` with ``x`` float64 levels 0..255 (B, 3, H, W) and ``c`` the severity constant.

Sampling, for speed (the distributions are exactly the reference's):

* Gaussian draws are float32 (``torch.randn`` is about twice as fast); the arithmetic after the draw is
  float64 in 8-bit level units. Quantising a N(0, 1) draw to 24 bits changes nothing measurable.
* Poisson draws use the inverse CDF instead of ``torch.poisson`` (about 4x slower on CPU): the rate
  ``x * scale`` takes only 256 values (one per 8-bit level) and every count >= ``scale`` is clipped to
  white, so each level needs a CDF over ``ceil(scale) + 1`` outcomes. One float64 uniform per element is
  looked up in a (level, 2048 uniform bins) table of outcomes; the ~1 % of bins that straddle a CDF step
  are resolved exactly by ``searchsorted`` in that level's CDF.
* Salt and pepper takes one uniform per element: ``u < amount / 2`` salt, ``u < amount`` pepper.
"""
from __future__ import annotations

import functools
import math

import torch

from ._core import truncate01, truncate255

POISSON_BINS = 2048


def gaussian_noise(x: torch.Tensor, sigma: float, generator) -> torch.Tensor:
    """``clip(x + N(0, sigma^2))``."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return truncate255(torch.add(x, noise.to(x.dtype), alpha=255 * float(sigma)))


@functools.lru_cache(maxsize=16)
def _poisson_tables(scale: float, device: str):
    """CDFs (256, K+1) of min(Poisson(level / 255 * scale), K) with K = ceil(scale), the output level of
    each count (K+1,), and the bin table (256 * POISSON_BINS,) of output levels (-1: bin needs a search)."""
    k_max = max(int(math.ceil(scale)), 1)
    lam = torch.arange(256, dtype=torch.float64) / 255 * scale
    k = torch.arange(k_max, dtype=torch.float64)
    logp = k[None] * torch.log(lam[:, None].clamp_min(1e-300)) - lam[:, None] - torch.lgamma(k + 1)[None]
    pmf = torch.exp(logp)
    pmf[0] = 0
    pmf[0, 0] = 1                                   # rate 0: always 0
    cdf = torch.cat((torch.cumsum(pmf, 1).clamp_(max=1), torch.ones(256, 1, dtype=torch.float64)), 1)
    out_level = truncate01(torch.arange(k_max + 1, dtype=torch.float64) / scale)   # as poisson(.) / scale
    edges = torch.arange(POISSON_BINS + 1, dtype=torch.float64) / POISSON_BINS
    # For u in [b/G, (b+1)/G) the count #{j: cdf[j] <= u} lies in [lo, hi]; the bin is decided if lo == hi.
    lo = torch.searchsorted(cdf, edges[:-1].expand(256, -1).contiguous(), right=True)
    hi = torch.searchsorted(cdf, edges[1:].expand(256, -1).contiguous(), right=False)
    table = torch.where(lo == hi, out_level[lo.clamp(max=k_max)], torch.full_like(out_level[lo], -1.0))
    return cdf.to(device), out_level.to(device), table.to(torch.int16).reshape(-1).to(device)


def shot_noise(x: torch.Tensor, scale: float, generator) -> torch.Tensor:
    """``clip(Poisson(x * scale) / scale)``: photon noise whose variance grows with brightness."""
    cdf, out_level, table = _poisson_tables(float(scale), str(x.device))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    levels = x.to(torch.long)
    index = (u * POISSON_BINS).to(torch.long).add_(levels, alpha=POISSON_BINS)
    out = table.index_select(0, index.reshape(-1)).to(x.dtype)
    open_bins = (out < 0).nonzero()[:, 0]
    if open_bins.numel():
        rows = cdf.index_select(0, levels.reshape(-1).index_select(0, open_bins))
        count = torch.searchsorted(rows, u.reshape(-1).index_select(0, open_bins)[:, None], right=True)[:, 0]
        out.index_copy_(0, open_bins, out_level.index_select(0, count))
    return out.reshape(x.shape)


def impulse_noise(x: torch.Tensor, amount: float, generator) -> torch.Tensor:
    """scikit-image ``random_noise(mode='s&p')``: each element flips with prob. ``amount`` to 0 or 1."""
    u = torch.rand(x.shape, generator=generator, device=x.device)
    out = x.masked_fill(u < amount, 0.0)
    return out.masked_fill_(u < amount / 2, 255.0)


def speckle_noise(x: torch.Tensor, sigma: float, generator) -> torch.Tensor:
    """``clip(x + x * N(0, sigma^2))``: multiplicative noise."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return truncate255(x + x * (float(sigma) * noise.to(x.dtype)))
