"""LAME (Boudiaf et al., CVPR 2022; METHODS-ZOO Z.5): leave the network alone (eval mode, source BN
statistics, nothing adapted) and correct each batch's predictions by Laplacian smoothing over the
batch's feature-space affinity graph (:class:`tta.parts.laplacian.LaplacianAdjust`). No state crosses batches.

The method's answer is the smoothed probabilities Y; the adapter returns ``log(max(Y, tiny))`` so that
it stays a logit like every other method's output: ``softmax(output) == Y`` (Y's rows sum to 1) and the
arg-max is Y's. Calibration metrics, which apply softmax to what a method returns, therefore see Y.

Parity note: with source BN statistics on a shifted stream the features are poor and LAME is far worse than
the source model (76.72 % mean error on the dev stream vs 51.00; the reference reports 64.3 % on
CIFAR-10-C). That is the method as configured by the reference, kept as is.
"""
import torch

from ..adapter import Adapter, Recipe
from ..models.split import split
from ..parts.laplacian import LaplacianAdjust
from ..parts.norm import SourceStats
from . import Cost, register


class LAMEAdapter(Adapter):
    """Its own loop because the prediction needs the features of the same forward (the base no-gradient
    loop returns the model's logits only) and is a post-processing of both."""

    def __init__(self, model, recipe: Recipe, *, adjust: LaplacianAdjust, **loop):
        super().__init__(model, recipe, **loop)
        self.adjust = adjust
        self.encoder = split(self.model)[0]  # holds no tensors of its own: nothing enters the state dict

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            features, logits = self.encoder.with_logits(x)
            y = self.adjust(features, logits)
            return y.clamp_min(torch.finfo(y.dtype).tiny).log()


@register("lame", summary="Laplacian smoothing of the source model's predictions over the batch's feature graph",
          adapts="nothing (output correction)", cost=Cost(nograd=1, params="none"))
def lame(model, *, affinity: str = "rbf", knn: int = 5, force_symmetry: bool = False, lam: float = 1.0,
         max_iter: int = 100, tol: float = 1e-8):
    """``affinity``: ``rbf`` (scale = mean distance to the knn-th neighbour, self included), ``knn`` (0/1 on the
    knn nearest others) or ``linear`` (cosine); ``force_symmetry`` averages W with its transpose; ``lam``,
    ``max_iter``, ``tol``: weight of the Laplacian term and the bound optimisation's stopping rule."""
    adjust = LaplacianAdjust(affinity, knn, force_symmetry, lam, max_iter, tol)
    return Recipe(norm=SourceStats(), adapter_cls=LAMEAdapter, options=dict(adjust=adjust))
