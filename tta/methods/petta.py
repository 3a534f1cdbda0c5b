"""PeTTA (Hoang, Vo, Do; NeurIPS 2024; METHODS-ZOO Z.13): persistent test-time adaptation for recurring
streams, where repeated visits of the same shifts slowly collapse other methods.

RoTTA's machinery (robust BN, a CSTU class-balanced memory, a mean teacher that labels) trained once per
batch on the memory, plus collapse-aware control: a running class-prototype memory of the teacher's
features is compared with source feature statistics; the further the prototypes have drifted from the
source (a Mahalanobis-like divergence ``D``, turned into ``g = 1 - exp(-D)``), the stronger the pull of
the adapted BN affines towards the initial model (``lambda = g * lambda_0``, a cosine regulariser) and
the slower the teacher follows the student (``alpha = (1 - g) * alpha_0``). An anchor loss keeps the
student's predictions on the augmented memory close to those of the initial model, whose own robust-BN
statistics do drift (it runs in train mode, never updated by gradient).

Its own loop (:class:`PeTTAAdapter`): the prediction is a teacher's, the training batch is the memory,
three networks run in train mode in a fixed order, and the teacher's EMA rate and the regulariser weight
are recomputed every batch from the prototype drift; none of that is a recipe of the base loop.

Source statistics: per class the mean and the diagonal unbiased variance of the source model's features
(eval mode) under its own arg-max labels, from ``source_images`` (labels unused). The official code reads
the clean CIFAR-10 *test* set; tta's streams are built from those very images, so the configs use the
training images instead (no test image is seen twice; our choice, Z.13 pitfall). A class predicted fewer
than twice has no variance: its dimensions then use the variance over all source features, and a class
never predicted takes the overall mean and variance (the official code would carry NaN; our guard).

Defaults are the official CIFAR-10-C values (Adam 1e-3, memory 64, robust-BN momentum 0.05, alpha_0 1e-3,
lambda_0 10, anchor weight 1, cosine regulariser, ``loss: sce``); ImageNet uses ``loss: ce``. The official
batch size is 64 (configs/cifar10c/petta.yaml sets it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..adapter import Adapter, Recipe
from ..errors import ConfigError
from ..models.split import split
from ..parts.augment import augment_ct
from ..parts.memory import CSTUMemory
from ..parts.objectives import soft_cross_entropy, symmetric_cross_entropy
from ..parts.optim import OptimizerSpec
from ..parts.params import BATCH_NORMS, NormAffine
from ..parts.prototypes import feature_stats
from ..parts.robust_bn import RobustStats, set_robust_training
from ..parts.source import as_float, check_source
from ..parts.teacher import ema_, frozen_copy
from . import Cost, register

LOSSES = ("sce", "ce")
REGULARISERS = ("cosine", "l2")


def drift_divergence(proto: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``D = mean over c in classes and d of (proto_cd - mu_cd)^2 / (var_cd + 1e-6)``."""
    return ((proto[classes] - mu[classes]) ** 2 / (var[classes] + 1e-6)).mean()


def parameter_regulariser(params, anchors, kind: str = "cosine") -> torch.Tensor:
    """``-mean_t cos(theta_t, theta0_t)`` (whole-tensor cosine) or ``mean_t ||theta_t - theta0_t||^2``."""
    if kind == "cosine":
        terms = [F.cosine_similarity(p.flatten(), a.flatten(), dim=0) for p, a in zip(params, anchors)]
        return -torch.stack(terms).mean()
    return torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchors)]).mean()


