"""Open-set metrics: AUROC and FPR at 95% TPR of an OOD score (higher = in-distribution), accuracy on
ID samples. ID is the positive class, as in the OOD-detection literature."""
from __future__ import annotations

from typing import Dict

import torch


def ood_score(adapter, logits: torch.Tensor) -> torch.Tensor:
    """The method's own score when it has one (``adapter.last_ood_score``, CLIPTTA's max log-prob at
    temperature 1), else the maximum softmax probability of ``logits``."""
    own = getattr(adapter, "last_ood_score", None)
    return own.detach() if own is not None else logits.detach().softmax(1).max(1).values


def auroc(scores: torch.Tensor, is_ood: torch.Tensor) -> float:
    """P(score of a random ID sample > score of a random OOD sample), ties counting 1/2 (Mann-Whitney)."""
    scores, is_ood = scores.double().flatten(), is_ood.bool().flatten()
    n_id, n_ood = int((~is_ood).sum()), int(is_ood.sum())
    if n_id == 0 or n_ood == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    uniq, inverse = scores.unique(return_inverse=True)  # average ranks over ties
    mean_rank = torch.zeros_like(uniq).index_add_(0, inverse, ranks) / torch.bincount(inverse).to(scores.dtype)
    rank_sum = mean_rank[inverse][~is_ood].sum()
    return float((rank_sum - n_id * (n_id + 1) / 2) / (n_id * n_ood))


def fpr_at_tpr(scores: torch.Tensor, is_ood: torch.Tensor, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted (score >= t) at the highest threshold t that accepts at least
    ``tpr`` of the ID samples."""
    scores, is_ood = scores.double().flatten(), is_ood.bool().flatten()
    id_scores = scores[~is_ood].sort(descending=True).values
    if id_scores.numel() == 0 or not is_ood.any():
        return float("nan")
    k = max(1, int(torch.ceil(torch.tensor(tpr * id_scores.numel() - 1e-9))))
    t = id_scores[k - 1]
    return float((scores[is_ood] >= t).double().mean())


def openset_metrics(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                    is_ood: torch.Tensor) -> Dict[str, float]:
    """``acc_id`` (closed-set accuracy on ID samples), ``auroc``, ``fpr95`` (all in [0, 1])."""
    idm = ~is_ood.bool()
    acc = float((logits[idm].argmax(1) == labels[idm]).double().mean()) if idm.any() else float("nan")
    return {"acc_id": acc, "auroc": auroc(scores, is_ood), "fpr95": fpr_at_tpr(scores, is_ood)}
