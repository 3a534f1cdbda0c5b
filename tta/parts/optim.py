"""Optimizer part: a small spec that builds a torch optimizer over the adapted parameters."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from ..errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    betas: Tuple[float, float] = (0.9, 0.999)  # Adam/AdamW only
    eps: float = 1e-8  # Adam/AdamW only
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.name!r}; expected one of {', '.join(OPTIMIZERS)}")
        if not self.lr >= 0:
            raise ConfigError(f"lr must be a non-negative number, got {self.lr!r}")

    def but(self, **changes) -> "OptimizerSpec":
        changes = {k: (tuple(v) if k == "betas" else v) for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def build(self, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay)
