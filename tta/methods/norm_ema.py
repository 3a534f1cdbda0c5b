"""BN-EMA (METHODS-ZOO Z.1, the reference's ``bnema``): the BN running statistics follow the test stream as an
exponential moving average (momentum = each layer's own, 0.1 for the CIFAR ResNets), and predictions use
them. No parameter changes, no gradients.

Per batch, two forwards: pass 1 with the BN layers in PyTorch train mode (N-train) moves the running
buffers with the batch mean and unbiased variance, its output discarded; pass 2 in eval mode normalises with
the updated buffers and is returned. One fused pass would not be the same algorithm: in pass 1 each layer's
statistics are those of activations produced by *batch*-normalised earlier layers, which is what the
reference accumulates. Reset restores the running buffers (they are in the model's state dict).

Deviation (by design, Z.1 pitfalls): only the norm layers switch to train mode for pass 1; the reference
switches the whole model (dropout or stochastic depth would fire there; no effect on ResNets).
"""
import torch

from ..adapter import Adapter, Recipe
from ..parts.norm import TrainStats
from ..parts.params import BATCH_NORMS
from . import Cost, register


class BNEMAAdapter(Adapter):
    """The two-pass loop. Its own loop because the base no-gradient loop is one forward in one norm mode,
    and BN-EMA needs two forwards in two modes (update, then predict), with no loss in between."""

    def __init__(self, model, recipe: Recipe, **loop):
        super().__init__(model, recipe, **loop)
        self.norm_layers = [m for m in self.model.modules() if isinstance(m, BATCH_NORMS)]

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            self.model(x)  # N-train: moves the running statistics; output discarded
            for m in self.norm_layers:
                m.train(False)
            try:
                return self.model(x)  # eval mode: the updated running statistics
            finally:
                for m in self.norm_layers:
                    m.train(True)


@register("norm_ema", summary="BN running statistics as an EMA over the test stream, predict with them",
          adapts="BN statistics (running EMA)", cost=Cost(nograd=2, params="none"))
def norm_ema(model):
    return Recipe(norm=TrainStats(), adapter_cls=BNEMAAdapter)
