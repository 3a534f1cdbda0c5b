"""Source data for the methods that use it (RMT's warm-up and replay, GTTA's replay; METHODS-ZOO Z.0.4
item 6): checked once, then handed out in shuffled batches for as long as a method asks.

Source data arrive as tensors: images ``(N, C, H, W)``, uint8 (converted to float in [0, 1] batch by
batch, so a large set costs a quarter of the memory) or float in [0, 1], and int64 labels ``(N,)``.
In YAML they are a ``{dataset, n}`` mapping that the runner turns into these tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import ConfigError
from .base import Part


def check_source(method: str, images: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None,
                 need_labels: bool = True) -> None:
    """One clear error for missing or malformed source data of ``method``."""
    what = "source_images and source_labels" if need_labels else "source_images"
    if images is None or (need_labels and labels is None):
        raise ConfigError(f"{method} needs source data: pass {what} (clean training images as a uint8 or "
                          f"float NCHW tensor{', and their int64 labels' if need_labels else ''}), or in YAML "
                          "method.source: {dataset: cifar10_train, n: 10000}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0 or \
            not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ConfigError(f"{method}: source_images must be a non-empty uint8 or float (N, C, H, W) tensor, got "
                          f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (len(images),):
            raise ConfigError(f"{method}: source_labels must be an int64 tensor of shape ({len(images)},), got "
                              f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {tuple(getattr(labels, 'shape', ()))}")


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x


class SourceBatches(Part):
    """Labelled source images in shuffled batches, forever: each pass over the set is a fresh permutation
    (a DataLoader with ``shuffle=True, drop_last=False``, the last batch of a pass may be smaller), drawn
    from a generator seeded with ``seed``.

    ``mark()`` makes the current position the reset point (RMT marks it after its warm-up, which its
    reset keeps); ``reset()`` returns there, so a reset adapter replays the same source batches.
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ConfigError(f"source batch size must be >= 1, got {batch_size}")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0
        self.mark()

    def mark(self) -> None:
        self._mark = (self.generator.get_state(), self._order, self._pos)

    def reset(self) -> None:
        state, self._order, self._pos = self._mark
        self.generator.set_state(state)

    def next(self, device=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The next batch: float images in [0, 1] on ``device`` and their labels (None without labels)."""
        if self._pos >= len(self._order):
            self._order, self._pos = torch.randperm(len(self.images), generator=self.generator), 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += len(idx)
        x = as_float(self.images[idx].to(device))
        y = None if self.labels is None else self.labels[idx].to(device)
        return x, y

    def __repr__(self):
        return f"SourceBatches(n={len(self.images)}, batch_size={self.batch_size})"
