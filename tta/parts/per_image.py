"""Grouped per-image execution for the view methods TTAug and MEMO (METHODS-ZOO Z.17, Z.2, Z.3).

The reference runs these methods at batch size 1: each image's views form their own batch. Here a batch of
B images is run at once, each image still on its own:

* :class:`GroupedAlphaStats` -- N-alpha BN (Z.0.3: ``mu = (1-a) mu_src + a mu_B``, likewise the unbiased
  variance, no gradient through the batch moments) where the batch may be split into equal consecutive
  groups (``with bn_groups(model, B): model(views)``), each normalised with the mix of the source
  statistics and ITS OWN moments: B images x V views in one forward, as B separate N-alpha forwards would
  compute. Outside ``bn_groups`` the whole batch is one group, which is ``AlphaStats``.
* :func:`view_average` -- TTAug's prediction: that forward, then the mean logit vector of each image's views.
* :func:`episodic_step_predict` -- MEMO's episodic update for every image at once: per-image gradients of
  each image's own loss (``vmap(grad)``) over all selected weights, the configured optimizer's steps from a
  fresh state computed functionally for every image, then each image's plain view forwarded with its own
  weights (``vmap`` of ``functional_call``: one grouped forward, not one forward per image).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..errors import ConfigError, InputError
from .optim import OptimizerSpec
from .params import BATCH_NORMS, reclass_table


class GroupedAlphaStats:
    """Norm part: N-alpha mixing with per-group batch moments (see module docstring)."""

    def __init__(self, alpha: float = 0.1):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def __call__(self, model: nn.Module) -> nn.Module:
        model.eval()
        layers = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
        if not layers:
            raise ConfigError("alpha mixing needs BatchNorm layers; this model has none")
        for m in layers:
            if m.running_mean is None:
                raise ConfigError("alpha mixing needs the source running statistics, but a BN layer has none")
            if not isinstance(m, _Grouped):
                if type(m) not in _GROUPED_CLASSES:
                    raise ConfigError(f"grouped alpha mixing supports {[c.__name__ for c in BATCH_NORMS]}, "
                                      f"not {type(m).__name__}")
                m.__class__ = _GROUPED_CLASSES[type(m)]
            m._tta_alpha, m._tta_groups = self.alpha, 1
        return model

    def __repr__(self):
        return f"GroupedAlphaStats(alpha={self.alpha})"


class _Grouped:
    """Mixin swapped into a BN layer's class (picklable, keeps state-dict keys) for grouped alpha mixing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _grouped_alpha_forward(self, x)


_GROUPED_CLASSES = reclass_table(_Grouped, "GroupedAlpha", __name__)


