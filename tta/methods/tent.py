"""TENT (Wang et al., ICLR 2021): minimise the prediction entropy w.r.t. BN affine parameters,
normalising with test-batch statistics (METHODS.md 3.2)."""
from ..adapter import Recipe
from ..parts.norm import BatchStats
from ..parts.objectives import Entropy
from ..parts.optim import OptimizerSpec
from ..parts.params import NormAffine
from . import Cost, register


def tent_recipe() -> Recipe:
    """The base most entropy methods extend."""
    return Recipe(norm=BatchStats(), params=NormAffine(), objective=Entropy(),
                  optimizer=OptimizerSpec("adam", lr=1e-3))


@register("tent", summary="minimise prediction entropy",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=0))
def tent(model):
    return tent_recipe()
