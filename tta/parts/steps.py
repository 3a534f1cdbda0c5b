"""Update steps: how a computed loss turns into a parameter update.

A step returns the loss value it optimised (a float) or ``None`` when it took no step. A batch in which
every sample was filtered out takes no step and leaves the optimizer state untouched; a non-finite loss
is skipped the same way and counted (the divergence guard).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Part


class PlainStep(Part):
    """One backward pass and one optimizer step."""

    def __call__(self, adapter, x, out) -> Optional[float]:
        if not adapter.should_step(out):
            return None
        adapter.backward(out.loss)
        adapter.optimizer_step()
        return out.loss_value


class SAM(Part):
    """SAR's sharpness-aware step (non-adaptive SAM around the adapter's optimizer).

    1. backward on ``L1`` over the selected set ``S1`` -> ``g``;
    2. ``theta' = theta + rho * g / (||g||_2 + 1e-12)`` (global norm over all adapted tensors);
    3. second forward at ``theta'`` restricted to ``S1`` and filtered again (``S2``), without moving
       any filter state; backward on ``L2`` -> ``g'``;
    4. restore ``theta`` exactly and let the optimizer step with ``g'``.
    Returns ``L2``; no step at all when ``S1`` or ``S2`` is empty (or a loss is not finite).
    """

    def __init__(self, rho: float = 0.05):
        self.rho = rho

    def __call__(self, adapter, x, out) -> Optional[float]:
        if not adapter.should_step(out):
            return None
        adapter.backward(out.loss)
        params = [p for p in adapter.params if p.grad is not None]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            scale = self.rho / (norm + 1e-12)
            for p in params:
                p.add_(p.grad * scale)
        adapter.optimizer.zero_grad(set_to_none=True)
        second = adapter.compute_loss(x, within=out.mask, update_state=False)
        stepped = adapter.should_step(second)
        if stepped:
            adapter.backward(second.loss)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        if not stepped:
            adapter.optimizer.zero_grad(set_to_none=True)
            return None
        adapter.optimizer_step()
        return second.loss_value
