"""Gradient transforms: ``t(adapter)`` edits ``p.grad`` of ``adapter.params`` before the optimizer step.

``SubspaceProjection`` is LCoTTA's (METHODS.md 3.10): project each update onto the principal subspace
of recent gradients, where entropy-truthful samples agree, and drop the scattered rest.
"""
from __future__ import annotations

from collections import deque
from typing import List, Optional

import torch

from ..errors import ConfigError
from .base import Part


class SubspaceProjection(Part):
    """Keep a FIFO window of raw gradients and project the current gradient onto its top-``k`` PCA directions.

    * ``g`` = the gradients of all adapted parameters, flattened into one vector (a missing gradient
      counts as zeros);
    * ``t`` counts the calls (the gradient steps this transform has seen, from 0); at ``t % every == 0``
      with ``t > 0`` the raw ``g`` is appended to the window, which keeps the last ``window`` of them;
    * once the window holds ``>= k`` gradients: centre them (subtract their mean), take the top-``k``
      right singular vectors ``U`` (k x d, orthonormal rows) of the thin SVD, and replace ``g`` by
      ``U^T (U g)``; before that the gradient passes unchanged (a plain step).

    The basis changes only when the window does, so the SVD runs once per append (on the parameters'
    device) and is cached in between; LCoTTA's code recomputes the same PCA at every batch. The window
    is centred as in that code, so the mean gradient need not lie in the subspace.
    """

    def __init__(self, k: int = 25, every: int = 50, window: int = 100):
        if not (k >= 1 and every >= 1 and window >= k):
            raise ConfigError(f"subspace projection needs k >= 1, every >= 1 and window >= k; got k={k}, "
                              f"every={every}, window={window}")
        self.k, self.every, self.window = k, every, window
        self.reset()

    def reset(self) -> None:
        self._grads: deque = deque(maxlen=self.window)
        self._basis: Optional[torch.Tensor] = None
        self.t = 0
        self.svd_calls = 0

    @property
    def stored(self) -> List[torch.Tensor]:
        """The window's gradients, oldest first."""
        return list(self._grads)

    def basis(self) -> Optional[torch.Tensor]:
        """The current (k, d) basis, computed from the window when it changed; None before k entries."""
        if len(self._grads) < self.k:
            return None
        if self._basis is None:
            stacked = torch.stack(list(self._grads))
            _, _, vh = torch.linalg.svd(stacked - stacked.mean(0, keepdim=True), full_matrices=False)
            self._basis = vh[: self.k]
            self.svd_calls += 1
        return self._basis

    def project(self, g: torch.Tensor) -> torch.Tensor:
        u = self.basis()
        return g if u is None else u.T @ (u @ g)

    @torch.no_grad()
    def __call__(self, adapter) -> None:
        params = adapter.params
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        if self.t > 0 and self.t % self.every == 0:
            self._grads.append(g.clone())
            self._basis = None
        self.t += 1
        projected = self.project(g)
        if projected is g:
            return
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = projected[offset: offset + n].view_as(p).clone()
            offset += n

    def __repr__(self):
        return f"SubspaceProjection(k={self.k}, every={self.every}, window={self.window})"
