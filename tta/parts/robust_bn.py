"""N-robust norm mode (METHODS-ZOO Z.0.3; RoTTA Z.6, PeTTA Z.13): BatchNorm that keeps its own exponential
moving average of test statistics.

Each BN layer holds an EMA pair ``(mu_bar, var_bar)``, starting at the source running statistics. In
train mode it mixes in the current batch's moments, **with** gradient, normalises with the mixture and
stores the detached mixture as the new pair::

    mu  = (1 - a) mu_bar  + a mu_B          var = (1 - a) var_bar + a var_B   (biased variance)
    y   = gamma (x - mu) / sqrt(var + eps) + beta
    (mu_bar, var_bar) <- (sg(mu), sg(var))

In eval mode it normalises with the stored pair and changes nothing. Unlike PyTorch's train mode the
output is normalised by the *mixed* moments, not the batch's, so small or class-skewed batches (RoTTA's
64-image memory) move the statistics only a little.

The layer is the original BN module re-classed with a mixin (as :class:`~tta.parts.norm.AlphaStats`
does): the pair lives in the layer's own ``running_mean`` / ``running_var`` buffers and the affine is the
layer's own ``weight`` / ``bias``, so state-dict keys do not change, copies of the network carry their
own pair, and the adapter's snapshot/reset covers it. The reference builds a new module holding copies;
the arithmetic is the same.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigError
from .params import BATCH_NORMS, reclass_table


class RobustStats:
    """The norm-mode part: every BN layer becomes robust with momentum ``alpha`` and is put in train mode
    (the student's mode: each forward moves its statistics); everything else goes to eval mode. Teachers
    switch between the modes with :func:`set_robust_training`.

    Z.6 names BN1d/BN2d; the same per-channel formula is applied to every BN kind (3d, SyncBatchNorm).
    ``require_bn=False`` accepts a model without BN (RoTTA on a transformer adapts its LayerNorms only)."""

    def __init__(self, alpha: float = 0.05, require_bn: bool = True):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"robust BN momentum alpha must be in [0, 1], got {alpha}")
        self.alpha, self.require_bn = alpha, require_bn

    def __call__(self, model: nn.Module) -> nn.Module:
        model.eval()
        found = False
        for m in model.modules():
            if isinstance(m, BATCH_NORMS):
                if m.running_mean is None or m.running_var is None:
                    raise ConfigError("robust BN starts from the source running statistics, but a BN layer "
                                      "has none (track_running_stats=False)")
                m.__class__ = _ROBUST_CLASSES.get(type(m), type(m))
                if not isinstance(m, _RobustMixing):
                    raise ConfigError(f"robust BN supports {[c.__name__ for c in BATCH_NORMS]}, "
                                      f"not {type(m).__name__}")
                m._tta_robust_alpha = self.alpha
                m.train()
                found = True
        if not found and self.require_bn:
            raise ConfigError("the robust norm mode needs BatchNorm layers; this model has none")
        return model

    def __repr__(self):
        return f"RobustStats(alpha={self.alpha}, require_bn={self.require_bn})"


class _RobustMixing:
    """Mixin swapped into a BN layer's class (picklable, keeps state-dict keys); see the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return robust_forward(self, x)


_ROBUST_CLASSES = reclass_table(_RobustMixing, "Robust", __name__)


def robust_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The N-robust normalisation of ``x`` (N, C, ...) by layer ``bn`` (module docstring).

    The batch moments come from per-channel sums of ``x`` and ``x * x`` (``var = E[x^2] - E[x]^2``): on the
    CPU ``torch.var_mean`` over (N, H, W) is several times slower than the convolution it follows. In
    float32 the variance then loses about ``1e-7 * mean^2 / var`` of its value, nothing for activations
    whose mean is not hundreds of standard deviations away from zero. The output is one per-channel
    affine map ``x * scale + shift``; autograd carries the gradient to ``x`` directly and through the
    batch moments, and to gamma and beta."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if bn.training:
        a = bn._tta_robust_alpha
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()  # sums of squares need the bits
        mean_b = xs.sum(dims) / n
        var_b = ((xs * xs).sum(dims) / n - mean_b * mean_b).clamp_min(0)
        mean = (1 - a) * bn.running_mean + a * mean_b
        var = (1 - a) * bn.running_var + a * var_b
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


def robust_layers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, _RobustMixing))


def set_robust_training(model: nn.Module, mode: bool) -> None:
    """Train mode (mix in batch moments, move the pair) or eval mode (use the pair) for the robust BN layers
    only; other modules keep their mode (the toolkit rule: dropout and the like stay in eval mode)."""
    for m in robust_layers(model):
        m.training = mode
