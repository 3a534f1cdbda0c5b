"""Model wrappers shared by every model family: every model the toolkit hands out takes images in [0, 1]."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """Apply ``(x - mean) / std`` then the wrapped network, so callers always pass [0, 1] images.

    The statistics are buffers (they follow ``.to(device)``) but are not persistent, so the wrapped
    network's state dict keys stay those of the original checkpoint under the ``net.`` prefix.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
