"""ROID (Marsden, Doebler, Yang; WACV 2024; METHODS-ZOO Z.8): BN-affine adaptation with test-batch
statistics that minimises a soft likelihood ratio on diverse, certain samples (diversity x certainty
weights; samples of below-mean diversity dropped), plus a weighted consistency loss on one AUG-CT-lite
view of the kept samples; after every step the adapted tensors are pulled towards the source (weight
ensembling, EMA 0.99); the returned prediction is the pre-update logits scaled by a smoothed batch prior.

A plain recipe: the weights zero the dropped samples, so the adapter's mean over the batch is the
reference's ``sum over kept / B``. Deviations from the reference (``ref:methods/roid.py``):

* ``B`` is the actual batch size, not the configured one: identical except on a smaller last batch;
* a batch whose diversity or certainty is constant would give 0/0 = NaN weights in the reference; here
  that vector normalises to zeros (every sample kept, weight 1) and the batch is counted
  (``counters["constant_diversity"]`` / ``["constant_certainty"]``);
* the frozen source copy holds the adapted tensors only (the others never differ from it).
The reference's ``USE_WEIGHTING`` switch is not offered: without it its consistency branch is broken.

Defaults are CIFAR-10-C's (Adam 1e-3); ImageNet-C uses SGD 2.5e-4, momentum 0.9, Nesterov.
"""
from ..adapter import Recipe
from ..parts.diversity import DiversityWeight, PriorCorrection, SoftLikelihoodRatio, WeightedConsistency
from ..parts.ensembling import SourceEnsembling
from ..parts.norm import BatchStats
from ..parts.optim import OptimizerSpec
from ..parts.params import NormAffine
from . import Cost, register

# One forward on the batch plus one on the kept samples, one backward. The kept share is data-dependent
# (samples at or above the mean normalised diversity, not a median split): 0.71 of the REFERENCE.md dev
# stream with cifar_resnet20, hence 1.7 rather than Z.16's "1 + 1/2".
ROID_COST = Cost(grad=1.7, backward=1, nograd=0)


def roid_recipe(momentum_probs: float = 0.9, temperature: float = 1 / 3, consistency: bool = True,
                prior_correction: bool = True) -> Recipe:
    """ROID without its after-step move (CMF puts its own filter there)."""
    return Recipe(norm=BatchStats(), params=NormAffine(), objective=SoftLikelihoodRatio(),
                  weight=DiversityWeight(momentum_probs, temperature),
                  batch_terms=[WeightedConsistency()] if consistency else [],
                  output=PriorCorrection() if prior_correction else None,
                  optimizer=OptimizerSpec("adam", lr=1e-3))


@register("roid", summary="weighted soft likelihood ratio + consistency, source ensembling, prior correction",
          adapts="norm affine", cost=ROID_COST)
def roid(model, *, momentum_src: float = 0.99, momentum_probs: float = 0.9, temperature: float = 1 / 3,
         consistency: bool = True, prior_correction: bool = True):
    """``momentum_src``: weight ensembling with the source; ``momentum_probs``: the class-prior EMA of the
    diversity weights; ``temperature``: of the weights; ``consistency`` / ``prior_correction``: the
    reference's USE_CONSISTENCY / USE_PRIOR_CORRECTION switches."""
    return roid_recipe(momentum_probs, temperature, consistency, prior_correction).but(
        after_step=[SourceEnsembling(momentum_src)])