class PeTTAAdapter(Adapter):
    def __init__(self, model, recipe: Recipe, *, source_images=None, memory_size: int = 64,
                 alpha_0: float = 1e-3, lambda_0: float = 10.0, anchor_weight: float = 1.0,
                 regulariser: str = "cosine", adaptive_lambda: bool = True, adaptive_alpha: bool = True,
                 loss: str = "sce", proto_momentum: float = 0.05, lambda_t: float = 1.0, lambda_u: float = 1.0,
                 stats_batch: int = 512, **loop):
        super().__init__(model, recipe, **loop)
        check_source("petta", source_images, need_labels=False)
        if loss not in LOSSES or regulariser not in REGULARISERS:
            raise ConfigError(f"petta loss must be one of {LOSSES} and regulariser one of {REGULARISERS}, "
                              f"got {loss!r}, {regulariser!r}")
        if self.steps != 1:
            raise ConfigError(f"petta trains once per batch on its memory: steps must be 1, got {self.steps}")
        CSTUMemory(memory_size, 2, lambda_t, lambda_u)  # validate the memory options now
        self.memory_size, self.lambdas = memory_size, (lambda_t, lambda_u)
        self.alpha_0, self.lambda_0, self.anchor_weight, self.regulariser = alpha_0, lambda_0, anchor_weight, regulariser
        self.adaptive_lambda, self.adaptive_alpha, self.loss, self.proto_momentum = \
            adaptive_lambda, adaptive_alpha, loss, proto_momentum
        self.batch_stats = False  # predictions use the teacher's stored statistics
        self.teacher = frozen_copy(self.model)
        self.init_model = frozen_copy(self.model)  # never trained, but its robust statistics drift
        mu, var = self._source_stats(source_images, stats_batch)
        self.register_buffer("mu_src", mu)
        self.register_buffer("var_src", var)
        self.register_buffer("proto", mu.clone())
        self.reset_state()
        self.snapshot()

    @torch.no_grad()
    def _source_stats(self, images: torch.Tensor, batch: int):
        set_robust_training(self.model, False)  # the source model: eval mode, source statistics
        try:
            encoder = split(self.model)[0]
            stats = feature_stats(encoder, ((as_float(images[i:i + batch]).to(self.device), None)
                                            for i in range(0, len(images), batch)), pseudo_labels=True)
        finally:
            set_robust_training(self.model, True)
        total = stats.count.sum()
        overall_mean = (stats.sum.sum(0) / total)
        overall_var = (stats.sumsq.sum(0) - total * overall_mean ** 2) / (total - 1).clamp_min(1)
        mu = torch.where(stats.present[:, None], stats.mean.double(), overall_mean).float()
        var = torch.where(stats.count[:, None] > 1, stats.var.double(), overall_var).float()
        return mu, var

    def reset_state(self) -> None:
        self.memory: Optional[CSTUMemory] = None
        self.teacher_encoder = split(self.teacher)[0]

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        set_robust_training(self.teacher, False)
        with torch.inference_mode():
            feats, logits = self.teacher_encoder.with_logits(x)
            p = logits.softmax(1)
            labels = p.argmax(1)
            uncertainty = -(p * torch.log(p + 1e-6)).sum(1)
        if self.memory is None:
            self.memory = CSTUMemory(self.memory_size, logits.shape[1], *self.lambdas)
        self.counters["accepted"] += sum(self.memory.add_batch(x, labels, uncertainty))
        gamma = self._drift(feats.clone(), labels.clone())
        self.update(gamma)
        return logits

    @torch.no_grad()
    def _drift(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """``g = 1 - exp(-D)`` with the prototypes before this batch, then the prototype EMA for its classes."""
        classes = labels.unique()
        gamma = 1.0 - float(torch.exp(-drift_divergence(self.proto, self.mu_src, self.var_src, classes)))
        for c in classes.tolist():
            mean = feats[labels == c].mean(0)
            self.proto[c] = (1 - self.proto_momentum) * self.proto[c] + self.proto_momentum * mean
        return gamma

    def update(self, gamma: float) -> None:
        """One step on the memory (Z.13 steps 3-10)."""
        images = self.memory.contents().images
        for net in (self.teacher, self.model, self.init_model):
            set_robust_training(net, True)
        with torch.no_grad():
            z_m = self.teacher(images)
        z_o = self.model(images)
        with torch.no_grad():
            z_0 = self.init_model(images)
        z_a = self.model(augment_ct(images, self.generator))
        if self.loss == "sce":
            l_cls = (0.5 * symmetric_cross_entropy(z_o, z_m) + 0.5 * symmetric_cross_entropy(z_a, z_m)).mean()
        else:
            l_cls = soft_cross_entropy(z_m, z_a).mean()
        init = dict(self.init_model.named_parameters())  # the initial model's (never trained) affines
        reg = parameter_regulariser(self.params, [init[n] for n in self.param_names], self.regulariser)
        l_anchor = soft_cross_entropy(z_0, z_a).mean()
        lam = gamma * self.lambda_0 if self.adaptive_lambda else self.lambda_0
        alpha = (1 - gamma) * self.alpha_0 if self.adaptive_alpha else self.alpha_0
        loss = l_cls + lam * reg + self.anchor_weight * l_anchor
        self.backward(loss)
        self.optimizer_step()
        ema_(self.teacher, self.model, 1.0 - alpha)
        self.counters["selected"] += len(images)
        self.last = {"selected": len(images), "stepped": True, "loss": float(loss.detach()), "batch": len(images),
                     "drift": gamma, "lambda": lam, "alpha": alpha}


@register("petta", summary="RoTTA-style memory teacher with collapse-aware regularisation for recurring streams",
          adapts="robust BN affine", cost=Cost(grad=0.64, backward=1, nograd=1.64),
          source_data="clean images for per-class feature statistics (source_images; labels unused)")
def petta(model, *, source_images: Optional[torch.Tensor] = None, memory_size: int = 64, alpha: float = 0.05,
          alpha_0: float = 1e-3, lambda_0: float = 10.0, anchor_weight: float = 1.0, regulariser: str = "cosine",
          adaptive_lambda: bool = True, adaptive_alpha: bool = True, loss: str = "sce", proto_momentum: float = 0.05,
          lambda_t: float = 1.0, lambda_u: float = 1.0, stats_batch: int = 512):
    """``alpha``: robust-BN momentum; ``alpha_0``/``lambda_0``: base teacher EMA rate and regulariser weight;
    ``anchor_weight``: weight of the anchor loss to the initial model; ``regulariser``: cosine or l2;
    ``loss``: ``sce`` (CIFAR) or ``ce`` (ImageNet); ``proto_momentum``: of the prototype memory;
    ``lambda_t``/``lambda_u``: the CSTU score weights."""
    return Recipe(norm=RobustStats(alpha), params=NormAffine(kinds=BATCH_NORMS), objective=soft_cross_entropy,
                  optimizer=OptimizerSpec("adam", lr=1e-3), adapter_cls=PeTTAAdapter,
                  options=dict(source_images=source_images, memory_size=memory_size, alpha_0=alpha_0,
                               lambda_0=lambda_0, anchor_weight=anchor_weight, regulariser=regulariser,
                               adaptive_lambda=adaptive_lambda, adaptive_alpha=adaptive_alpha, loss=loss,
                               proto_momentum=proto_momentum, lambda_t=lambda_t, lambda_u=lambda_u,
                               stats_batch=stats_batch))
