"""Parameter-space moves towards the source model after each update (``after_step`` parts):
ROID's weight ensembling (METHODS-ZOO Z.8 step 7) and CMF's Kalman-style momentum filter (Z.9).

Both keep copies of the adapted (trainable) tensors only: the frozen tensors of the model never leave
their source values, so the source and the hidden model agree with the model on them and the
reference's full-model copies and all-parameter sweeps change nothing there. The copies are taken at
``bind`` (the configured source model) and follow the parameters to another device if the adapter is
moved.
"""
from __future__ import annotations

from typing import List

import torch

from ..errors import ConfigError
from .base import Part
from .teacher import ema_

VIT_B16_LN_AFFINE = 38400  # CMF normalises q by the LN affine count of ViT-B/16


def _check_momentum(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")


def _clones(tensors) -> List[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


class _SourceCopy(Part):
    """Holds ``self._source``: frozen copies of the adapter's trainable tensors at bind time."""

    copies = ("_source",)  # the attributes holding lists of tensors shaped like the parameters

    def bind(self, adapter) -> None:
        self._source = _clones(adapter.params)

    def _follow(self, params) -> None:
        """Move the copies to the parameters' device (after ``adapter.to(device)``)."""
        if params and self._source[0].device != params[0].device:
            for name in self.copies:
                setattr(self, name, [t.to(params[0].device) for t in getattr(self, name)])


class SourceEnsembling(_SourceCopy):
    """ROID: ``EMA_m(theta <- theta_src)`` on the adapted tensors after every step (m = 0.99): the model
    stays a weighted ensemble of itself and the source, which bounds how far errors can carry it."""

    def __init__(self, momentum: float = 0.99):
        _check_momentum("ROID momentum_src", momentum)
        self.momentum = momentum
        self._source: List[torch.Tensor] = []

    def __call__(self, adapter) -> None:
        self._follow(adapter.params)
        ema_(adapter.params, self._source, self.momentum)


class MomentumFilter(_SourceCopy):
    """CMF's filter: a hidden model ``theta_h`` (starts as the source) tracks the adapted model as the
    state of a scalar Kalman filter whose process pulls it back to the source. After every step, with
    ``q = Q n / 38400`` (n = number of adapted values: the process noise grows with them), r = 1 - q:

    1. predict: ``EMA_alpha(theta_h <- theta_src)``, ``P- = alpha^2 P + q``;
    2. gain: ``beta = r / (P- + r)``, set to 0.89 if ``beta <= 0.89`` and to 1 if ``beta >= 0.9999``;
       ``P = beta P-``;
    3. update: ``EMA_beta(theta_h <- theta)``;
    4. ensemble: ``EMA_gamma(theta <- theta_h)``.

    ``reset`` restores ``theta_h`` and ``P = 0`` (the reference leaves P as it was: our reset is bit-exact).
    ``last_beta`` is the last gain, for logging.
    """

    copies = ("_source", "_hidden")

    def __init__(self, alpha: float = 0.99, gamma: float = 0.99, q: float = 0.005):
        _check_momentum("CMF alpha", alpha)
        _check_momentum("CMF gamma", gamma)
        if not q > 0:
            raise ConfigError(f"CMF q must be > 0, got {q}")
        self.alpha, self.gamma, self.q = alpha, gamma, q
        self._source: List[torch.Tensor] = []
        self._hidden: List[torch.Tensor] = []
        self.variance, self.process_noise, self.last_beta = 0.0, 0.0, float("nan")

    def bind(self, adapter) -> None:
        super().bind(adapter)
        self.process_noise = self.q * sum(p.numel() for p in adapter.params) / VIT_B16_LN_AFFINE
        self.reset()

    def reset(self) -> None:
        self._hidden = _clones(self._source)
        self.variance, self.last_beta = 0.0, float("nan")

    def gain(self) -> float:
        """Steps 1-2 on the variance: the new ``P`` is stored, the gain ``beta`` returned."""
        q = self.process_noise
        predicted = self.alpha ** 2 * self.variance + q
        beta = (1 - q) / (predicted + 1 - q)
        beta = 0.89 if beta <= 0.89 else 1.0 if beta >= 0.9999 else beta
        self.variance = beta * predicted
        return beta

    def __call__(self, adapter) -> None:
        params = adapter.params
        self._follow(params)
        beta = self.last_beta = self.gain()
        ema_(self._hidden, self._source, self.alpha)
        ema_(self._hidden, params, beta)
        ema_(params, self._hidden, self.gamma)
