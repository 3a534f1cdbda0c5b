"""TPS, Test-time Prototype Shifting (Sui, Wang, Yeung-Levy, "Just Shift It"; METHODS-VLM V.8).

Instead of TPT's prompt, TPS tunes a shift ``Delta`` added to cached class prototypes:
``t_c = normalise(normalise(P_c) + Delta_c)`` (:mod:`tta.parts.prototype_shift`). Per image, episodically
(``Delta`` and the AdamW state back to zero before every image): 64 views, logits ``s t_c . f_v``, the 6
lowest-entropy views, one AdamW step (lr 5e-3, weight decay 0.01) on the entropy of their mean prediction,
predict the original view with the shifted prototypes. Both encoders stay frozen and the text encoder never
runs after construction, so a step costs a (C x D) backward instead of TPT's text-encoder backward.

Prototypes (built once here, the official code reads pickles): ``prototypes="template"`` (default) is the mean of
the normalised embeddings of ``templates`` (CLIP's 80, ``clip80``, as the official ``--with_templates``);
the paper's main variant ``micro`` = ``(concept + template) / 2`` needs ``descriptors``, a JSON file
``{class: [descriptor, ...]}`` (TPS's ``gpt4_descriptors``, not shipped here); ``macro`` and ``concept`` as
well. ``pair_by``: descriptors by class name (default) or by position (the official zip, see the part's
docstring). ``shift``: ``per_class`` (the official main scripts, ``--per_label``) or ``shared``.

Views: TPT's rule (crop-flip for the ImageNet family, ``policy: augmix`` for the fine-grained sets). The
official loop re-selects the confident views at every step (TPT keeps the first step's); with the default
single step both are the same.
"""
from __future__ import annotations

from ..adapter import Recipe
from ..parts.norm import SourceStats
from ..parts.objectives import Entropy
from ..parts.optim import OptimizerSpec
from ..parts.prototype_shift import ShiftedPrototypes, class_prototypes
from . import Cost, register
from .view_adapter import check_classifier
from ..parts.params import OwnParameter
from .view_tuning import ViewTuningAdapter


class TPSAdapter(ViewTuningAdapter):
    reselect = True

    def __init__(self, model, recipe, *, prototypes: str = "template", templates="clip80", descriptors=None,
                 pair_by: str = "name", shift: str = "per_class", **kw):
        check_classifier(model, "tps")
        protos = class_prototypes(model, prototypes, templates, descriptors, pair_by)
        super().__init__(ShiftedPrototypes(model, protos, shift), recipe, **kw)
        self.prototype_mode = prototypes


@register("tps", summary="episodic shift of cached class prototypes on confident views (TPS)",
          adapts="class-prototype shift", cost=Cost(nograd=64, backward=1, params="none"), requires="clip")
def tps(model, *, prototypes: str = "template", templates="clip80", descriptors=None, pair_by: str = "name",
        shift: str = "per_class", views: int = 64, keep: float = 0.1, policy: str = "crop_flip", chunk: int = 8,
        view_options=None):
    """One AdamW step (lr 5e-3, weight decay 0.01) per image on a zero-initialised per-class shift of the class
    prototypes; ``prototypes``: ``template`` / ``micro`` / ``macro`` / ``concept`` (the last three need
    ``descriptors``); ``templates``: the prompt set of the template prototypes (``clip80``); ``shift``:
    ``per_class`` or ``shared``; ``chunk``: images per encoder forward (memory only)."""
    return Recipe(norm=SourceStats(), params=OwnParameter("shift"), objective=Entropy(),
                  optimizer=OptimizerSpec("adamw", lr=5e-3, weight_decay=0.01), adapter_cls=TPSAdapter,
                  options=dict(prototypes=prototypes, templates=templates, descriptors=descriptors, pair_by=pair_by,
                               shift=shift, views=views, keep=keep, policy=policy, chunk=chunk,
                               view_options=view_options))
