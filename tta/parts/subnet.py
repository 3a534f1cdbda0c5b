"""Randomly drawn sub-networks and the two EATA-C terms built on them (METHODS.md 3.3, EATA-C brief).

EATA-C (Tan et al., arXiv 2403.11491) calibrates EATA with (1) *model uncertainty*: the divergence
between the full network's prediction and a randomly drawn sub-network's, which it minimises, and (2)
*data uncertainty*: whether the two predict the same label, which decides per sample between
minimising (agree) and maximising (disagree) the entropy. The paper body could not be obtained; every
construction below is our choice, with its constants as options:

* the sub-network: **channel dropout after every norm layer** (each sample, each channel of each norm
  layer's output is kept with probability ``1 - rate`` and rescaled by ``1 / (1 - rate)``: inverted
  dropout). It needs no knowledge of the architecture (every model tta adapts has norm layers) and
  shares every weight with the full network, so one backward reaches both passes;
* the divergence: ``KL(sg(p_full) || p_sub)`` per sample, averaged over the whole batch (the full
  network is the target; gradient through the sub-network pass);
* the min-max entropy: ``+H(p_full)`` where the arg-max labels agree, ``-max_weight * H(p_full)`` where
  they disagree, over EATA's selected samples with EATA's weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional

import torch

from ..errors import ConfigError
from .augment import device_generator
from .base import Part
from .params import norm_layers


class ChannelDropout(Part):
    """Hooks on every norm layer of the adapter's model that, inside :meth:`sampled`, drop whole channels
    per sample (module docstring). Outside it the hooks return at once and the model is the full one.
    Masks come from a generator seeded by one draw of the adapter's, so they follow its seed."""

    def __init__(self, rate: float = 0.1):
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"sub-network drop rate must be in [0, 1), got {rate}")
        self.rate = rate
        self._gen: Optional[torch.Generator] = None
        self._handles: List = []

    def bind(self, adapter) -> None:
        if self._handles:  # shared by the objective and the consistency term: hook once
            return
        self._handles = [m.register_forward_hook(self._hook) for _, m in norm_layers(adapter.model)]
        if not self._handles:
            raise ConfigError("the sub-network drops channels after norm layers, but the model has none")

    def _hook(self, module, inputs, output):
        if self._gen is None or self.rate == 0:
            return None
        shape = output.shape[:2] + (1,) * (output.dim() - 2)
        keep = torch.rand(shape, generator=self._gen, device=output.device) >= self.rate
        return output * keep.to(output.dtype) / (1.0 - self.rate)

    @contextmanager
    def sampled(self, generator: torch.Generator, device: torch.device):
        """Forwards inside this block run a freshly drawn sub-network."""
        self._gen = device_generator(generator, device)
        try:
            yield
        finally:
            self._gen = None


def _sub_logits(batch, subnet: ChannelDropout) -> torch.Tensor:
    """The sub-network's logits on the batch, computed once per batch (with gradient)."""
    if "sub_logits" not in batch.extras:
        adapter = batch.adapter
        with subnet.sampled(adapter.generator, batch.logits.device):
            batch.extras["sub_logits"] = adapter.model(batch.x)
    return batch.extras["sub_logits"]


class MinMaxEntropy(Part):
    """Per-sample objective: the entropy, with its sign flipped (times ``max_weight``) where the full and
    the sub-network disagree on the label."""

    def __init__(self, subnet: ChannelDropout, max_weight: float = 1.0):
        self.subnet, self.max_weight = subnet, max_weight

    def bind(self, adapter) -> None:
        self.subnet.bind(adapter)

    def __call__(self, batch) -> torch.Tensor:
        agree = batch.logits.detach().argmax(1) == _sub_logits(batch, self.subnet).detach().argmax(1)
        batch.extras["agree"] = agree
        sign = torch.where(agree, torch.ones_like(batch.entropy), torch.full_like(batch.entropy, -self.max_weight))
        return sign * batch.entropy


class SubnetConsistency(Part):
    """Batch term ``weight * mean_i KL(sg(p_full,i) || p_sub,i)`` over the whole batch."""

    def __init__(self, subnet: ChannelDropout, weight: float = 1.0):
        self.subnet, self.weight = subnet, weight

    def bind(self, adapter) -> None:
        self.subnet.bind(adapter)

    def __call__(self, batch) -> torch.Tensor:
        log_full = batch.log_probs.detach()
        log_sub = _sub_logits(batch, self.subnet).log_softmax(1)
        kl = (log_full.exp() * (log_full - log_sub)).sum(1)
        return self.weight * kl.mean()
