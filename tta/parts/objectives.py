"""Objectives: per-sample losses (shape ``(B,)``) and batch-level terms (scalars) computed from logits.

Formulas: METHODS.md section 1 (Shannon entropy, marginal entropy, cross-entropy) and 3.8 (Tsallis, ADTE).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import ConfigError
from .base import Part


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``-sum_k p_k log p_k`` of ``softmax(logits)`` per row (natural log)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-mean prediction ``H(mean_i p_i)``; large when the batch uses many classes."""
    p = logits.softmax(1).mean(0)
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


def view_marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(mean_v softmax(z_v))`` over the rows (views of one image), the mean taken in log space
    (``logsumexp - log n``, as TPT and MEMO do) and clamped below at the dtype's most negative finite value
    so a class with zero mass contributes 0, not NaN."""
    log_mean = torch.logsumexp(logits.log_softmax(1), 0) - torch.log(torch.tensor(float(logits.shape[0])))
    log_mean = log_mean.clamp_min(torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum()


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``CE(softmax(target), softmax(logits)) = -sum_k q_k log p_k`` per row (target detached by caller)."""
    return -(target_logits.softmax(1) * logits.log_softmax(1)).sum(1)


def symmetric_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``SCE(z, t) = 1/2 CE(softmax(t), z) + 1/2 CE(softmax(z), t)`` per row (METHODS-ZOO Z.0.2).

    Gradient flows through whichever argument carries one, in both halves (RMT, ROID, CMF and PeTTA
    differentiate through the student's softmax in the second half too); detach ``target_logits``
    yourself for a fixed teacher.
    """
    return 0.5 * soft_cross_entropy(target_logits, logits) + 0.5 * soft_cross_entropy(logits, target_logits)


class COMEEntropy(Part):
    """COME's conservative entropy (METHODS-ZOO Z.14; Zhang et al., ICLR 2025), a drop-in for Shannon's.

    With ``z^ = z * sg(||z||) / ||z||`` (same value; the gradient cannot grow the logit norm), evidence
    ``e_k = exp(z^_k)``, ``S = sum_k e_k + K``, opinion ``b_k = e_k / S`` and uncertainty mass ``u = K / S``:
    ``H = -sum_j o_j ln o_j`` over ``o = [b_1..b_C, u] + 1e-7``. Since ``[b, u] = softmax([z^, ln K])``,
    it is computed that way, which is the reference's formula without its overflow of ``exp`` above 88
    (Z.14 pitfall). ``k``: K; None = the number of classes (our choice; the official code hard-codes
    1000, ImageNet's class count, so ``k=1000`` reproduces it there).
    """

    def __init__(self, k: Optional[float] = None):
        if k is not None and not k > 0:
            raise ConfigError(f"COME's K must be > 0, got {k}")
        self.k = k

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        norm = logits.norm(dim=1, keepdim=True).clamp_min(1e-12)
        z = logits * (norm.detach() / norm)
        k = float(self.k if self.k is not None else logits.shape[1])
        extra = torch.full_like(z[:, :1], math.log(k))
        o = torch.cat([z, extra], 1).softmax(1) + 1e-7
        return -(o * o.log()).sum(1)


class Entropy(Part):
    """TENT's objective: per-sample Shannon entropy of the adapted model's prediction."""

    def __call__(self, batch) -> torch.Tensor:
        return batch.entropy


class MarginalEntropyBonus(Part):
    """Batch term ``-weight * H(mean p)`` (minimising it maximises prediction diversity over the batch)."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, batch) -> torch.Tensor:
        return -self.weight * marginal_entropy(batch.logits)


def tsallis_entropy(log_probs: torch.Tensor, q: float) -> torch.Tensor:
    """``S_q(p) = (1 - sum_k p_k^q) / (q - 1)`` per row; exactly Shannon at ``q == 1``.

    ``p^q`` is taken as ``exp(q log p)`` so its gradient stays finite where a probability underflows
    to 0 (``q p^(q-1)`` is infinite there for q < 1).
    """
    if q == 1:
        return -(log_probs.exp() * log_probs).sum(1)
    return (1 - torch.exp(q * log_probs).sum(1)) / (q - 1)


class Tsallis(Part):
    """Tsallis entropy with a global ``q > 0`` as the per-sample objective (METHODS.md 3.8).

    For q < 1 the small probabilities weigh more than under Shannon, so the loss is less dominated
    by the head classes the model is biased towards.
    """

    def __init__(self, q: float = 0.1):
        if not q > 0:
            raise ConfigError(f"Tsallis q must be > 0, got {q}")
        self.q = q

    def __call__(self, batch) -> torch.Tensor:
        return tsallis_entropy(batch.log_probs, self.q)


class ClassDebiasedTsallis(Part):
    """ADTE in classifier form: Tsallis entropy with a per-class ``q_l`` from an online label-bias estimate.

    ADTE (METHODS.md 3.8) scores CLIP views without training; here its debiased entropy is the loss of
    ordinary batch TTA on any classifier:

    * memory: each sample of a batch that updates state, whose top-1/top-2 logit gap is ``>= gap``, is
      stored (detached logits) under its arg-max class in a ``memory``-slot queue that always overwrites
      the slot with the smallest gap (empty slots first). The batch's own samples are stored before its
      loss is computed (the estimate uses everything seen so far, this batch included);
    * bias: ``P[:, j]`` = mean softmax of class j's entries; power iteration ``pi <- P pi / ||P pi||``
      from uniform (at most ``iters``, tolerance ``tol``); ``b = log pi`` (pi clamped at 1e-12);
    * ``q_l`` = ``b`` min-max scaled into ``q_range`` (all ``q_range[0]`` when b is flat);
    * loss per sample: the released score ``sum_l p_l^{q_l} / (1 - q_l)`` (for a global q this is
      ``S_q`` plus the constant ``1/(1-q)``, so its gradient is that of Tsallis entropy);
    * until the memory holds ``min_entries`` entries the loss is Shannon entropy.
    ``q`` is recomputed only when the memory changed.
    """

    def __init__(self, memory: int = 20, gap: float = 1.0, q_range=(0.01, 0.9), min_entries: int = 100,
                 iters: int = 500, tol: float = 1e-4):
        lo, hi = q_range
        if not 0 < lo <= hi < 1:
            raise ConfigError(f"ADTE q_range must satisfy 0 < low <= high < 1, got {q_range}")
        self.memory, self.gap, self.q_range = memory, gap, (lo, hi)
        self.min_entries, self.iters, self.tol = min_entries, iters, tol
        self.reset()

    def reset(self) -> None:
        self._logits = self._gaps = None  # (C, memory, C) stored logits, (C, memory) their gaps (-1: empty)
        self._q: Optional[torch.Tensor] = None

    @property
    def entries(self) -> int:
        return 0 if self._gaps is None else int((self._gaps >= 0).sum())

    def remember(self, logits: torch.Tensor) -> None:
        """Store the confident rows of ``logits`` (moved to the CPU: the memory is tiny and sequential)."""
        logits = logits.detach().float().cpu()
        c = logits.shape[1]
        if self._gaps is None:
            self._logits = torch.zeros(c, self.memory, c)
            self._gaps = torch.full((c, self.memory), -1.0)
        top = logits.topk(2, dim=1)
        gaps = top.values[:, 0] - top.values[:, 1]
        for i in torch.nonzero(gaps >= self.gap).flatten().tolist():
            cls = int(top.indices[i, 0])
            slot = int(self._gaps[cls].argmin())
            self._logits[cls, slot], self._gaps[cls, slot] = logits[i], gaps[i]
            self._q = None

    def log_prior(self) -> torch.Tensor:
        """``b = log pi``: the label-bias estimate of the current memory (power iteration, class docstring)."""
        filled = (self._gaps >= 0).float()  # (C, M)
        probs = self._logits.softmax(2) * filled.unsqueeze(2)
        p = (probs.sum(1) / filled.sum(1, keepdim=True).clamp_min(1)).T  # column j: class j's mean
        c = p.shape[0]
        pi = torch.full((c,), 1.0 / c)
        for _ in range(self.iters):
            new = p @ pi
            new = new / new.norm().clamp_min(1e-12)
            done = (new - pi).norm() < self.tol
            pi = new
            if done:
                break
        return pi.clamp_min(1e-12).log()

    def class_q(self, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-class ``q``: the log prior ``b`` (estimated from the memory when not given) min-max scaled."""
        b = self.log_prior() if b is None else b
        lo, hi = self.q_range
        span = b.max() - b.min()
        if span <= 0:
            return torch.full_like(b, lo)
        return lo + (b - b.min()) * (hi - lo) / span

    def __call__(self, batch) -> torch.Tensor:
        if batch.update_state:
            self.remember(batch.logits)
        if self.entries < self.min_entries:
            return batch.entropy
        if self._q is None:
            self._q = self.class_q()
        q = self._q.to(batch.logits.device)
        return (torch.exp(q * batch.log_probs) / (1 - q)).sum(1)
