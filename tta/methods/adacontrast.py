"""AdaContrast (Chen, Wang, Darrell, Ebrahimi; CVPR 2022; METHODS-ZOO Z.11): self-training of every weight
on pseudo-labels refined by a soft k-NN vote in feature space, plus MoCo instance discrimination against
an EMA key encoder with class-aware negatives and a diversity term. The prediction is post-update: the
student in eval mode (running BN statistics) on the plain test view.

Defaults are the reference's CIFAR-10-C values (SGD lr 2e-4, momentum 0.9, Nesterov, weight decay 1e-4 on
every weight; T 0.07; EMA 0.999; queue 16,384; 10 neighbours; plain arg-max until 1,024 images were
seen); ImageNet-C uses the same values at batch 64.

Where tta differs from the reference, without changing the algorithm:

* the student's forward on the weak view runs without autograd: with the reference's ``weak_strong``
  supervision no loss term depends on it (only its BN running statistics move, which they do without
  autograd too), so the same numbers come out for one differentiable forward less;
* views are made on the batch tensor, each image with its own draws, not per image in PIL loader workers
  (``tta.parts.moco_views``; ``pil_grid`` reproduces the reference's 8-bit truncation);
* the diversity term is ``-H(mean p)`` with ``p`` clamped at 1e-12 inside the log (tta's marginal
  entropy), where the reference adds 1e-8: a relative difference below 1e-6;
* the key update is ``lerp`` (``k + (1 - m)(s - k)``) rather than ``m k + (1 - m) s``: float rounding only;
* the random initial queue is drawn from the adapter's generator at the first batch (when the feature
  size is known), so ``reset()`` draws the same queue again and a reset run repeats bit for bit.

Cost per batch: one forward with autograd (q) and its backward through every weight; four forwards
without (student on w and on t, key network on k and on w): ``Cost(grad=1, backward=1, nograd=4)``,
where Z.16 counts the reference's differentiable w forward as a second gradient forward. On top of it,
the InfoNCE logits against the 16,384 keys and the k-NN search over the bank (together about 4 % of the
forwards with the CIFAR ResNet-20 at batch 200, one CPU thread) and the views (about 3 %).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapter import Adapter, Batch, Recipe
from ..errors import ConfigError
from ..models.split import split
from ..parts.base import Part
from ..parts.moco import KeyQueue, KNNBank, info_nce
from ..parts.moco_views import moco_views
from ..parts.norm import TrainStats
from ..parts.objectives import MarginalEntropyBonus
from ..parts.optim import OptimizerSpec
from ..parts.params import AllParams
from ..parts.teacher import ema_, frozen_copy
from . import Cost, register


class PseudoLabelAndInstance(Part):
    """Per-sample ``alpha CE(z_q, y^) + beta InfoNCE(l)``: the pseudo-labels and the class-aware instance
    logits are handed over in ``batch.extras`` (``pseudo_labels``, ``instance_logits``)."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0):
        self.alpha, self.beta = alpha, beta

    def __call__(self, batch) -> torch.Tensor:
        ce = F.cross_entropy(batch.logits, batch.extras["pseudo_labels"], reduction="none")
        return self.alpha * ce + self.beta * info_nce(batch.extras["instance_logits"])


