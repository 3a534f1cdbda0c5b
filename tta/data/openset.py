"""Open-set streams: in-distribution batches with OOD images mixed in at a fixed ratio, flagged per sample.

The OOD images come from any tensor the caller has (a second data set, a folder). Offline choices
provided here, since no second data set ships with the toolkit's data folder:

* :func:`split_classes` — hold some CIFAR-10 classes out as "unknown" (semantic shift, the harder and
  more realistic case: same image statistics, new classes);
* :func:`synthetic_ood` — smooth random colour fields (covariate + semantic shift, an easy sanity case).
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def split_classes(x: torch.Tensor, y: torch.Tensor, ood_classes: Sequence[int]):
    """``(x_id, y_id, x_ood)``: images of ``ood_classes`` become OOD; ID labels are re-indexed 0..K-1 in
    the order of the remaining classes (so a classifier over the remaining names can be scored)."""
    ood = torch.isin(y, torch.as_tensor(list(ood_classes)))
    keep = sorted(set(y.unique().tolist()) - set(ood_classes))
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    return x[~ood], remap[y[~ood]], x[ood]


def synthetic_ood(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 images (n, 3, size, size): 4x4 random colour grids upsampled bicubically (smooth blobs)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (img * 255).round().to(torch.uint8)


def mix_ood(x_id: torch.Tensor, y_id: torch.Tensor, x_ood: torch.Tensor, batch_size: int,
            ood_ratio: float = 0.5, seed: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``(x, y, is_ood)`` of ``batch_size`` images of which ``round(ood_ratio * batch_size)`` are
    OOD (label -1), shuffled within the batch. ID images are taken in order, OOD images cycle if fewer.
    Ends when the ID images run out (a last partial batch keeps the ratio)."""
    if not 0 <= ood_ratio < 1:
        raise ConfigError(f"ood_ratio must be in [0, 1), got {ood_ratio}")
    if len(x_ood) == 0 and ood_ratio > 0:
        raise ConfigError("mix_ood needs at least one OOD image")
    g = torch.Generator().manual_seed(seed)
    n_ood = round(ood_ratio * batch_size)
    n_id = batch_size - n_ood
    ood_order = torch.randperm(len(x_ood), generator=g) if len(x_ood) else torch.zeros(0, dtype=torch.long)
    taken = 0
    for start in range(0, len(x_id), n_id):
        xi, yi = x_id[start:start + n_id], y_id[start:start + n_id]
        k = round(len(xi) * n_ood / n_id)
        idx = ood_order[(taken + torch.arange(k)) % max(1, len(x_ood))]
        taken += k
        x = torch.cat([xi, x_ood[idx]])
        y = torch.cat([yi, torch.full((k,), -1, dtype=torch.long)])
        perm = torch.randperm(len(x), generator=g)
        yield x[perm], y[perm], (y[perm] < 0)
