"""Calibration metrics (ECE, NLL, Brier) against values computed by hand, and their bookkeeping along a stream."""
import math

import torch

from tta.eval import brier, ece, nll
from tta.eval.metrics import ErrorAccumulator, calibration_bins, ece_from_bins


def _logits(probs):
    return torch.tensor(probs).log()


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.5 (wrong; bin (7/15, 8/15])
    z = _logits([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
    y = torch.tensor([0, 1, 1, 1])
    # bins: 0.9 -> bin 13 (0.8667, 0.9333]: acc 1/2, conf 0.9 -> |0.5 - 0.9| * 2/4 = 0.2
    #       0.6 -> bin 8 (0.5333, 0.6]: acc 1, conf 0.6 -> 0.4 * 1/4 = 0.1
    #       0.5 -> bin 7 (0.4667, 0.5333]: predicted class 0 (first max), wrong: |0 - 0.5| / 4 = 0.125
    assert math.isclose(ece(z, y), 0.2 + 0.1 + 0.125, rel_tol=1e-6)


def test_ece_bin_edges_are_right_closed():
    z = _logits([[0.1334, 0.8666], [0.1332, 0.8668]])  # just below and just above 13/15
    bins = calibration_bins(z, torch.tensor([1, 1]))
    assert bins[12, 0] == 1 and bins[13, 0] == 1 and bins[:, 0].sum() == 2
    assert ece_from_bins(torch.zeros(15, 3)) != ece_from_bins(torch.zeros(15, 3))  # NaN for no samples


def test_nll_and_brier_by_hand():
    z = _logits([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    y = torch.tensor([0, 1])
    assert math.isclose(nll(z, y), -(math.log(0.7) + math.log(0.25)) / 2, rel_tol=1e-6)
    b0 = 0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2
    b1 = 0.25 ** 2 + 0.75 ** 2 + 0.5 ** 2
    assert math.isclose(brier(z, y), (b0 + b1) / 2, rel_tol=1e-6)


def test_perfectly_confident_and_right_is_zero():
    z = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    y = torch.tensor([0, 1])
    assert ece(z, y) < 1e-9 and nll(z, y) < 1e-9 and brier(z, y) < 1e-9


def test_accumulator_pools_batches_per_domain():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(60, 5, generator=g) * 3
    y = torch.randint(0, 5, (60,), generator=g)
    domain = torch.tensor([0] * 30 + [1] * 30)
    acc = ErrorAccumulator()
    for i in range(0, 60, 20):  # batches straddle the domain boundary
        acc.update(z[i:i + 20], y[i:i + 20], domain[i:i + 20], 0, {}, 0.1)
    rows = acc.rows(["a", "b"])
    for r, sl in zip(rows, (slice(0, 30), slice(30, 60))):
        assert math.isclose(r["ece"], 100 * ece(z[sl], y[sl]), rel_tol=1e-9)
        assert math.isclose(r["nll"], nll(z[sl], y[sl]), rel_tol=1e-6)
        assert math.isclose(r["brier"], brier(z[sl], y[sl]), rel_tol=1e-6)
