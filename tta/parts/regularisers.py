"""Regularisers: ``r(adapter) -> scalar`` added to the loss (METHODS.md 3.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Part


class FisherAnchor(Part):
    """EATA's anti-forgetting term ``alpha * sum_j F_j (theta_j - theta0_j)^2``.

    ``F`` is estimated once, in ``bind``, from clean in-distribution images exactly as EATA does: the
    model in its TTA configuration, cross-entropy against its own arg-max pseudo-labels per mini-batch,
    and ``F_j`` = the mean over mini-batches of the *squared mini-batch-mean* gradient (not a per-sample
    Fisher). Gradients come from ``torch.autograd.grad`` and buffers are restored, so nothing is left
    behind on the model. ``theta0`` is the adapted parameters' value at bind time (the source).

    ``data``: float images in [0, 1], (N, C, H, W); ``n`` of them are used (a seeded random subset when
    there are more).
    """

    def __init__(self, data: torch.Tensor, alpha: float, n: int = 2000, batch_size: int = 64, seed: int = 0):
        self.data, self.alpha, self.n, self.batch_size, self.seed = data, alpha, n, batch_size, seed
        self.fisher = self.anchor = None

    def bind(self, adapter) -> None:
        data = self.data
        if len(data) > self.n:
            data = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))[: self.n]]
        model, params = adapter.model, adapter.params
        buffers = [b.detach().clone() for b in model.buffers()]
        fisher = [torch.zeros_like(p) for p in params]
        batches = 0
        for i in range(0, len(data), self.batch_size):
            logits = model(data[i: i + self.batch_size].to(adapter.device))
            loss = F.cross_entropy(logits, logits.argmax(1).detach())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f.add_(g.detach() ** 2)
            batches += 1
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        self.fisher = [f / max(batches, 1) for f in fisher]
        self.anchor = [p.detach().clone() for p in params]
        self.data = None  # the images are not needed any more

    def __call__(self, adapter) -> torch.Tensor:
        return self.alpha * sum((f * (p - a) ** 2).sum() for f, p, a in zip(self.fisher, adapter.params, self.anchor))

    def __repr__(self):
        return f"FisherAnchor(alpha={self.alpha}, n={self.n}, batch_size={self.batch_size}, seed={self.seed})"