def _grouped_alpha_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Per group: moments from the sums of x and x^2 per (sample, channel) (two fast contiguous reductions,
    combined in float64), unbiased variance, mixed with the source moments; then, without autograd, one
    inference-mode ``batch_norm`` over the batch seen as one sample with groups x samples x channels
    channels, with autograd the same normalisation as a per-channel affine map."""
    groups, (n, c) = self._tta_groups, x.shape[:2]
    if n % groups:
        raise InputError(f"a batch of {n} cannot be split into {groups} equal BN groups")
    per = n // groups
    flat = x.reshape(groups, per, c, -1)
    count = per * flat.shape[-1]
    alpha = self._tta_alpha
    with torch.no_grad():
        mean = flat.sum(-1).double().sum(1) / count
        var = torch.linalg.vector_norm(flat, dim=-1).double().square().sum(1) / count - mean.square()
        if count > 1:
            var = var * (count / (count - 1))
        mean = (1 - alpha) * self.running_mean + alpha * mean.to(x.dtype)
        var = (1 - alpha) * self.running_var + alpha * var.clamp_min(0).to(x.dtype)

    if torch.is_grad_enabled():  # with autograd (MEMO's torch.func.grad) a plain affine map is the cheapest to
        scale = torch.rsqrt(var + self.eps)  # differentiate per image
        scale = scale if self.weight is None else self.weight * scale
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        shape = (groups, 1, c) + (1,) * (x.dim() - 2)
        return (x.view(groups, per, *x.shape[1:]) * scale.view(shape) + shift.view(shape)).view_as(x)

    def per_channel(t):  # (groups, c) or (c,) -> one value per (group, sample, channel)
        return t.expand(groups, c).unsqueeze(1).expand(groups, per, c).reshape(-1)

    weight = None if self.weight is None else per_channel(self.weight)
    bias = None if self.bias is None else per_channel(self.bias)
    out = torch.batch_norm(x.reshape(1, n * c, -1), weight, bias, per_channel(mean), per_channel(var), False, 0.0,
                           self.eps, torch.backends.cudnn.enabled)
    return out.view_as(x)


@contextmanager
def bn_groups(model: nn.Module, groups: int):
    """Inside the block, every grouped BN layer of ``model`` splits its batch into ``groups`` equal groups."""
    layers = [m for m in model.modules() if isinstance(m, _Grouped)]
    if not layers:
        raise ConfigError("per-image BN groups need the model configured by GroupedAlphaStats")
    for m in layers:
        m._tta_groups = groups
    try:
        yield
    finally:
        for m in layers:
            m._tta_groups = 1


def view_average(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """The mean logits over the views of each image: ``views`` (B, V, C, H, W) -> (B, classes), each image's
    V views forming their own BN group, all in one forward."""
    b, v = views.shape[:2]
    with bn_groups(model, b):
        logits = model(views.reshape(b * v, *views.shape[2:]))
    return logits.view(b, v, -1).mean(1)


# ----------------------------------------------------------------------------- functional optimizer
def functional_update(spec: OptimizerSpec, params: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor],
                      state: Dict[str, Dict[str, torch.Tensor]], t: int):
    """Step ``t`` (1-based) of ``spec``'s optimizer as PyTorch computes it, out of place, for tensors with a
    leading per-image axis (``params`` may lack it at ``t == 1``: every image starts from the same weights).
    A fresh state per image is ``state = {}`` at ``t == 1``. SGD (momentum, Nesterov, weight decay; a fresh
    Nesterov buffer moves by ``(1 + momentum) lr g``), Adam and AdamW. Returns (params, state)."""
    new_params, new_state = {}, {}
    for name, g in grads.items():
        p, s = params[name], dict(state.get(name, {}))
        if spec.weight_decay and spec.name != "adamw":
            g = g + spec.weight_decay * p
        if spec.name == "sgd":
            step = g
            if spec.momentum:
                s["buf"] = g if t == 1 else spec.momentum * s["buf"] + g
                step = g + spec.momentum * s["buf"] if spec.nesterov else s["buf"]
            p = p - spec.lr * step
        else:
            beta1, beta2 = spec.betas
            if spec.name == "adamw" and spec.weight_decay:
                p = p * (1 - spec.lr * spec.weight_decay)
            s["m"] = (1 - beta1) * g if t == 1 else torch.lerp(s["m"], g, 1 - beta1)
            s["v"] = (1 - beta2) * g * g if t == 1 else beta2 * s["v"] + (1 - beta2) * g * g
            denom = s["v"].sqrt() / (1 - beta2 ** t) ** 0.5 + spec.eps
            p = p - spec.lr / (1 - beta1 ** t) * s["m"] / denom
        new_params[name], new_state[name] = p, s
    return new_params, new_state


def episodic_step_predict(model: nn.Module, names: Sequence[str], views: torch.Tensor, plain: torch.Tensor,
                          loss_fn: Callable[[torch.Tensor], torch.Tensor], spec: OptimizerSpec, steps: int = 1):
    """MEMO for every image at once (see module docstring): ``views`` (B, N, C, H, W) give each image's loss
    ``loss_fn(logits of its N views)``; every image starts from the model's weights, takes ``steps`` steps
    of ``spec`` on the parameters ``names`` from a fresh optimizer state, and predicts its ``plain``
    (B, C, H, W) view alone (its own N-alpha statistics) with its own weights. The model is not changed.
    Returns (logits (B, classes), the loss of each image before its first step (B,))."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in names}
    fixed.update(dict(model.named_buffers()))
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}

    def image_loss(p, x):
        return loss_fn(functional_call(model, (p, fixed), (x,)))

    def image_logits(p, x):
        return functional_call(model, (p, fixed), (x.unsqueeze(0),)).squeeze(0)

    state, first = {}, None
    for t in range(1, steps + 1):
        grads, loss = vmap(grad_and_value(image_loss), in_dims=(None if t == 1 else 0, 0))(params, views)
        first = loss.detach() if first is None else first
        params, state = functional_update(spec, params, grads, state, t)
    with torch.no_grad():
        logits = vmap(image_logits)(params, plain)
    return logits, first
