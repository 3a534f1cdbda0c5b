"""SANTA, Source Anchoring and Target Alignment (Chakrabarty, Sreenivas, Biswas; TMLR 2023; METHODS-ZOO Z.10).

BN affine parameters (N-batch) and a projector adapt with two losses: the contrastive loss towards the
nearest source class prototype that RMT uses (``tta.parts.contrastive``, same prototypes, same projector),
and a cross-entropy to a frozen copy of the source model (the anchor, N-batch too) on the clean and an
AUG-CT view. The prediction is the student's, before the update.

It runs on RMT's loop (``RMTAdapter``) with the anchor as a teacher that never moves, no warm-up and no
source replay; only the source prototypes use source data.

The cross-entropy is the reference's argument order (``ref:utils/losses.py AugCrossEntropy``): the
*student's* probabilities are the target and the anchor's log-probabilities the prediction,
``-sum_k softmax(z)_k log softmax(z_anchor)_k``, with gradient only through ``softmax(z)``; minimising it
moves the student's mass onto the anchor's most probable class. Swapping the arguments gives a
different method (Z.10 pitfall). The reference's prototype cache (shared with RMT, keyed by dataset and
architecture only) is not reproduced: prototypes are recomputed at construction (see ``rmt.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..adapter import Recipe
from ..parts.norm import BatchStats
from ..parts.objectives import soft_cross_entropy
from ..parts.optim import OptimizerSpec
from ..parts.params import NormAffine
from ..parts.source import check_source
from . import Cost, register
from .rmt import RMTAdapter, TwoViewConsistency


def student_as_target(logits: torch.Tensor, anchor_logits: torch.Tensor) -> torch.Tensor:
    """``CE(softmax(z), z_anchor) = -sum_k softmax(z)_k log softmax(z_anchor)_k`` per row (Z.10 step 3)."""
    return soft_cross_entropy(logits, anchor_logits)


@register("santa", summary="cross-entropy to a frozen source anchor plus source-prototype contrastive loss",
          adapts="norm affine + projector", cost=Cost(grad=2, backward=1, nograd=1),
          source_data="labelled source images for class prototypes (source_images, source_labels)")
def santa(model, *, source_images: Optional[torch.Tensor] = None, source_labels: Optional[torch.Tensor] = None,
          source_batch_size: int = 200, prototype_samples: int = 100000, projection_dim: int = 128,
          temperature: float = 0.1, lambda_ce_trg: float = 1.0, lambda_cont: float = 1.0):
    """``source_batch_size``: batches of the prototype pass (their N-batch statistics shape the features;
    the reference uses the test batch size); ``prototype_samples``: the pass stops after the batch that
    exceeds it; ``projection_dim``, ``temperature``: the contrastive head; ``lambda_ce_trg``,
    ``lambda_cont``: weights of the anchor cross-entropy and the contrastive loss."""
    check_source("santa", source_images, source_labels)
    return Recipe(norm=BatchStats(), params=NormAffine(), objective=TwoViewConsistency(student_as_target),
                  optimizer=OptimizerSpec("adam", lr=1e-3), adapter_cls=RMTAdapter,
                  options=dict(source_images=source_images, source_labels=source_labels,
                               source_batch_size=source_batch_size, warmup_samples=0,
                               prototype_samples=prototype_samples, projection_dim=projection_dim,
                               temperature=temperature, lambda_ce_trg=lambda_ce_trg, lambda_cont=lambda_cont))
