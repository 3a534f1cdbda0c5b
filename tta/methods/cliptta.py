"""CLIPTTA (Lafon et al., NeurIPS 2025; METHODS.md 3.9): soft batch contrastive TTA of CLIP's visual
LayerNorms, with a class-wise confident memory and, for open-set streams, the OCE threshold loss.

Per batch: (open set) Otsu-initialise the threshold on the batch's OOD scores; then ``steps`` (10)
inner steps of ``beta_tta (L_sc(batch_ID) + L_sc(memory)) - beta_reg (H(batch) + H(memory))
+ beta_ood L_OCE``, the batch's ID images entering the memory at the first step; the prediction is a
fresh forward after the steps. Defaults are the CIFAR-10 ones (K_shot 4, sample 40); CIFAR-100 and
open-set use 16/128 (configs/).

The reference's two additions (METHODS.md 3.9 and its gap 7) are options of this one method rather than
new names, because each changes one term of the same loop and the reference scripts select them by flag:

* ``adapt_text``: the text tower's LayerNorm affine parameters adapt too. The class prototypes are then
  re-encoded with gradient at every inner step (from the classifier's own prompts), and ``L_sc`` takes both
  directions (image->text and text->image), as the reference does when text adapts (``text_to_image``
  overrides that). The text LayerNorms are part of the adapter's state, so ``reset()`` restores them.
* ``memory_only`` (the reference's ``cliptta_old``, used by its ImageNet closed-set script): the batch only
  feeds the memory (one forward without gradient at the first step); the loss is computed on the memory
  sample alone. With ``open_set`` the OCE term still needs the batch's scores, so the batch is then
  forwarded with gradient at every step but enters neither ``L_sc`` nor the entropy bonus.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..adapter import Adapter, Batch, Recipe
from ..errors import ConfigError
from ..models.clip_text import context_length, encode_tokens, pool, template_prompts, tokenize
from ..parts.clip_losses import ClassMemory, OutlierContrast, SoftContrastive, max_log_prob
from ..parts.norm import BatchStats
from ..parts.objectives import MarginalEntropyBonus
from ..parts.optim import OptimizerSpec
from ..parts.params import NormAffine
from . import Cost, register


class CLIPTTAParams:
    """The visual norm affine parameters, with ``adapt_text`` the text tower's LayerNorm affine ones
    (named ``text.<module>.<weight|bias>``), and OCE's learnable threshold (one optimizer for all)."""

    def __init__(self, oce: Optional[OutlierContrast] = None, adapt_text: bool = False):
        self.oce, self.adapt_text = oce, adapt_text

    def __call__(self, model: nn.Module):
        named = NormAffine()(model)
        if self.adapt_text:
            named += [(f"text.{n}", p) for n, p in NormAffine(kinds=(nn.LayerNorm,))(model.text)]
        return named + ([("oce.alpha", self.oce.alpha)] if self.oce is not None else [])


