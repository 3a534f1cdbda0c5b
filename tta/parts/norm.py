"""Norm modes: how BatchNorm layers normalise at test time (METHODS.md 1.1 and 3.1).

The toolkit rule: only norm layers are put in training mode; everything else (dropout, ...) stays in
eval mode. Source running statistics are kept as buffers (so ``alpha`` mixing and reset keep working)
but are never updated: BN layers get ``track_running_stats = False``, which makes PyTorch normalise
with the biased batch statistics and leave the buffers untouched, with gradients flowing through them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .params import BATCH_NORMS, reclass_table


class SourceStats:
    """Plain eval mode: source running statistics (the ``source`` baseline)."""

    def __call__(self, model: nn.Module) -> nn.Module:
        return model.eval()

    def __repr__(self):
        return "SourceStats()"


class BatchStats:
    """Every BN layer normalises with the current test batch's mean and biased variance."""

    def __call__(self, model: nn.Module) -> nn.Module:
        model.eval()
        for m in model.modules():
            if isinstance(m, BATCH_NORMS):
                m.train()
                m.track_running_stats = False
        return model

    def __repr__(self):
        return "BatchStats()"


class TrainStats:
    """PyTorch's own train mode for the BN layers (N-train): normalise with the batch statistics and move
    the running buffers, ``r <- (1 - m) r + m stat`` with the unbiased batch variance, so a later forward
    in eval mode uses them (BN-EMA, AdaContrast). Everything else stays in eval mode."""

    def __call__(self, model: nn.Module) -> nn.Module:
        model.eval()
        for m in model.modules():
            if isinstance(m, BATCH_NORMS):
                if m.running_mean is None:
                    raise ConfigError("train-mode statistics need running buffers, but a BN layer has none")
                m.train()
        return model

    def __repr__(self):
        return "TrainStats()"


class AlphaStats:
    """Mix source and batch moments per channel: ``mu = (1-a) mu_src + a mu_B`` (likewise the variance).

    ``alpha`` may be given directly or as a pseudo sample count ``n_prior`` (``a = n / (n_prior + n)``,
    Schneider et al. 2020) where n is the batch size. The batch variance is the unbiased one (as in the
    widely used implementation). No gradients flow through the mixed statistics.
    """

    def __init__(self, alpha: float = 0.1, n_prior: float = None):
        if n_prior is None and not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha, self.n_prior = alpha, n_prior

    def __call__(self, model: nn.Module) -> nn.Module:
        model.eval()
        found = False
        for m in model.modules():
            if isinstance(m, BATCH_NORMS):
                if m.running_mean is None:
                    raise ConfigError("alpha mixing needs the source running statistics, but a BN layer has none")
                m.__class__ = _alpha_class(type(m))
                m._tta_alpha, m._tta_n_prior = self.alpha, self.n_prior
                found = True
        if not found:
            raise ConfigError("alpha mixing needs BatchNorm layers; this model has none")
        return model

    def __repr__(self):
        return f"AlphaStats(alpha={self.alpha}, n_prior={self.n_prior})"


class _AlphaMixing:
    """Mixin swapped into a BN layer's class (picklable, keeps state-dict keys) for alpha mixing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _alpha_forward(self, x)


_ALPHA_CLASSES = reclass_table(_AlphaMixing, "AlphaMixed", __name__)


def _alpha_class(cls):
    if cls not in _ALPHA_CLASSES:
        raise ConfigError(f"alpha mixing supports {[c.__name__ for c in BATCH_NORMS]}, not {cls.__name__}")
    return _ALPHA_CLASSES[cls]


def _alpha_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Normalise with the mixed moments. Without autograd (the ``norm_alpha`` method) one fused
    batch-norm pass yields the batch moments and ``z = (x - mu_B) / s_B``, and the mixed normalisation is
    a per-channel affine map of ``z``: the activation is read twice, as in plain batch-statistics BN, not
    three times. With autograd (alpha mixing inside a gradient method) the moments are constants and the
    gradient flows to ``x`` and the affine parameters."""
    n, m = x.shape[0], x.numel() // x.shape[1]
    alpha = self._tta_alpha if self._tta_n_prior is None else n / (self._tta_n_prior + n)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    differentiable = torch.is_grad_enabled() and (x.requires_grad or self.weight is not None and self.weight.requires_grad)
    with torch.no_grad():
        z, mean_b, invstd_b = torch.native_batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        var_b = invstd_b.pow(-2) - self.eps  # biased
        if m > 1:
            var_b = var_b * (m / (m - 1))  # the unbiased variance, as the widely used implementation
        mean = (1 - alpha) * self.running_mean + alpha * mean_b
        var = (1 - alpha) * self.running_var + alpha * var_b
    if differentiable:
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
    with torch.no_grad():
        inv = torch.rsqrt(var + self.eps)
        weight = self.weight if self.weight is not None else torch.ones_like(inv)
        scale = weight * inv / invstd_b
        shift = weight * (mean_b - mean) * inv + (self.bias if self.bias is not None else 0)
        return torch.addcmul(shift.view(shape), z, scale.view(shape))


def uses_batch_stats(model: nn.Module) -> bool:
    """True when some BN layer normalises with batch statistics (a batch of one is then meaningless)."""
    return any(isinstance(m, BATCH_NORMS) and m.training and not hasattr(m, "_tta_alpha") for m in model.modules())
