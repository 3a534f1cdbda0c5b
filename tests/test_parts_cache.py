"""The per-class priority cache (METHODS-VLM V.15.4) against the list rule and the read-out formulas."""
import math

import pytest
import torch

from tta.errors import ConfigError
from tta.parts.cache import ClassCache


class ListCache:
    """The reference behaviour, written as lists: append, stable sort by priority, truncate."""

    def __init__(self, k):
        self.k, self.lists = k, {}

    def insert(self, cls, key, prio):
        entries = self.lists.setdefault(cls, [])
        if len(entries) >= self.k and not prio < entries[-1][1]:
            return False
        entries.append((key, prio))
        entries.sort(key=lambda e: e[1])
        del entries[self.k:]
        return True


def test_insert_rule_matches_the_list_version_including_ties():
    g = torch.Generator().manual_seed(0)
    cache, ref = ClassCache(3, num_classes=4), ListCache(3)
    for i in range(200):
        cls = int(torch.randint(0, 4, (1,), generator=g))
        prio = float(torch.randint(0, 6, (1,), generator=g)) / 2  # many ties
        key = torch.full((2,), float(i))
        assert cache.insert(cls, key, prio) == ref.insert(cls, float(i), prio)
    for cls, entries in ref.lists.items():
        n = len(entries)
        assert cache.priority[cls, :n].tolist() == [p for _, p in entries]
        assert cache.keys[cls, :n, 0].tolist() == [k for k, _ in entries]
        assert torch.isinf(cache.priority[cls, n:]).all()


def test_strictly_lower_priority_replaces_the_worst():
    cache = ClassCache(2, num_classes=2)
    cache.insert(0, torch.tensor([1.0]), 0.5)
    cache.insert(0, torch.tensor([2.0]), 0.3)
    assert cache.priority[0].tolist() == [0.3, 0.5]
    assert not cache.insert(0, torch.tensor([3.0]), 0.5)  # equal to the worst: rejected
    assert cache.insert(0, torch.tensor([4.0]), 0.1)
    assert cache.keys[0, :, 0].tolist() == [4.0, 2.0] and len(cache) == 2


def test_tip_readouts_by_hand():
    cache = ClassCache(2, num_classes=3)
    k1, k2, k3 = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8]), torch.tensor([0.0, 1.0])
    p1, p3 = torch.tensor([0.02, 0.5, 0.48]), torch.tensor([0.9, 0.05, 0.05])
    cache.insert(0, k1, 0.2, p1)
    cache.insert(0, k2, 0.1, p1)
    cache.insert(2, k3, 0.4, p3)
    q = torch.tensor([[0.5, 0.5]])
    phi = lambda a, b: math.exp(-b * (1 - a))  # noqa: E731
    expected = torch.tensor([[2 * (phi(0.5, 5) + phi(0.7, 5)), 0.0, 2 * phi(0.5, 5)]])
    torch.testing.assert_close(cache.tip_onehot(q, 2.0, 5.0), expected)
    # masked: entries of class 0 carry p1 (mask 0,1,1 in (0.03, 1)), class 2 carries p3 (1,1,1)
    w0 = phi(0.5, 1) + phi(0.7, 1)
    expected = 0.1 * (w0 * torch.tensor([0.0, 1, 1]) + phi(0.5, 1) * torch.tensor([1.0, 1, 1]))
    torch.testing.assert_close(cache.tip_masked(q, 0.1, 1.0, 0.03, 1.0), expected.unsqueeze(0))
    torch.testing.assert_close(cache.class_means(), torch.stack([(k1 + k2) / 2, torch.zeros(2), k3]))


def test_copy_and_grown_do_not_touch_the_original():
    cache = ClassCache(1, num_classes=2)
    cache.insert(1, torch.tensor([1.0]), 0.5)
    temp = cache.grown(3)
    assert temp.insert(1, torch.tensor([2.0]), 0.9) and len(temp) == 2 and len(cache) == 1
    other = cache.copy()
    other.insert(1, torch.tensor([3.0]), 0.1)
    assert cache.keys[1, 0, 0] == 1.0
    cache.reset()
    assert len(cache) == 0
    with pytest.raises(ConfigError):
        ClassCache(0)
    with pytest.raises(ConfigError, match="num_classes"):
        ClassCache(2).insert(0, torch.zeros(2), 0.1)
