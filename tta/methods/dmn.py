"""DMN-ZS (Zhang et al., CVPR 2024; METHODS-VLM V.3): the zero-shot Dual Memory Network for CLIP, i.e. its
dynamic memory of test features (the static few-shot memory and the projections are absent in zero-shot).

Per image, in stream order: the mean probability ``p`` of the 10 % lowest-entropy views (entropy with 1e-6
inside the log) gives the pseudo-label ``y`` and the priority ``H(p)`` (1e-8 inside the log); the *original*
view's feature ``f_0`` is written into class ``y``'s memory (50 slots, a full class replacing its highest-entropy
slot when the newcomer is lower); then ``f_0`` reads the memory by attention, each class's text embedding an
always-present extra slot (:mod:`tta.parts.dual_memory`), giving ``p_mem``. With ``p_text = softmax(s W f_0)``
(the original view only; the views only make the pseudo-label) the score is ``p_text + weight p_mem``.

Output: DMN combines probabilities, so the adapter returns ``log((p_text + weight p_mem) / (1 + weight))``, the
log of the normalised score (computed in log space, finite), whose arg-max and softmax are DMN's.

Paper vs official code: the official runner chooses ``weight`` after the pass by a grid search against the test
labels and reports the best accuracy. Default here ``weight=1`` (no label use, as third-party benchmarks do);
for reproduction only, ``record=True`` keeps each image's ``p_text`` and ``p_mem`` and
``adapter.searched_weight(labels)`` runs the official grid (the per-dataset values it picked for ViT-B/16: I 1,
A 3, V2 1, R 0.3, Sketch 1, Flowers 10, DTD 10, Pets 1, Cars 0.3, UCF 0.3, Caltech 0.3, Food 0.3, SUN 3,
Aircraft 1, EuroSAT 0.3). DMN runs fp32 (no precision quirk). Views: 32, crop-flip for the ImageNet family
(the official fine-grained runs use AugMix: ``policy="augmix"``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ConfigError
from ..parts.cache import ClassCache
from ..parts.dual_memory import memory_logits
from . import Cost, register
from ..parts.view_select import mean_probs, select_confident, take
from .clip_online import OnlineCLIPAdapter, online_recipe

WEIGHT_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000)


def combined_log_score(text_logits: torch.Tensor, memory_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """``log((softmax(text) + weight softmax(memory)) / (1 + weight))`` in log space (never ``log 0``)."""
    text = text_logits.log_softmax(-1)
    if weight == 0:
        return text
    both = torch.stack([text, memory_logits.log_softmax(-1) + math.log(weight)])
    return torch.logsumexp(both, 0) - math.log1p(weight)


class DMNAdapter(OnlineCLIPAdapter):
    def __init__(self, model, recipe, *, memory_size: int = 50, beta: float = 5.5, weight: float = 1.0,
                 record: bool = False, **kw):
        if not (weight >= 0 and beta >= 0):
            raise ConfigError(f"dmn_zs needs weight >= 0 and beta >= 0, got weight={weight!r}, beta={beta!r}")
        super().__init__(model, recipe, **kw)
        self.beta, self.weight, self.record = beta, float(weight), record
        self.memory = ClassCache(memory_size, self.num_classes)
        self.history = []

    def reset_state(self) -> None:
        self.memory.reset()
        self.history = []

    def pseudo_labels(self, logits: torch.Tensor) -> tuple:
        """Pseudo-label and priority per image from ``(B, N, C)`` view logits (V.3 step 2)."""
        p = mean_probs(take(logits, select_confident(logits, self.keep, eps=1e-6)))
        return p.argmax(-1), -(p * torch.log(p + 1e-8)).sum(-1)

    def stream(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.view_logits(features)
        labels, priority = self.pseudo_labels(logits)
        queries, text_logits = features[:, 0], logits[:, 0]
        out = []
        for i in range(len(features)):
            self.memory.insert(int(labels[i]), queries[i], float(priority[i]))
            mem = memory_logits(queries[i:i + 1], self.memory, self.text, self.beta, self.scale)
            if self.record:
                self.history.append((text_logits[i].softmax(-1).cpu(), mem[0].softmax(-1).cpu()))
            out.append(combined_log_score(text_logits[i:i + 1], mem, self.weight))
        return torch.cat(out)

    def searched_weight(self, labels: torch.Tensor, grid: Sequence[float] = WEIGHT_GRID) -> tuple:
        """The official oracle: ``(weight, accuracy)`` of the grid value whose ``argmax(p_text + w p_mem)`` is
        most accurate on the recorded images (first best in grid order). Uses test labels: reproduction only."""
        if not self.history:
            raise ConfigError("searched_weight needs the adapter built with record=True and run on the stream")
        labels = torch.as_tensor(labels).flatten()
        if len(labels) != len(self.history):
            raise ConfigError(f"got {len(labels)} labels for {len(self.history)} recorded images")
        text, mem = (torch.stack(t) for t in zip(*self.history))
        acc = [float(((text + w * mem).argmax(-1) == labels.cpu()).float().mean()) for w in grid]
        best = max(range(len(grid)), key=lambda j: (acc[j], -j))
        return grid[best], acc[best]


@register("dmn_zs", summary="dynamic memory of test features read by attention with a text slot (CLIP, zero-shot)",
          adapts="feature memory (50 per class)", cost=Cost(nograd=32, params="none"), requires="clip")
def dmn_zs(model, *, views: int = 32, policy: str = "crop_flip", keep: float = 0.1, chunk: int = 8, templates=None,
           cupl=None, view_options=None, memory_size: int = 50, beta: float = 5.5, weight: float = 1.0,
           record: bool = False):
    """``views``/``policy``/``keep``: 32 crop-flip views, 3 kept for the pseudo-label; ``memory_size``: slots per
    class; ``beta``: attention sharpness; ``weight``: of ``p_mem`` (1; the official value is label-searched, see
    ``record`` and ``searched_weight``); official prompts: tip7 + CuPL sentences (``templates``, ``cupl``)."""
    return online_recipe(DMNAdapter, **{k: v for k, v in locals().items() if k != "model"})


__all__ = ["DMNAdapter", "dmn_zs", "combined_log_score", "WEIGHT_GRID"]
