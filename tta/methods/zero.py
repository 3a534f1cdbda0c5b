"""ZERO (Farina et al., NeurIPS 2024; METHODS-VLM V.2): per image, 64 crop-flip views, keep the ``floor(gamma N)``
most confident (lowest entropy of ``softmax(s cos)``), and predict the majority vote of their arg-maxes.

Ties (several classes with the most votes) are broken as the official code intends: scan the views left
out, most confident first; the first whose arg-max is a tied class wins; if none does, the most confident
view's logits restricted to the tied classes decide. The winner gets one extra vote.

Output: :func:`~tta.parts.view_select.vote_logits` of the votes, ``log(votes / sum)`` floored at ``log 1e-12``
(finite, same arg-max; its softmax is the vote share, what calibration metrics see).

Official-code quirks, each an option (defaults: the paper's intent):

* ``gamma`` 0.3 (the code since commit 9737ffb, whose message says the paper will follow; the first
  arXiv version used 0.1);
* ``vote="hard"``: exact counts. ``vote="soft_fp16"`` is the official arithmetic: under autocast the
  cosines are fp16 and the "zero temperature" softmax runs at fp16's machine epsilon 2^-10, so views
  whose top-2 cosines are within ~5e-3 cast fractional votes (emulated: fp16-rounded features, text
  embeddings, cosines and scaled cosines for the selection; the softmaxes in fp32 as autocast runs them);
* ``ties="intended"``; ``ties="official"``: the fallback uses the first view left out (not the most
  confident) and masks ``logit[~ties]`` with integer ``ties``, i.e. the classes ``C - 1 - t``, not the
  non-tied ones (bitwise NOT), so it can even pick a class that was not tied.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..parts.view_select import confident_count, rank_views, take, vote_counts, vote_logits
from . import Cost, register
from .view_adapter import ViewAdapter, view_recipe

VOTES = ("hard", "soft_fp16")
TIES = ("intended", "official")
FP16_EPS = torch.finfo(torch.float16).eps  # 2^-10


def break_tie(preds_left_out: torch.Tensor, tied: torch.Tensor, fallback: torch.Tensor, official: bool) -> int:
    """The winner among the ``tied`` classes (bool ``(C,)``): the first arg-max of ``preds_left_out`` (the views
    outside the selection, most confident first) that is tied, else the arg-max of the ``fallback`` logits
    ``(C,)`` over the tied classes (``official``: over the classes ``C - 1 - t`` masked out instead)."""
    hit = tied[preds_left_out].nonzero()
    if len(hit):
        return int(preds_left_out[hit[0, 0]])
    if official:
        masked = fallback.clone()
        masked[(~tied.nonzero().flatten()) % len(fallback)] = -float("inf")  # the official integer ``~``
        return int(masked.argmax())
    return int(fallback.masked_fill(~tied, -float("inf")).argmax())


def zero_votes(cosines: torch.Tensor, scale: float, gamma: float = 0.3, vote: str = "hard",
               ties: str = "intended") -> torch.Tensor:
    """``(B, C)`` ZERO's votes from the unscaled cosines ``(B, N, C)`` of each image's views (see module docstring);
    ``scale`` = ``exp(logit_scale)``, the temperature of the confidence softmax. The cosines are taken as given
    (:class:`ZeroAdapter` rounds them to fp16 first for ``soft_fp16``)."""
    if vote not in VOTES or ties not in TIES:
        raise ConfigError(f"vote must be one of {VOTES} and ties one of {TIES}, got {vote!r}, {ties!r}")
    logits = cosines * scale
    order = rank_views(logits if vote == "hard" else logits.half().float())  # official: fp16 ``l / temp``
    k = confident_count(cosines.shape[1], gamma)
    kept = take(cosines, order[:, :k])
    votes = vote_counts(kept) if vote == "hard" else (kept / FP16_EPS).softmax(-1).sum(1)
    top = votes.amax(1, keepdim=True)
    tied = votes == top
    for b in (tied.sum(1) > 1).nonzero().flatten().tolist():
        left_out = take(cosines[b:b + 1], order[b:b + 1, k:])[0]
        official = ties == "official" and len(left_out) > 0
        fallback = left_out[0] if official else cosines[b, order[b, 0]]
        votes[b, break_tie(left_out.argmax(-1), tied[b], fallback, official)] += 1
    return votes


class ZeroAdapter(ViewAdapter):
    def __init__(self, model, recipe, *, gamma: float = 0.3, vote: str = "hard", ties: str = "intended", **kw):
        if vote not in VOTES or ties not in TIES:
            raise ConfigError(f"vote must be one of {VOTES} and ties one of {TIES}, got {vote!r}, {ties!r}")
        confident_count(64, gamma)  # one clear error for a bad gamma
        super().__init__(model, recipe, **kw)
        self.gamma, self.vote, self.ties = gamma, vote, ties

    def aggregate(self, features: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.vote == "soft_fp16":  # autocast: fp16 operands, fp16 result
            cosines = (features.half().float() @ text.half().float().t()).half().float()
        else:
            cosines = features @ text.t()
        return vote_logits(zero_votes(cosines, float(scale), self.gamma, self.vote, self.ties))


@register("zero", summary="majority vote of the 19 most confident of 64 crop-flip views (zero temperature)",
          adapts="nothing", cost=Cost(nograd=64, params="none"), requires="clip")
def zero(model, *, views: int = 64, gamma: float = 0.3, vote: str = "hard", ties: str = "intended",
         policy: str = "crop_flip", templates=None, chunk: int = 8, view_options=None):
    """``gamma``: kept fraction of the views; ``vote``: ``hard`` or ``soft_fp16`` (official arithmetic);
    ``ties``: ``intended`` or ``official`` (see the module docstring); ``policy``: views (crop-flip on every
    data set in the official code); ``templates``: None = the classifier's prompts (``single`` by default;
    the paper's "+Ensemble" is ``tip7``); ``chunk``: images per encoder forward (memory only)."""
    return view_recipe(ZeroAdapter, views=views, gamma=gamma, vote=vote, ties=ties, policy=policy,
                       templates=templates, chunk=chunk, view_options=view_options)
