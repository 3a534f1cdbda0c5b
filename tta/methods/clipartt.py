"""CLIPArTT (Vargas Hakim et al., WACV 2025; METHODS-VLM V.11): CLIP's visual norm affine parameters adapted
on a batch against pseudo-captions built from each image's top-K classes.

Per batch (episodic: weights and Adam state restored first), ``steps`` (10) times: encode the images with
gradient; from the detached features take each image's K (3) most probable classes under the prompt
"a photo of a {}" (no period, as the official code); caption "a photo of a c1 or c2 or c3" encoded by the
frozen text tower; one Adam step (lr 1e-3) on the pseudo-caption contrastive loss
(:mod:`tta.parts.captions`). Then a fresh forward predicts with the plain prompt.

The official code runs a no-grad forward for the pseudo-labels and a second forward for the loss at
the same weights; their features are equal, so the loss forward's detached features serve both (half the
image forwards, same numbers). ``episodic=False`` keeps the weights and Adam state from batch to batch
(online use; not in the paper).

Official quirk (off by default): the code selects images with ``top-1 probability < threshold_not = 1``,
so an image whose top probability rounds to exactly 1 (frequent with its fp16 weights) leaves the loss
batch; ``skip_saturated=True`` does the same. By default every image gets its caption (the paper's intent).
"""
from __future__ import annotations

import torch

from ..adapter import Adapter, Output, Recipe
from ..errors import ConfigError
from ..models.clip_text import classifier_text, context_length, encode_tokens, prompt_set, tokenize
from ..parts.captions import PseudoCaptionContrast, TopKCaptions
from ..parts.norm import BatchStats
from ..parts.optim import OptimizerSpec
from ..parts.params import NormAffine
from . import Cost, register


def check_clip(model, method: str) -> None:
    if not hasattr(model, "logit_scale") or not hasattr(model, "text") or not hasattr(model, "classnames"):
        raise ConfigError(f"{method} needs a CLIP zero-shot classifier (tta.models.load('openclip:...'))")


class CaptionAdapter(Adapter):
    """The loop pieces WATT and CLIPArTT share: episodic by default, one step of the pseudo-caption loss,
    prediction with a text classifier of the method's own prompts."""
    method_name = "a pseudo-caption method"

    def __init__(self, model, recipe: Recipe, **kw):
        check_clip(model, self.method_name)
        kw.setdefault("episodic", True)
        super().__init__(model, recipe, **kw)

    def caption_step(self, f: torch.Tensor, u: torch.Tensor) -> None:
        """One update on images ``f`` and their captions ``u`` through the recipe's step (a non-finite loss
        is skipped and counted there)."""
        loss = self.recipe.objective(f, u, self.model.logit_scale.exp()).mean()
        out = Output(f, loss, torch.ones(f.shape[0], dtype=torch.bool, device=f.device), None)  # f: no logits here
        self.recipe.step(self, None, out)
        self.last = {"selected": f.shape[0], "loss": out.loss_value, "batch": f.shape[0]}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.model.logits_from_features(self.model.encode_image(x), text)


def caption_recipe(adapter_cls, lr: float, temperature: float, targets: str, **options) -> Recipe:
    """Norm affine parameters (LayerNorm for ViT; BN under batch statistics for RN backbones, as CLIPArTT's
    code), the pseudo-caption loss, Adam (betas 0.9/0.999, no weight decay) at ``lr``."""
    return Recipe(norm=BatchStats(), params=NormAffine(), objective=PseudoCaptionContrast(temperature, targets),
                  optimizer=OptimizerSpec("adam", lr=lr), adapter_cls=adapter_cls, options=options)


class CLIPArTTAdapter(CaptionAdapter):
    method_name = "clipartt"

    def __init__(self, model, recipe: Recipe, *, k: int = 3, template: str = "a photo of a {}",
                 skip_saturated: bool = False, **kw):
        kw.setdefault("steps", 10)
        super().__init__(model, recipe, **kw)
        if not 1 <= k <= model.num_classes:
            raise ConfigError(f"k must be between 1 and the number of classes ({model.num_classes}), got {k}")
        (template,) = prompt_set([template])
        self.k, self.skip_saturated = k, skip_saturated
        self.register_buffer("class_text", classifier_text(model, [template]), persistent=False)
        self.captions = TopKCaptions(model.classnames, template, self._encode)

    def _encode(self, texts) -> torch.Tensor:
        text = self.model.text
        with torch.no_grad():
            return encode_tokens(text, tokenize(self.model.tokenizer, texts, context_length(text)).to(self.device))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.captions.clear()
        for _ in range(self.steps):
            f = self.model.encode_image(x)
            probs = self.model.logits_from_features(f.detach(), self.class_text).softmax(1)
            top = probs.topk(self.k, 1)
            keep = top.values[:, 0] < 1 if self.skip_saturated else slice(None)
            if self.skip_saturated and not keep.any():
                self.counters["empty"] += 1
                continue
            self.caption_step(f[keep], self.captions(top.indices[keep]))
        return self.predict(x, self.class_text)


@register("clipartt", summary="CLIP pseudo-captions from each image's top-K classes, soft contrastive targets",
          adapts="visual LayerNorm affine", cost=Cost(grad=10, backward=10, nograd=1), requires="clip")
def clipartt(model, *, k: int = 3, template: str = "a photo of a {}", temperature: float = 0.01,
             targets: str = "transposed", skip_saturated: bool = False):
    """10 Adam steps (lr 1e-3, hard-coded in the official code) per batch, episodic. ``k``: classes per caption;
    ``template``: the class prompt and caption stem; ``temperature``: of the targets; ``targets``:
    ``transposed`` (official) or ``rows`` (:mod:`tta.parts.captions`); ``skip_saturated``: the official
    top-probability-equals-1 exclusion (module docstring)."""
    return caption_recipe(CLIPArTTAdapter, 1e-3, temperature, targets, k=k, template=template,
                          skip_saturated=skip_saturated)
