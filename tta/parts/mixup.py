"""GTTA's two data-side parts (METHODS-ZOO Z.12): source-test mixup and the confidence gate.

* :func:`best_match_mixup` builds GTTA's intermediate domain on CIFAR: each labelled source image is
  blended with the test image whose prediction is most similar to its own, so the source step trains on
  images that look partly like the test domain while keeping a correct label.
* :class:`ConfidenceGate` turns the predictions of a test batch into hard pseudo-labels, ignoring the ones
  whose confidence is below ``sqrt(c_bar)``, with ``c_bar`` an EMA of the mean confidence. The square root
  keeps the threshold above the running mean confidence itself (sqrt(c) > c for c < 1), so only the
  samples the model is clearly more sure of than usual are trained on.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import ConfigError
from .base import Part

IGNORE = -1  # the label of an ignored sample (``F.cross_entropy(..., ignore_index=IGNORE)``)


def best_match(p_source: torch.Tensor, p_test: torch.Tensor) -> torch.Tensor:
    """``m_j = argmax_i <p_source_j, p_test_i>``: for each source sample the test sample whose class
    probabilities have the largest inner product with its own (first index on ties)."""
    return (p_source @ p_test.T).argmax(1)


def best_match_mixup(x_source: torch.Tensor, p_source: torch.Tensor, x_test: torch.Tensor, p_test: torch.Tensor,
                     lam: float = 1 / 3) -> torch.Tensor:
    """``x~_j = lam * x_test[m_j] + (1 - lam) * x_source_j`` with ``m`` from :func:`best_match`; the caller
    keeps the source labels (the source image dominates for ``lam < 1/2``)."""
    return lam * x_test[best_match(p_source, p_test)] + (1 - lam) * x_source


class ConfidenceGate(Part):
    """Hard pseudo-labels with a self-tuning confidence threshold.

    Per call with probabilities ``p`` (B, C): ``conf_i = max_k p_ik``;
    ``c_bar <- momentum * c_bar + (1 - momentum) * mean_i conf_i`` (``c_bar`` starts at ``init``), then
    label ``argmax_k p_ik``, or :data:`IGNORE` where ``conf_i < sqrt(c_bar)`` with the already-updated
    ``c_bar``. ``c_bar`` is kept as a float32 tensor, as the reference does.
    """

    def __init__(self, momentum: float = 0.9, init: float = 0.9):
        if not 0.0 <= momentum <= 1.0 or not 0.0 <= init <= 1.0:
            raise ConfigError(f"confidence gate momentum and init must lie in [0, 1], got {momentum}, {init}")
        self.momentum, self.init = momentum, init
        self.reset()

    def reset(self) -> None:
        self.c_bar: Optional[torch.Tensor] = None

    def __call__(self, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(labels with :data:`IGNORE` for the gated-out samples, bool mask of the kept ones)."""
        conf, labels = probs.max(1)
        c_bar = torch.tensor(self.init, dtype=conf.dtype, device=conf.device) if self.c_bar is None else self.c_bar
        self.c_bar = self.momentum * c_bar + (1 - self.momentum) * conf.mean()
        keep = conf >= self.c_bar.sqrt()
        return labels.masked_fill(~keep, IGNORE), keep

    @property
    def threshold(self) -> float:
        """The current ``sqrt(c_bar)``."""
        return float(self.c_bar.sqrt()) if self.c_bar is not None else self.init ** 0.5

    def __repr__(self):
        return f"ConfidenceGate(momentum={self.momentum}, init={self.init})"
