"""Snapshots of the adapted tensors as one flat vector, and their uniform average (WATT, METHODS-VLM V.10).

WATT adapts the visual LayerNorms once per text template, keeps each result and loads their average
``theta_bar = (1/T) sum_t theta_t``. The adapted tensors are few and small (LayerNorm affine), so a snapshot
is one concatenated copy and the average one pass over T vectors, instead of per-tensor dictionaries.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError


def snapshot(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A detached copy of ``params`` concatenated into one vector (in their order)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


@torch.no_grad()
def load(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a :func:`snapshot` back into ``params``, in place (optimizer references stay valid)."""
    sizes = [p.numel() for p in params]
    if sum(sizes) != flat.numel():
        raise ConfigError(f"snapshot of {flat.numel()} values does not fit parameters of {sum(sizes)} values")
    for p, part in zip(params, flat.split(sizes)):
        p.copy_(part.view_as(p))


def average(snapshots: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(1/T) sum_t s_t``, summed in order then divided (as the reference averages its snapshots)."""
    if not snapshots:
        raise ConfigError("nothing to average: no snapshot was taken")
    total = snapshots[0].clone()
    for s in snapshots[1:]:
        total += s
    return total / len(snapshots)


__all__ = ["snapshot", "load", "average"]
