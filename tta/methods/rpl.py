"""RPL, robust pseudo-labelling (Rusak et al., TMLR 2022; METHODS-ZOO Z.4): TENT's recipe (test-batch BN
statistics, norm affine parameters, one step per batch, the pre-update prediction) with entropy replaced by
the generalised cross-entropy to the hard pseudo-labels of the same forward.

GCE is bounded (at most 1/q), so the many wrong pseudo-labels of a shifted domain cannot dominate the
gradient as they would under cross-entropy. Defaults are CIFAR-10-C's (Adam 1e-3, q 0.8); ImageNet-C uses
SGD lr 5e-4, momentum 0.9, Nesterov (configs/imagenetc/rpl.yaml).
"""
from ..parts.pseudo_label import GeneralizedCrossEntropy
from . import Cost, register
from .tent import tent_recipe


@register("rpl", summary="generalised cross-entropy to the model's own hard pseudo-labels",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=0))
def rpl(model, *, q: float = 0.8):
    """``q``: the GCE exponent, in (0, 1]; 1 gives ``1 - p_y``, the limit 0 plain cross-entropy."""
    return tent_recipe().but(objective=GeneralizedCrossEntropy(q))
