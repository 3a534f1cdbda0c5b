"""Update steps: how a computed loss turns into a parameter update.

A step returns the loss value it optimised (a float) or ``None`` when it took no step. A batch in which
every sample was filtered out takes no step and leaves the optimizer state untouched; a non-finite loss
is skipped the same way and counted (the divergence guard).
"""
from __future__ import annotations

from typing import Optional

from .base import Part


class PlainStep(Part):
    """One backward pass and one optimizer step."""

    def __call__(self, adapter, x, out) -> Optional[float]:
        if not adapter.should_step(out):
            return None
        adapter.backward(out.loss)
        adapter.optimizer_step()
        return out.loss_value