class AdaContrastAdapter(Adapter):
    """The AdaContrast loop (Z.11). Its own loop because a batch is four views, not one input: the loss
    forward (strong view q) is not the forward that makes the pseudo-labels (weak view w) nor the one that
    predicts (test view t, after the step, with running statistics); a key network and two memories are
    read and written between the forwards in a fixed order. The key network is a registered submodule;
    queue, bank and the image counter are rebuilt by ``reset_state``."""

    def __init__(self, model, recipe: Recipe, *, queue_size: int = 16384, temperature: float = 0.07,
                 ema: float = 0.999, neighbours: int = 10, warmup_samples: int = 1024, class_aware: bool = True,
                 pil_grid: bool = True, **loop):
        super().__init__(model, recipe, **loop)
        if not 0.0 <= ema <= 1.0:
            raise ConfigError(f"ema must be in [0, 1], got {ema}")
        if warmup_samples < neighbours:
            raise ConfigError(f"warmup_samples ({warmup_samples}) must be at least neighbours ({neighbours}): "
                              "the k-NN vote needs that many stored images")
        self.ema, self.warmup_samples, self.pil_grid = ema, warmup_samples, pil_grid
        self.queue = KeyQueue(queue_size, temperature, class_aware)
        self.bank = KNNBank(queue_size, neighbours)
        self.encoder, _ = split(self.model)
        self.key_model = frozen_copy(self.model)  # N-train like the student: its running stats move too
        self.key_encoder, _ = split(self.key_model)
        self.reset_state()

    def reset_state(self) -> None:
        """Key network = the (restored) student; empty memories (the queue is drawn again at the next
        batch from the re-seeded generator); no image seen."""
        self.key_model.load_state_dict(self.model.state_dict())
        self.queue.clear()
        self.bank.reset()
        self.n_seen, self.last_knn = 0, False

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        test, weak, query, key = moco_views(x, self.generator, self.pil_grid)
        for _ in range(self.steps):
            self.adapt_step(weak, query, key)
        self.model.eval()  # post-update prediction with the running statistics
        try:
            with torch.inference_mode():
                return self.model(test)
        finally:
            self.recipe.norm(self.model)

    def adapt_step(self, weak: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
        with torch.no_grad():
            feats_w, logits_w = self.encoder.with_logits(weak)  # first N-train update of the batch
            labels = self.pseudo_labels(feats_w, logits_w)
        feats_q, logits_q = self.encoder.with_logits(query)  # second N-train update
        with torch.no_grad():
            ema_(self.key_model, self.model, self.ema)  # before this batch's step
            keys = F.normalize(self.key_encoder(key), dim=1)
        if self.queue.empty:
            self.queue.fill(keys.shape[1], logits_q.shape[1], self.generator, keys.device)
        batch = Batch(query, logits_q, self)
        batch.extras.update(pseudo_labels=labels,
                            instance_logits=self.queue.instance_logits(F.normalize(feats_q, dim=1), keys, labels))
        loss = self.recipe.objective(batch).mean() + sum(term(batch) for term in self.recipe.batch_terms)
        stepped = bool(torch.isfinite(loss.detach()))
        if stepped:
            self.backward(loss)
            self.optimizer_step()
        else:
            self.counters["nonfinite"] += 1
        with torch.no_grad():
            feats_k, logits_k = self.key_encoder.with_logits(weak)
            self.bank.push(feats_k, logits_k.softmax(1))
        self.last = {"selected": len(query), "stepped": stepped, "loss": float(loss.detach()),
                     "batch": len(query), "knn": self.last_knn}
        self.counters["selected"] += len(query)

    def pseudo_labels(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Soft k-NN labels once ``warmup_samples`` images were seen, plain arg-max before (counting them)."""
        self.last_knn = self.n_seen >= self.warmup_samples
        if self.last_knn:
            return self.bank.refine(feats)[0]
        self.n_seen += len(feats)
        return logits.argmax(1)


@register("adacontrast", summary="pseudo-labels refined by soft k-NN, MoCo contrast with an EMA key encoder",
          adapts="all weights", cost=Cost(grad=1, backward=1, nograd=4, params="all"))
def adacontrast(model, *, queue_size: int = 16384, temperature: float = 0.07, ema: float = 0.999,
                neighbours: int = 10, warmup_samples: int = 1024, alpha: float = 1.0, beta: float = 1.0,
                eta: float = 1.0, class_aware: bool = True, pil_grid: bool = True):
    """``queue_size``: keys in the MoCo queue, also the k-NN bank's capacity; ``temperature``: InfoNCE
    temperature; ``ema``: key-network momentum; ``neighbours``: k of the soft k-NN vote, used once
    ``warmup_samples`` images were seen; ``alpha``, ``beta``, ``eta``: weights of the pseudo-label CE, the
    InfoNCE and the diversity term; ``class_aware``: mask negatives with the query's pseudo-label;
    ``pil_grid``: views on the 8-bit grid as the reference's PIL pipeline (``tta.parts.moco_views``)."""
    return Recipe(norm=TrainStats(), params=AllParams(), objective=PseudoLabelAndInstance(alpha, beta),
                  batch_terms=[MarginalEntropyBonus(eta)],
                  optimizer=OptimizerSpec("sgd", lr=2e-4, momentum=0.9, nesterov=True, weight_decay=1e-4),
                  adapter_cls=AdaContrastAdapter,
                  options=dict(queue_size=queue_size, temperature=temperature, ema=ema, neighbours=neighbours,
                               warmup_samples=warmup_samples, class_aware=class_aware, pil_grid=pil_grid))