class CLIPTTAAdapter(Adapter):
    """The CLIPTTA loop; ``last_ood_score`` holds the OOD score (higher = ID) of the last prediction."""

    def __init__(self, model, recipe: Recipe, *, k_shot: int = 4, sample_size: int = 40,
                 beta_tta: float = 1.0, oce: Optional[OutlierContrast] = None, beta_ood: float = 0.1,
                 adapt_text: bool = False, memory_only: bool = False, **kw):
        if not hasattr(model, "logit_scale") or not hasattr(model, "num_classes"):
            raise ConfigError("cliptta needs a CLIP zero-shot classifier (tta.models.load('openclip:...'))")
        kw.setdefault("steps", 10)
        super().__init__(model, recipe, **kw)
        self.beta_tta, self.beta_ood, self.oce = beta_tta, beta_ood, oce
        self.adapt_text, self.memory_only = adapt_text, memory_only
        self.per_class = max(1, sample_size // model.num_classes)
        self.memory = ClassMemory(model.num_classes, k_shot)
        self.last_ood_score: Optional[torch.Tensor] = None
        if adapt_text:
            self._bind_text(model)

    def _bind_text(self, model) -> None:
        """Text LayerNorms trainable and held in the adapter's state (so snapshot/reset cover them, while the
        rest of the hidden text tower stays out of it); the classifier's prompts tokenized once."""
        text_params = [p for n, p in zip(self.param_names, self.params) if n.startswith("text.")]
        for p in text_params:
            p.requires_grad_(True)
        self.text_norms = nn.ParameterList(text_params)
        prompts = [t for ts in template_prompts(model.classnames, model.templates) for t in ts]
        tokens = tokenize(model.tokenizer, prompts, context_length(model.text)).to(self.device)
        self.register_buffer("text_tokens", tokens, persistent=False)
        self.snapshot()

    def reset_state(self) -> None:
        self.memory.reset()
        if self.oce is not None:
            with torch.no_grad():
                self.oce.alpha.zero_()

    def _text(self) -> Optional[torch.Tensor]:
        """Class prototypes from the current text tower (with gradient), or None: the classifier's cached ones."""
        if not self.adapt_text:
            return None
        counts = [len(self.model.templates)] * self.model.num_classes
        return pool(encode_tokens(self.model.text, self.text_tokens), counts)

    def _logits(self, x: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor:
        return self.model.logits_from_features(self.model.encode_image(x), text)

    def _contrastive(self, x: torch.Tensor, logits: torch.Tensor, id_mask: torch.Tensor) -> torch.Tensor:
        """``beta_tta L_sc`` on the ID rows, the marginal-entropy bonus on all rows."""
        loss = logits.new_zeros(())
        if id_mask.any():
            loss = self.beta_tta * self.recipe.objective(Batch(x[id_mask], logits[id_mask], self)).mean()
        batch = Batch(x, logits, self)
        return loss + sum(term(batch) for term in self.recipe.batch_terms)

    def _batch_logits(self, x: torch.Tensor, text, step: int) -> Optional[torch.Tensor]:
        """The batch's logits at this step: with gradient when a batch term needs it, without at the first
        step of ``memory_only`` (memory insertion only), else None."""
        if not self.memory_only or self.oce is not None:
            return self._logits(x, text)
        if step == 0:
            with torch.no_grad():
                return self._logits(x, text)
        return None

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.exp()
        if self.oce is not None:
            with torch.no_grad():
                self.oce.init_threshold(max_log_prob(self._logits(x, self._text()), scale))
        id_mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for step in range(self.steps):
            text = self._text()
            loss = torch.zeros((), device=x.device)
            logits = self._batch_logits(x, text, step)
            if logits is not None:
                scores = max_log_prob(logits, scale)
                if self.oce is not None:
                    id_mask = self.oce.is_id(scores)
                if step == 0:
                    cos = (logits.detach() / scale)[id_mask].softmax(1).max(1)
                    self.memory.add(x[id_mask].detach(), cos.indices, cos.values)
                if not self.memory_only:
                    loss = loss + self._contrastive(x, logits, id_mask)
            sample = self.memory.sample(self.per_class, self.generator)
            if sample is not None:
                loss = loss + self._contrastive(sample, self._logits(sample, text),
                                                torch.ones(len(sample), dtype=torch.bool, device=sample.device))
            if self.oce is not None:
                loss = loss + self.beta_ood * self.oce(scores)
            self._step(loss)
            self.last = {"selected": int(id_mask.sum()), "loss": float(loss.detach()), "batch": x.shape[0],
                         "memory": len(self.memory)}
        with torch.no_grad():
            logits = self._logits(x, self._text())
        self.last_ood_score = max_log_prob(logits, scale)
        return logits

    def _step(self, loss: torch.Tensor) -> None:
        """One update; a loss without gradient (nothing to learn from) or a non-finite one is skipped and counted."""
        if not loss.requires_grad:
            self.counters["empty"] += 1
        elif torch.isfinite(loss):
            self.backward(loss)
            self.optimizer_step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["nonfinite"] += 1


@register("cliptta", summary="soft contrastive loss between CLIP images and class texts",
          adapts="visual LayerNorm affine (+ text LayerNorm with adapt_text)",
          cost=Cost(grad=10, backward=10, nograd=1), requires="clip")
def cliptta(model, *, k_shot: int = 4, sample_size: int = 40, beta_tta: float = 1.0, beta_reg: float = 1.0,
            open_set: bool = False, beta_ood: float = 0.1, gamma: float = 0.005,
            text_to_image: Optional[bool] = None, adapt_text: bool = False, memory_only: bool = False):
    """Visual LN affine of a CLIP classifier; Adam 1e-4 (eps 1e-6); 10 inner steps per batch.
    ``adapt_text``: text LayerNorms adapt too; ``memory_only``: loss on the memory sample alone (module
    docstring); ``text_to_image``: add the text->image term of ``L_sc`` (default: when text adapts)."""
    oce = OutlierContrast(gamma) if open_set else None
    two_way = adapt_text if text_to_image is None else text_to_image
    return Recipe(norm=BatchStats(), params=CLIPTTAParams(oce, adapt_text),
                  objective=SoftContrastive(two_way), batch_terms=[MarginalEntropyBonus(beta_reg)],
                  optimizer=OptimizerSpec("adam", lr=1e-4, eps=1e-6), adapter_cls=CLIPTTAAdapter,
                  options=dict(k_shot=k_shot, sample_size=sample_size, beta_tta=beta_tta, oce=oce,
                               beta_ood=beta_ood, adapt_text=adapt_text, memory_only=memory_only))
