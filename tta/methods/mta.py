"""MTA (Zanella & Ben Ayed, CVPR 2024; METHODS-VLM V.5): MeanShift for test-time augmentation. Per image, the
prediction is the text similarity of a robust mode ``m`` of its 64 crop-flip view embeddings, every view
taking part with an inlierness weight ``y_i`` (no confidence selection).

For the unit-norm view features ``x_i`` (view 0 the original) and their logits ``L = s X W^T``:

* per-point bandwidth ``h_i = sqrt(mean of the squared distances to its k = floor(0.3 (N - 1)) nearest other
  points / 2)``; Gaussian kernel ``kappa_i(m) = exp(-|x_i - m|^2 / (2 h_i^2))``;
* affinity ``A = softmax(L) softmax(L)^T``, fixed; ``y = 1/N``, ``m = x_0``;
* ``outer`` times: (a) with ``kappa`` at the current mode, up to ``inner`` updates
  ``y <- softmax_i((kappa_i + lambda_q sum_j A_ij y_j) / lambda_y)``, stopping once ``|y - y_prev| < tol``;
  (b) up to ``inner`` updates ``m <- sum_i kappa_i(m) y_i x_i / sum_i kappa_i(m) y_i``, re-normalised,
  stopping once ``|m - m_prev| < tol`` (the update that converges is kept, as in the official loop);
* output ``s W^T m``.

Defaults are the official script's (lambda_y 0.2, lambda_q 4, 30 % neighbours, 5 x 5 x 5 iterations, tol
1e-6). The official code runs the encoder under fp16 autocast; here the features are those of the
classifier as it is (fp32 unless the user casts it). All images of a batch are solved at once, each one
stopping its inner loops on its own criterion, so a batch gives what one image at a time gives. The
paper's "MTA + Ensemble" is the ``templates: ensemble`` option (not in the released code).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from . import Cost, register
from .view_adapter import ViewAdapter, view_recipe


def bandwidths(x: torch.Tensor, neighbours: float = 0.3) -> torch.Tensor:
    """``(B, N)`` per-point bandwidths of the points ``x`` ``(B, N, D)`` (see module docstring); the official
    ``cdist`` distances, sorted, the first (the point itself) dropped."""
    n = x.shape[1]
    k = max(1, int(neighbours * (n - 1)))
    dist = torch.cdist(x, x).sort(-1).values[..., 1:k + 1]
    return (0.5 * dist.square().mean(-1)).sqrt()


def kernel(x: torch.Tensor, mode: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` ``exp(-|x_i - m|^2 / (2 h_i^2))`` for the modes ``m`` ``(B, D)``."""
    return torch.exp(-(x - mode.unsqueeze(1)).square().sum(-1) / (2 * h.square()))


def mta_mode(x: torch.Tensor, logits: torch.Tensor, lambda_y: float = 0.2, lambda_q: float = 4.0,
             neighbours: float = 0.3, outer: int = 5, inner: int = 5, tol: float = 1e-6):
    """The modes ``(B, D)`` and inlierness ``(B, N)`` of the views ``x`` ``(B, N, D)`` with logits ``(B, N, C)``."""
    b, n, _ = x.shape
    if n == 1:
        return x[:, 0], x.new_ones(b, 1)
    h = bandwidths(x, neighbours).clamp_min(1e-12)  # zero only for duplicate views
    p = logits.softmax(-1)
    affinity = p @ p.transpose(1, 2)
    y = x.new_full((b, n), 1.0 / n)
    mode = x[:, 0]
    for _ in range(outer):
        kappa = kernel(x, mode, h)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        for _ in range(inner):
            new = ((kappa + lambda_q * (affinity @ y.unsqueeze(-1)).squeeze(-1)) / lambda_y).softmax(-1)
            moved = (new - y).norm(dim=-1)
            y = torch.where(active.unsqueeze(-1), new, y)
            active = active & (moved >= tol)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        for _ in range(inner):
            w = kernel(x, mode, h) * y
            total = w.sum(-1, keepdim=True)
            new = (w.unsqueeze(-1) * x).sum(1) / total.clamp_min(torch.finfo(x.dtype).tiny)
            new = new / new.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            new = torch.where(total > 0, new, mode)  # every weight underflowed: the mode stays
            moved = (new - mode).norm(dim=-1)
            mode = torch.where(active.unsqueeze(-1), new, mode)
            active = active & (moved >= tol)
    return mode, y


class MTAAdapter(ViewAdapter):
    def __init__(self, model, recipe, *, lambda_y: float = 0.2, lambda_q: float = 4.0, neighbours: float = 0.3,
                 outer: int = 5, inner: int = 5, tol: float = 1e-6, **kw):
        if lambda_y <= 0 or lambda_q < 0 or not 0 < neighbours <= 1 or outer < 1 or inner < 1 or tol < 0:
            raise ConfigError(f"mta needs lambda_y > 0, lambda_q >= 0, 0 < neighbours <= 1, outer and inner >= 1, "
                              f"tol >= 0; got {lambda_y}, {lambda_q}, {neighbours}, {outer}, {inner}, {tol}")
        super().__init__(model, recipe, **kw)
        self.solver = dict(lambda_y=lambda_y, lambda_q=lambda_q, neighbours=neighbours, outer=outer, inner=inner,
                           tol=tol)

    def aggregate(self, features: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        mode, y = mta_mode(features, scale * features @ text.t(), **self.solver)
        self.last_inlierness = y
        return scale * mode @ text.t()


@register("mta", summary="text similarity of the inlierness-weighted MeanShift mode of 64 crop-flip views",
          adapts="nothing", cost=Cost(nograd=64, params="none"), requires="clip")
def mta(model, *, views: int = 64, lambda_y: float = 0.2, lambda_q: float = 4.0, neighbours: float = 0.3,
        outer: int = 5, inner: int = 5, tol: float = 1e-6, policy: str = "crop_flip", templates=None,
        chunk: int = 8, view_options=None):
    """``lambda_y``: entropic weight of the inlierness; ``lambda_q``: weight of the affinity term; ``neighbours``:
    fraction of the other views for the bandwidths; ``outer``, ``inner``, ``tol``: iterations and stopping
    threshold; ``policy``: views (crop-flip on every data set in the official code); ``templates``: None = the
    classifier's prompts (``single`` officially); ``chunk``: images per encoder forward (memory only)."""
    return view_recipe(MTAAdapter, views=views, lambda_y=lambda_y, lambda_q=lambda_q, neighbours=neighbours,
                       outer=outer, inner=inner, tol=tol, policy=policy, templates=templates, chunk=chunk,
                       view_options=view_options)
