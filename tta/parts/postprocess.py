"""Post-processors: functions of the logits a method returns, applied after it (``postprocess=``), or
wherever a method consumes probabilities (view averaging, teacher targets) through its own option.

``em_inf`` (METHODS.md 3.12; Agarwal et al., NeurIPS 2025): each logit vector ``z`` is the start of a few
Adam steps on ``J(z') = H(softmax z') + lambda * KL(softmax z || softmax z')``, stopping for a row as soon
as its entropy is below ``threshold``. The model is untouched; it is a per-sample adaptive sharpening
that keeps the arg-max (proof sketch in METHODS.md 3.12; tested on random logits), so it changes
calibration, not accuracy, unless something averages probabilities afterwards. Defaults are those of
the official evaluation script: lr 0.1, 3 steps, lambda 0.05, threshold 0.3 nats.

Spec in Python and YAML: ``"em_inf"`` or ``{"name": "em_inf", "lr": ..., "steps": ..., "kl_weight": ...,
"threshold": ...}``; :func:`build` turns it into the callable.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Union

import torch

from ..errors import ConfigError
from .base import Part


class EMInf(Part):
    """``logits -> logits'`` by per-row entropy minimisation anchored by a KL term (module docstring).

    Adam runs on the whole ``(B, C)`` tensor at once: Adam is element-wise, so this is B independent
    optimisations; a row whose entropy is already below ``threshold`` before a step keeps its value from
    then on (the official loop stops there). Computed in float32 with autograd on whatever the caller's
    grad mode is.
    """

    def __init__(self, lr: float = 0.1, steps: int = 3, kl_weight: float = 0.05, threshold: float = 0.3):
        if not lr > 0 or steps < 0 or kl_weight < 0 or threshold < 0:
            raise ConfigError(f"em_inf needs lr > 0, steps >= 0, kl_weight >= 0, threshold >= 0; got lr={lr}, "
                              f"steps={steps}, kl_weight={kl_weight}, threshold={threshold}")
        self.lr, self.steps, self.kl_weight, self.threshold = lr, steps, kl_weight, threshold

    @staticmethod
    def objective(z: torch.Tensor, log_p0: torch.Tensor, kl_weight: float):
        """Per-row entropy of ``softmax(z)`` and ``H + kl_weight * KL(p0 || softmax(z))``."""
        log_p = z.log_softmax(1)
        h = -(log_p.exp() * log_p).sum(1)
        kl = (log_p0.exp() * (log_p0 - log_p)).sum(1)
        return h, h + kl_weight * kl

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        dtype = logits.dtype
        with torch.inference_mode(False), torch.enable_grad():
            z0 = logits.detach().float().clone()
            log_p0 = z0.log_softmax(1)
            z = z0.clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.lr)
            active = torch.ones(len(z0), dtype=torch.bool, device=z0.device)
            for _ in range(self.steps):
                h, loss = self.objective(z, log_p0, self.kl_weight)
                active = active & (h.detach() >= self.threshold)
                if not bool(active.any()):
                    break
                opt.zero_grad(set_to_none=True)
                loss[active].sum().backward()  # rows are independent: the sum's gradient is each row's own
                before = z.detach().clone()
                opt.step()
                with torch.no_grad():
                    z[~active] = before[~active]
            return z.detach().to(dtype)


POSTPROCESSORS: Dict[str, type] = {"em_inf": EMInf}


def build(spec: Union[None, str, Dict[str, Any], Callable]) -> Optional[Callable]:
    """A post-processor from ``None``, a name, a ``{name, **options}`` mapping or a callable."""
    if spec is None or callable(spec):
        return spec
    options: Dict[str, Any] = {}
    if isinstance(spec, dict):
        options = dict(spec)
        spec = options.pop("name", None)
    if not isinstance(spec, str) or spec not in POSTPROCESSORS:
        raise ConfigError(f"postprocess must be one of {', '.join(POSTPROCESSORS)} (a name or a mapping with "
                          f"'name' and its options), got {spec!r}")
    cls = POSTPROCESSORS[spec]
    allowed = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"postprocess {spec!r} got unknown option(s) {unknown}; allowed: {', '.join(allowed)}")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"postprocess {spec}.{key} must be a number, got {value!r}")
    return cls(**options)
