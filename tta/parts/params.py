"""Parameter selectors: which tensors a method adapts. Each returns ``[(name, parameter), ...]`` in module order."""
from __future__ import annotations

import re
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from ..errors import ConfigError

NamedParams = List[Tuple[str, nn.Parameter]]

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORMS = BATCH_NORMS + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def norm_layers(model: nn.Module, kinds=NORMS) -> List[Tuple[str, nn.Module]]:
    """Norm modules of ``model`` (including timm's/open_clip's LayerNorm subclasses)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


class NormAffine:
    """Affine weight and bias of every norm layer, minus the modules matched by ``skip`` (regexes on names)."""

    def __init__(self, skip: Optional[Sequence[str]] = None, kinds=NORMS):
        self.skip = list(skip or [])
        self.kinds = kinds

    def __call__(self, model: nn.Module) -> NamedParams:
        skip = [re.compile(p) for p in self.skip]
        out = []
        for name, m in norm_layers(model, self.kinds):
            if any(p.search(name) for p in skip):
                continue
            for pname in ("weight", "bias"):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter):
                    out.append((f"{name}.{pname}" if name else pname, p))
        if not out:
            raise ConfigError("the parameter selector found no norm-layer affine parameters to adapt "
                              f"(skip rules: {self.skip or 'none'}); this model has no BN/LN/GN affine weights")
        return out

    def __repr__(self):
        return f"NormAffine(skip={self.skip})"


class AllParams:
    """Every floating-point parameter (CoTTA adapts all weights and biases)."""

    def __call__(self, model: nn.Module) -> NamedParams:
        return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]

    def __repr__(self):
        return "AllParams()"


class NoParams:
    """Nothing is adapted by gradient (source, norm)."""

    def __call__(self, model: nn.Module) -> NamedParams:
        return []

    def __repr__(self):
        return "NoParams()"


def freeze_all_but(model: nn.Module, named: Iterable[Tuple[str, nn.Parameter]]) -> None:
    """``requires_grad`` only on the chosen parameters, so backward stops at the first of them."""
    chosen = {id(p) for _, p in named}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)


Selector = Callable[[nn.Module], NamedParams]
