"""Tsallis entropy and the ADTE classifier objective against METHODS.md 3.8, on hand-made tensors."""
import math

import pytest
import torch

from tta.adapter import Batch
from tta.errors import ConfigError
from tta.parts.objectives import ClassDebiasedTsallis, Tsallis, entropy, tsallis_entropy


def batch_of(logits, update_state=True):
    return Batch(torch.zeros(len(logits), 3, 2, 2), logits, None, update_state)


LOGITS = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [5.0, -3.0, 1.0, 1.0]])


# ------------------------------------------------------------------------------------------ Tsallis
@pytest.mark.parametrize("q", [0.1, 0.5, 2.0])
def test_tsallis_matches_the_formula(q):
    p = LOGITS.softmax(1)
    expected = (1 - (p ** q).sum(1)) / (q - 1)
    assert torch.allclose(Tsallis(q)(batch_of(LOGITS)), expected, atol=1e-6)


def test_tsallis_q_to_one_is_shannon_and_exact_at_one():
    shannon = entropy(LOGITS)
    at_one = Tsallis(1.0)(batch_of(LOGITS))  # the q == 1 branch, not 0/0
    assert torch.isfinite(at_one).all() and torch.allclose(at_one, shannon, atol=1e-6)
    for q in (1 - 1e-3, 1 + 1e-3):
        assert torch.allclose(Tsallis(q)(batch_of(LOGITS.double())), entropy(LOGITS.double()), atol=2e-3)
    # uniform prediction: S_q = (1 - C^(1-q)) / (q - 1)
    assert math.isclose(float(Tsallis(0.5)(batch_of(LOGITS))[1]), (1 - 4 ** 0.5) / (0.5 - 1), rel_tol=1e-6)


def test_tsallis_gradient_is_finite_when_a_probability_underflows():
    logits = torch.tensor([[0.0, 200.0, -200.0]], requires_grad=True)
    assert logits.softmax(1)[0, 2] == 0  # underflow: p^(q-1) would be infinite
    tsallis_entropy(logits.log_softmax(1), 0.1).sum().backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ConfigError):
        Tsallis(0.0)


# --------------------------------------------------------------------------------------------- ADTE
def confident(cls, gap, c=3):
    z = torch.zeros(c)
    z[cls] = gap
    return z


def test_adte_memory_overwrites_the_smallest_gap_and_skips_unconfident_samples():
    obj = ClassDebiasedTsallis(memory=2, gap=1.0, min_entries=100)
    logits = torch.stack([confident(0, 3.0), confident(0, 2.0), confident(1, 0.5), confident(0, 1.5)])
    obj(batch_of(logits))
    assert obj.entries == 2  # class 1's sample is not confident; class 0 holds two
    assert sorted(obj._gaps[0].tolist()) == pytest.approx([1.5, 3.0])  # 1.5 replaced 2.0, the smallest gap
    obj(batch_of(torch.stack([confident(0, 1.2)])))
    assert sorted(obj._gaps[0].tolist()) == pytest.approx([1.2, 3.0])  # overwrites even when the new gap is smaller
    obj(batch_of(torch.stack([confident(2, 9.0)]), update_state=False))
    assert obj.entries == 2  # re-evaluations do not store
    obj.reset()
    assert obj.entries == 0


def test_adte_falls_back_to_shannon_until_the_memory_is_full_enough():
    obj = ClassDebiasedTsallis(memory=20, min_entries=3)
    logits = torch.stack([confident(0, 2.0), confident(1, 0.2)])
    assert torch.equal(obj(batch_of(logits)), entropy(logits))  # one entry
    out = obj(batch_of(torch.stack([confident(1, 2.0), confident(2, 2.0)])))  # three entries
    assert not torch.allclose(out, entropy(torch.stack([confident(1, 2.0), confident(2, 2.0)])))


def _filled(counts, gaps=3.0):
    """A memory with ``counts[c]`` confident entries of class c (3 classes)."""
    obj = ClassDebiasedTsallis(memory=20, min_entries=1)
    rows = [confident(c, gaps) + 0.1 * torch.randn(3, generator=torch.Generator().manual_seed(10 * c + i))
            for c, n in enumerate(counts) for i in range(n)]
    obj.remember(torch.stack(rows))
    return obj


def test_adte_q_spans_its_range_head_classes_high():
    obj = _filled([20, 5, 1])
    q = obj.class_q()
    assert q.min() >= 0.01 - 1e-6 and q.max() <= 0.9 + 1e-6
    assert math.isclose(float(q.min()), 0.01, abs_tol=1e-6) and math.isclose(float(q.max()), 0.9, abs_tol=1e-6)
    # power iteration = the dominant eigenvector of P (column j: class j's mean prediction)
    filled = (obj._gaps >= 0).float()
    P = ((obj._logits.softmax(2) * filled[..., None]).sum(1) / filled.sum(1, keepdim=True)).T
    vals, vecs = torch.linalg.eig(P.double())
    pi = vecs[:, vals.real.argmax()].real.abs()
    b = pi.log()
    expected = 0.01 + (b - b.min()) * 0.89 / (b.max() - b.min())
    assert torch.allclose(q.double(), expected, atol=1e-3)


def test_adte_flat_bias_gives_the_low_end_and_the_loss_is_the_score_form():
    obj = ClassDebiasedTsallis(memory=4, min_entries=1)
    obj.remember(torch.stack([confident(c, 3.0) for c in range(3)]))  # symmetric memory: flat bias
    assert torch.allclose(obj.class_q(), torch.full((3,), 0.01), atol=1e-6)

    obj = _filled([20, 5, 1])
    q = obj.class_q()
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = ClassDebiasedTsallis.__call__(obj, batch_of(logits, update_state=False))
    p = logits.softmax(1)
    assert torch.allclose(loss, (p ** q / (1 - q)).sum(1), atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ConfigError):
        ClassDebiasedTsallis(q_range=(0.5, 1.0))
