"""TPT (Shu et al., NeurIPS 2022; METHODS.md 3.11): tune 4 prompt context vectors per test image.

Each image, independently: reset to the source prompt ("a photo of a"), make 64 views (view 0 = the
image), keep the 10% of views with the lowest entropy, take one AdamW step (lr 5e-3) on the entropy
of their mean prediction, and predict on view 0 with the tuned prompt. The image tower is frozen, so
the views are encoded once; only the text side runs with gradients.

Views: the shared CLIP view generator (:mod:`tta.parts.clip_views`), crop-flip by default (TPT's views on
ImageNet and its variants; ``policy: augmix`` for the fine-grained sets, METHODS-VLM V.14), the views of
all images of a batch encoded together, ``chunk`` images per forward. The per-image reset restores the
random generator too, so an image's prediction depends on that image alone (not on its position in the
stream): every image's views come from the first per-image seed of the adapter's seed; the price is that
images of one size get the same crop boxes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter, Recipe
from ..errors import ConfigError
from ..parts.norm import SourceStats
from ..parts.objectives import Entropy, view_marginal_entropy
from ..parts.optim import OptimizerSpec
from ..parts.params import OwnParameter
from ..parts.postprocess import build as build_postprocess
from ..parts.clip_views import image_seeds
from ..parts.view_select import select_confident
from . import Cost, register
from .view_adapter import make_views


class PromptTuned(nn.Module):
    """A CLIP classifier whose class prompts are ``[SOT] ctx_1..ctx_n <class name>. [EOT]`` with learnable
    ``ctx`` (CoOp-style, shared by all classes), initialised from the embedding of ``ctx_init``."""

    def __init__(self, classifier: nn.Module, ctx_init: str = "a photo of a"):
        super().__init__()
        if not hasattr(classifier, "text") or not hasattr(classifier, "tokenizer"):
            raise ConfigError("tpt needs a CLIP zero-shot classifier (tta.models.load('openclip:...'))")
        self.classifier = classifier
        n_ctx = int((classifier.tokenizer([ctx_init])[0] > 0).sum()) - 2  # minus SOT and EOT
        tokens = classifier.tokenizer([f"{ctx_init} {c}." for c in classifier.classnames]).to(classifier.mean.device)
        with torch.no_grad():
            emb = classifier.text.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1], persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx:], persistent=False)
        self.ctx = nn.Parameter(emb[0, 1:1 + n_ctx].clone())

    def text_features(self) -> torch.Tensor:
        """Normalised class embeddings from the current context (differentiable in ``ctx``)."""
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        x = torch.cat([self.prefix, ctx, self.suffix], 1)
        return F.normalize(self.classifier.text.encode_embeddings(x, self.tokens), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits_from_features(self.classifier.encode_image(x), self.text_features())


class TPTAdapter(Adapter):
    def __init__(self, model, recipe: Recipe, *, views: int = 64, keep: float = 0.1,
                 ctx_init: str = "a photo of a", sharpen=None, policy: str = "crop_flip", chunk: int = 8,
                 view_options=None, **kw):
        super().__init__(PromptTuned(model, ctx_init), recipe, **kw)
        self.view_gen = make_views(model, policy, views, view_options, chunk)
        self.views, self.keep, self.chunk = views, keep, chunk
        self.sharpen = build_postprocess(sharpen)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.reset()  # as before every image: each image's views come from the same seed
        seeds = image_seeds(self.generator, 1).expand(len(x))
        clf = self.model.classifier
        with torch.no_grad():  # the image tower is frozen: every view of the batch encoded once
            u = self.view_gen.features(clf, x, seeds, self.chunk)
        return torch.cat([self._tune_and_predict(features) for features in u])

    def _tune_and_predict(self, u: torch.Tensor) -> torch.Tensor:
        self.reset()
        clf = self.model.classifier
        chosen = None
        for _ in range(self.steps):
            logits = clf.logits_from_features(u, self.model.text_features())
            if chosen is None:  # views chosen once, at the first step
                chosen = select_confident(logits.detach().unsqueeze(0), self.keep)[0]
            kept = logits[chosen]
            if self.sharpen is not None:  # sharpened values, gradients of the raw logits (straight through)
                kept = kept + (self.sharpen(kept.detach()) - kept.detach())
            loss = view_marginal_entropy(kept)
            self.backward(loss)
            self.optimizer_step()
        self.last = {"selected": chosen.numel(), "loss": float(loss.detach()), "views": self.views}
        with torch.no_grad():
            return clf.logits_from_features(u[:1], self.model.text_features())


@register("tpt", summary="episodic prompt tuning on confident augmented views",
          adapts="prompt context vectors", cost=Cost(grad=64, backward=1, nograd=1, params="all"), requires="clip")
def tpt(model, *, views: int = 64, keep: float = 0.1, ctx_init: str = "a photo of a", sharpen=None,
        policy: str = "crop_flip", chunk: int = 8, view_options=None):
    """One AdamW step (lr 5e-3, weight decay 0.01) on 4 prompt vectors, episodic per image. ``sharpen``: a
    post-processor (``em_inf``) applied to the kept views' logits before their average (straight-through);
    ``policy``: ``crop_flip`` or ``augmix`` views; ``chunk``: images per encoder forward (memory only)."""
    return Recipe(norm=SourceStats(), params=OwnParameter("ctx"), objective=Entropy(),
                  optimizer=OptimizerSpec("adamw", lr=5e-3, weight_decay=0.01), adapter_cls=TPTAdapter,
                  options=dict(views=views, keep=keep, ctx_init=ctx_init, sharpen=sharpen, policy=policy,
                               chunk=chunk, view_options=view_options))
