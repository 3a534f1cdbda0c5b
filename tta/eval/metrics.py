"""Error and calibration bookkeeping along a stream: per (round, domain) the arg-max error, the expected
calibration error (ECE), the negative log-likelihood (NLL) and the Brier score of the predictions the
stream scored, plus the adapter's counters.

Calibration reads the softmax of what a method returns (methods that output probabilities return their
logarithm, so the softmax is those probabilities). ECE uses 15 equal-width confidence bins
``(k/15, (k+1)/15]`` (the usual definition, Guo et al. 2017): ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import torch

ECE_BINS = 15


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().float().softmax(1)


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """``(bins, 3)`` float64: per confidence bin, the count, the sum of confidences, the number correct.
    Sums, so the bins of several batches add up to the bins of their union."""
    p = _probs(logits)
    conf, pred = p.max(1)
    idx = (torch.ceil(conf.double() * bins).long() - 1).clamp(0, bins - 1)
    out = torch.zeros(bins, 3, dtype=torch.float64)
    out[:, 0].index_add_(0, idx.cpu(), torch.ones(len(idx), dtype=torch.float64))
    out[:, 1].index_add_(0, idx.cpu(), conf.double().cpu())
    out[:, 2].index_add_(0, idx.cpu(), (pred == labels.to(pred.device)).double().cpu())
    return out


def ece_from_bins(bins: torch.Tensor) -> float:
    n = float(bins[:, 0].sum())
    if n == 0:
        return float("nan")
    filled = bins[:, 0] > 0
    gap = (bins[filled, 2] - bins[filled, 1]).abs()  # |sum correct - sum conf| = |B| * |acc - conf|
    return float(gap.sum() / n)


def ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error in [0, 1] (equal-width bins; see the module docstring)."""
    return ece_from_bins(calibration_bins(logits, labels, bins))


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    logits = logits.detach().float()
    return float(-(logits.log_softmax(1).gather(1, labels.to(logits.device).view(-1, 1))).sum())


def brier_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    p = _probs(logits)
    onehot = torch.zeros_like(p).scatter_(1, labels.to(p.device).view(-1, 1), 1.0)
    return float(((p - onehot) ** 2).sum())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits)`` (nats)."""
    return nll_sum(logits, labels) / len(labels)


def brier(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean multi-class Brier score ``sum_k (p_k - 1[k = y])^2`` (in [0, 2])."""
    return brier_sum(logits, labels) / len(labels)


class ErrorAccumulator:
    """Counts arg-max errors per (round, domain index) and per batch (for plots along the stream)."""

    def __init__(self):
        self.wrong: Dict[Tuple[int, int], int] = defaultdict(int)
        self.total: Dict[Tuple[int, int], int] = defaultdict(int)
        self.counters: Dict[Tuple[int, int], Counter] = defaultdict(Counter)
        self.seconds: Dict[Tuple[int, int], float] = defaultdict(float)
        self.bins: Dict[Tuple[int, int], torch.Tensor] = {}
        self.nll: Dict[Tuple[int, int], float] = defaultdict(float)
        self.brier: Dict[Tuple[int, int], float] = defaultdict(float)
        self.batch_errors: List[float] = []

    def update(self, logits: torch.Tensor, y: torch.Tensor, domain: torch.Tensor, round_: int,
               counter_delta: Dict[str, int], seconds: float) -> None:
        wrong = (logits.argmax(1).cpu() != y.cpu())
        domain = domain.cpu()
        self.batch_errors.append(100.0 * float(wrong.float().mean()))
        ids = domain.unique().tolist()
        for d in ids:
            sel = domain == d
            key = (round_, d)
            self.wrong[key] += int(wrong[sel].sum())
            self.total[key] += int(sel.sum())
            z, t = logits[sel.to(logits.device)], y[sel.to(y.device)]
            bins = calibration_bins(z, t)
            self.bins[key] = bins if key not in self.bins else self.bins[key] + bins
            self.nll[key] += nll_sum(z, t)
            self.brier[key] += brier_sum(z, t)
        main = (round_, int(domain[0]))  # counters and time go to the batch's first domain
        for k, v in counter_delta.items():
            self.counters[main][k] += v
        self.seconds[main] += seconds

    def rows(self, domain_names: List[str]) -> List[dict]:
        out = []
        for key in sorted(self.total):
            r, d = key
            n = self.total[key]
            sec = self.seconds.get(key, 0.0)
            out.append({"round": r, "domain": domain_names[d], "error": 100.0 * self.wrong[key] / n,
                        "ece": 100.0 * ece_from_bins(self.bins[key]), "nll": self.nll[key] / n,
                        "brier": self.brier[key] / n, "n": n,
                        "backward": self.counters[key].get("backward", 0),
                        "selected": self.counters[key].get("selected", 0),
                        "steps": self.counters[key].get("steps", 0),
                        "resets": self.counters[key].get("resets", 0),
                        "nonfinite": self.counters[key].get("nonfinite", 0),
                        "seconds": sec, "img_per_s": n / sec if sec > 0 else None})
        return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
