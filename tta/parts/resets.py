"""Reset policies: when the adapter returns to the source model on its own (METHODS.md 1.2)."""
from __future__ import annotations

import math
from typing import Optional

from ..errors import ConfigError
from .base import Part


class LossEMABelow(Part):
    """SAR's model recovery: reset when the EMA of the step's loss drops below ``threshold``.

    A loss that low means the model has collapsed onto confident (trivial) predictions. The EMA
    (``e <- 0.9 e + 0.1 L``, started at the first value) skips batches without a step and is
    cleared on every reset.
    """

    def __init__(self, threshold: float = 0.2):
        self.threshold = threshold
        self._ema: Optional[float] = None

    def reset(self) -> None:
        self._ema = None

    def __call__(self, adapter, loss_value: Optional[float]) -> bool:
        if loss_value is not None and math.isfinite(loss_value):
            self._ema = loss_value if self._ema is None else 0.9 * self._ema + 0.1 * loss_value
        return self._ema is not None and self._ema < self.threshold


class Periodic(Part):
    """RDumb: back to the source model every ``every`` adaptation steps (batches, with ``steps=1``),
    whatever happens; the count restarts at every reset (so also after a protocol reset)."""

    def __init__(self, every: int = 1000):
        if every < 1:
            raise ConfigError(f"Periodic reset needs every >= 1, got {every}")
        self.every = every
        self._count = 0

    def reset(self) -> None:
        self._count = 0

    def __call__(self, adapter, loss_value: Optional[float]) -> bool:
        self._count += 1
        return self._count >= self.every
