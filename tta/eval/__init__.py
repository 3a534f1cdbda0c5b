"""Evaluation: metrics accumulated along a stream, the config runner, and report writers.

``tta.eval.ece``, ``nll`` and ``brier`` score a batch of logits against labels (see ``metrics``)."""
from .metrics import brier, ece, nll

__all__ = ["ece", "nll", "brier"]
