"""What the online cache methods for CLIP share (TDA, BoostAdapter, DPE, DMN-ZS; METHODS-VLM V.15): the class
text embeddings, the views of a batch encoded in one pass, and the confidence-selected view aggregate.

The methods' state is sequential (each image is scored after it entered the caches), but nothing about the
image encoder is: the views of all B images of a batch go through it together (``chunk`` images' views per
forward, to bound memory), and only the cheap cache updates and read-outs run image by image. The
image tower is frozen, so every feature is computed without autograd (DPE's residuals only need the
features as constants: same numbers as the official code, which back-propagates into the unused encoder).

State scope ``online-dataset`` (V.15.8): caches persist across batches; ``reset()`` empties them and
re-seeds the view generator, so a stream replayed after ``reset()`` gives the same numbers bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..adapter import Recipe
from ..errors import ConfigError, MissingFileError
from ..models.clip_text import class_text_features, prompt_set, template_prompts
from ..parts.clip_views import image_seeds
from ..parts.norm import SourceStats
from ..parts.optim import OptimizerSpec
from ..parts.view_select import (confident_count, entropy_of_mean_prob, mean_features, mean_logits, mean_probs,
                                 select_confident, take)
from .view_adapter import ViewAdapter


def cupl_sentences(path: Union[str, Path], classnames: Sequence[str]) -> list:
    """Per-class sentence lists from a user-placed CuPL JSON (``{class name: [sentences]}``; we do not ship
    the files). A class is looked up by its name, then with underscores as spaces; a missing one is an error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"CuPL prompt file {path} not found (a JSON object mapping class names to "
                               f"lists of sentences, e.g. CuPL_prompts_imagenet.json)")
    table = json.loads(path.read_text())
    out, missing = [], []
    for name in classnames:
        found = table.get(name, table.get(name.replace("_", " ")))
        missing += [] if found else [name]
        out.append(list(found or []))
    if missing:
        raise ConfigError(f"{len(missing)} class(es) have no sentences in {path}, e.g. {missing[:5]}")
    return out


def class_text(model, templates, cupl) -> torch.Tensor:
    """``(C, D)`` class embeddings from every prompt of a class, its templates (``templates`` or the
    classifier's) then its CuPL sentences: encoded, normalised, averaged, re-normalised (V.15.1)."""
    prompts = template_prompts(model.classnames, prompt_set(templates) if templates is not None else model.templates)
    prompts = [p + s for p, s in zip(prompts, cupl_sentences(cupl, model.classnames))]
    return class_text_features(model.text, model.tokenizer, prompts)


@dataclass
class ViewAggregate:
    """Per image: mean selected feature (not re-normalised), mean selected logits, mean selected probabilities,
    entropy of that mean (nats) and the arg-max of the mean logits (V.1 step 2)."""
    feature: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor
    label: torch.Tensor


def aggregate(features: torch.Tensor, logits: torch.Tensor, keep: float) -> ViewAggregate:
    """TDA's view aggregation of ``(B, N, D)`` features and ``(B, N, C)`` logits over the ``floor(keep N)``
    lowest-entropy views (V.15.3's aggregators); one view: that view."""
    if logits.shape[1] > 1:
        idx = select_confident(logits, keep)
        features, logits = take(features, idx), take(logits, idx)
    z = mean_logits(logits)
    return ViewAggregate(mean_features(features), z, mean_probs(logits), entropy_of_mean_prob(logits), z.argmax(-1))


class OnlineCLIPAdapter(ViewAdapter):
    """Base of the online cache methods: the shared view loop (:class:`~tta.methods.view_adapter.ViewAdapter`:
    ``views``, ``policy``, ``chunk`` images per encoder forward, ``templates``, ``view_options``) plus ``keep``,
    the confident fraction of the views, and ``cupl``, a CuPL sentence file added to every class's prompts.
    Subclasses define ``stream``: the image-by-image rule over the view features of a batch."""

    def __init__(self, model, recipe: Recipe, *, keep: float = 0.1, cupl=None, **kw):
        confident_count(64, keep)  # one clear error for a bad fraction
        super().__init__(model, recipe, **kw)
        self.keep = keep
        if cupl is not None:
            self.own_text = class_text(model, self.templates, cupl).to(model.logit_scale.device)
        self.scale = float(model.logit_scale.exp())

    @property
    def text(self) -> torch.Tensor:
        """``(C, D)`` class embeddings (frozen: the methods keep their own evolving copies)."""
        return self.text_features()

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    def view_logits(self, features: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``s f W^T`` for features of any leading shape."""
        return self.scale * features @ (self.text if text is None else text).t()

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        seeds = image_seeds(self.generator, len(x))
        with torch.no_grad():  # not inference mode: DPE differentiates its residuals against these features
            features = self.view_gen.features(self.model, x, seeds, self.chunk)
        self.counters["views"] += features.shape[0] * features.shape[1]
        self.last = {"batch": len(x), "views": self.view_gen.views}  # stream() may add its own entries
        return self.stream(features)

    def stream(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` for the view features ``(B, N, D)`` of a batch, image by image in order."""
        raise NotImplementedError


def online_recipe(adapter_cls, optimizer: Optional[OptimizerSpec] = None, **options) -> Recipe:
    """The recipe of an online CLIP cache method: the model in eval mode, nothing of it trained by the loop
    (``optimizer``: the spec of DPE's per-image residual optimiser, built by the method itself)."""
    return Recipe(norm=SourceStats(), adapter_cls=adapter_cls, options=options,
                  optimizer=optimizer or OptimizerSpec())


__all__ = ["cupl_sentences", "class_text", "ViewAggregate", "aggregate", "OnlineCLIPAdapter", "online_recipe"]
