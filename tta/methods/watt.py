"""WATT (Osowiechi et al., NeurIPS 2024; METHODS-VLM V.10): CLIP's visual norm affine parameters adapted once
per text template against pseudo-captions, the per-template results averaged, ``rounds`` times.

Per batch (episodic: weights and Adam state restored first), for m = 1..``rounds`` (M = 5): for each of the T
templates (``watt8``), ``steps`` (L = 2) Adam steps of the pseudo-caption contrastive loss
(:mod:`tta.parts.captions`) whose caption for image i is the template's text embedding of its predicted
class; snapshot the weights after each template; load their average. Then predict with the averaged-template
classifier (mean of the T per-template class embeddings, re-normalised; ``ref_eval``: "a photo of a {}").

``mode="sequential"`` (WATT-S): the templates follow one another from the current weights; each round
starts from the last average. ``mode="parallel"`` (WATT-P): every template starts from the round's start
(the batch's start with its Adam state in round 1, the last average in later rounds). As in the official
code, Adam's moments are never reset inside a batch after round 1: they carry over templates and rounds.

The official code runs a no-grad forward for the pseudo-labels and a second forward for the loss at the
same weights; their features are equal, so the loss forward's detached features serve both (80 image
forwards per batch instead of 160 for WATT-S, same numbers). ``episodic=False`` keeps weights and Adam state
from batch to batch (online use; not in the paper). On a ResNet image tower (no LayerNorm: the official code
would adapt nothing) the BN affine parameters adapt under batch statistics, as CLIPArTT's code does for RN
backbones. The only official quirk that changes numbers is the shared loss's transposed targets (``targets``;
default official, the paper text was not readable to check its intent).
"""
from __future__ import annotations

import copy

import torch

from ..adapter import Recipe
from ..errors import ConfigError
from ..models.clip_text import classifier_text
from ..parts import weight_average as wa
from . import Cost, register
from .clipartt import CaptionAdapter, caption_recipe

MODES = ("sequential", "parallel")


class WATTAdapter(CaptionAdapter):
    method_name = "watt"

    def __init__(self, model, recipe: Recipe, *, rounds: int = 5, mode: str = "sequential",
                 templates="watt8", ref_eval: bool = False, **kw):
        kw.setdefault("steps", 2)
        super().__init__(model, recipe, **kw)
        if mode not in MODES:
            raise ConfigError(f"watt mode must be one of {MODES}, got {mode!r}")
        if rounds < 1 or self.steps < 1:
            raise ConfigError(f"watt needs rounds >= 1 and steps >= 1, got rounds={rounds}, steps={self.steps}")
        self.rounds, self.mode = rounds, mode
        per_template = classifier_text(model, templates, per_prompt=True)  # (C, T, D)
        self.register_buffer("template_text", per_template.transpose(0, 1).contiguous(), persistent=False)
        mean = torch.nn.functional.normalize(per_template.mean(1), dim=-1)
        self.register_buffer("eval_text", classifier_text(model, ["a photo of a {}"]) if ref_eval else mean,
                             persistent=False)

    def _adapt_template(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``steps`` updates against this template's captions; the weights after them, as one vector."""
        for _ in range(self.steps):
            f = self.model.encode_image(x)
            self.caption_step(f, text[(f.detach() @ text.t()).argmax(1)])
        return wa.snapshot(self.params)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        start, start_optim = wa.snapshot(self.params), copy.deepcopy(self.optimizer.state_dict())
        average = None
        for m in range(self.rounds):
            if self.mode == "sequential" and m > 0:
                wa.load(self.params, average)
            snapshots = []
            for text in self.template_text:
                if self.mode == "parallel":
                    wa.load(self.params, start if m == 0 else average)
                    if m == 0:
                        self.optimizer.load_state_dict(copy.deepcopy(start_optim))
                snapshots.append(self._adapt_template(x, text))
            average = wa.average(snapshots)
        wa.load(self.params, average)
        return self.predict(x, self.eval_text)


@register("watt", summary="CLIP pseudo-caption contrastive adaptation per template, weights averaged over templates",
          adapts="visual LayerNorm affine", cost=Cost(grad=80, backward=80, nograd=1), requires="clip")
def watt(model, *, rounds: int = 5, mode: str = "sequential", templates="watt8", ref_eval: bool = False,
         temperature: float = 0.01, targets: str = "transposed"):
    """Adam lr 1e-3 (CIFAR scripts; 1e-4 for the others), episodic per batch; ``steps`` = L (2) per template,
    ``rounds`` = M (5; the WATT-P scripts use 50), ``mode`` sequential (WATT-S) or parallel (WATT-P);
    ``templates``: a prompt set or list (``watt8``); ``ref_eval``: predict with "a photo of a {}" only;
    ``temperature``, ``targets``: of the shared loss (:mod:`tta.parts.captions`). Cost: M*T*L forwards."""
    return caption_recipe(WATTAdapter, 1e-3, temperature, targets, rounds=rounds, mode=mode, templates=templates,
                          ref_eval=ref_eval)
