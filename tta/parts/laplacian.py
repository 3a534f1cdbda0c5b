"""Laplacian-regularised output correction of LAME (METHODS-ZOO Z.5): a post-processor on one batch's
``(features, logits)`` that smooths the predictions over a feature-space affinity graph, with no change to
the network.

The problem solved per batch is ``min_Y sum_i KL(y_i || p_i) - lam * sum_ij W_ij y_i . y_j`` over rows of
probabilities Y; its concave-convex bound gives the fixed-point update ``Y <- row-softmax(log p + lam W Y)``
(Boudiaf et al., CVPR 2022). The constants below are the reference's (``ref:methods/lame.py``):
``a = -ln(p + 1e-10)``, ``ln max(Y, 1e-20)`` in the energy, relative stopping tolerance 1e-8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from .base import Part

AFFINITIES = ("rbf", "knn", "linear")
UNARY_EPS = 1e-10  # a = -ln(p + eps)
LOG_FLOOR = 1e-20  # Y ln max(Y, floor) in the energy
MIN_SCALE = 1e-12  # rbf scale floor: one sample, or all neighbours identical, gives s = 0


def pairwise_distances(f: torch.Tensor) -> torch.Tensor:
    """``D_ij = ||f_i - f_j||_2`` from the differences themselves (not the Gram expansion), so the diagonal
    is exactly 0 and the nearest-neighbour ranks are those of the plain formula."""
    return torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")


def rbf_affinity(f: torch.Tensor, knn: int) -> torch.Tensor:
    """``W_ij = exp(-D_ij^2 / (2 s^2))`` with ``s`` the mean over rows of the k-th smallest entry of row i,
    ``k = min(knn, B)``, the self-distance 0 counted among them (so with knn 5 it is the 4th-nearest other
    sample, as in the reference). The diagonal stays 1."""
    d = pairwise_distances(f)
    k = min(knn, d.shape[0])
    s = d.topk(k, dim=1, largest=False).values[:, -1].mean().clamp_min(MIN_SCALE)
    return torch.exp(-d.square() / (2 * s * s))


def knn_affinity(f: torch.Tensor, knn: int) -> torch.Tensor:
    """``W_ij = 1`` when j is one of the ``min(knn, B - 1)`` nearest *other* samples of i, else 0 (not
    symmetric). The diagonal is excluded explicitly (the reference drops the first neighbour, which is the
    sample itself unless it has an exact duplicate)."""
    d = pairwise_distances(f)
    n = d.shape[0]
    d.diagonal().fill_(float("inf"))
    w = torch.zeros_like(d)
    k = min(knn, n - 1)
    if k > 0:
        w.scatter_(1, d.topk(k, dim=1, largest=False).indices, 1.0)
    return w


def linear_affinity(f: torch.Tensor, knn: int = 0) -> torch.Tensor:
    """``W = f f^T`` (cosine similarities of the normalised features); ``knn`` is unused."""
    return f @ f.T


def laplacian_energy(y: torch.Tensor, unary: torch.Tensor, pairwise: torch.Tensor) -> torch.Tensor:
    """``E = sum_ik [a_ik y_ik - P_ik y_ik + y_ik ln max(y_ik, 1e-20)]`` with ``P = lam W Y_prev``."""
    return (unary * y - pairwise * y + y * torch.log(y.clamp_min(LOG_FLOOR))).sum()


def bound_optimisation(unary: torch.Tensor, kernel: torch.Tensor, lam: float = 1.0, max_iter: int = 100,
                       tol: float = 1e-8) -> torch.Tensor:
    """Iterate ``P = lam W Y``, ``Y <- row-softmax(-a + P)`` from ``Y = row-softmax(-a)``; after update t
    (0-based) the energy E_t of the new Y with the P of the old one is compared with E_{t-1}, and the loop
    stops when ``t > 1`` and ``|E_t - E_{t-1}| <= tol |E_{t-1}|`` (so at least 3 updates), or after
    ``max_iter`` updates. Runs in the inputs' dtype, as the reference does, since the tolerance decides
    the iteration count."""
    y = (-unary).softmax(1)
    previous = None
    for t in range(max_iter):
        pairwise = lam * (kernel @ y)
        y = (pairwise - unary).softmax(1)
        energy = float(laplacian_energy(y, unary, pairwise))
        if t > 1 and abs(energy - previous) <= tol * abs(previous):
            break
        previous = energy
    return y


class LaplacianAdjust(Part):
    """LAME's correction of one batch: ``(features, logits) -> Y``, probabilities per row.

    Unary ``a = -ln(softmax(logits) + 1e-10)``; the affinity (``rbf`` default, ``knn``, ``linear``) is built on
    the L2-normalised features; ``force_symmetry`` replaces W by (W + W^T) / 2. No state crosses batches.
    """

    def __init__(self, affinity: str = "rbf", knn: int = 5, force_symmetry: bool = False, lam: float = 1.0,
                 max_iter: int = 100, tol: float = 1e-8):
        name = str(affinity).lower()
        if name not in AFFINITIES:
            raise ConfigError(f"LAME affinity must be one of {', '.join(AFFINITIES)}, got {affinity!r}")
        if isinstance(knn, bool) or not isinstance(knn, int) or knn < 1:
            raise ConfigError(f"LAME knn must be a positive integer, got {knn!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ConfigError(f"LAME max_iter must be a positive integer, got {max_iter!r}")
        if not tol >= 0:
            raise ConfigError(f"LAME tol must be >= 0, got {tol!r}")
        self.affinity, self.knn, self.force_symmetry = name, knn, bool(force_symmetry)
        self.lam, self.max_iter, self.tol = float(lam), max_iter, float(tol)

    def kernel(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.flatten(1), p=2, dim=1)
        w = {"rbf": rbf_affinity, "knn": knn_affinity, "linear": linear_affinity}[self.affinity](f, self.knn)
        return 0.5 * (w + w.T) if self.force_symmetry else w

    def __call__(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if features.shape[0] != logits.shape[0]:
            raise InputError(f"LAME needs one feature row per logit row, got {features.shape[0]} and "
                             f"{logits.shape[0]}")
        unary = -torch.log(logits.softmax(1) + UNARY_EPS)
        return bound_optimisation(unary, self.kernel(features).to(unary.dtype), self.lam, self.max_iter, self.tol)
