"""Stream protocols: order, lengths, severities, label correlation, mixing, rounds, sliding windows."""
from collections import Counter

import pytest
import torch

from tta.data import streams
from tta.data.corruptions import CORRUPTIONS
from tta.data.domains import Domain
from tta.errors import ConfigError
from tta.eval.metrics import ErrorAccumulator


class FakeDomains:
    """A DomainSet stand-in whose images encode (corruption, severity, sample index) in pixel values."""

    def __init__(self, corruptions, severities=(5,), n=20, classes=4, labels=None):
        self.corruptions, self.severities, self.n, self.classes = list(corruptions), list(severities), n, classes
        self.labels = labels
        self.loads, self.released = Counter(), []

    @property
    def domains(self):
        return [self.make(c, s) for c in self.corruptions for s in self.severities]

    def make(self, c, s):
        return Domain(c, s, lambda: self._load(c, s))

    def _load(self, c, s):
        self.loads[(c, s)] += 1
        x = torch.zeros(self.n, 3, 2, 2, dtype=torch.uint8)
        x[:, 0, 0, 0] = CORRUPTIONS.index(c)
        x[:, 1, 0, 0] = s
        x[:, 2, 0, 0] = torch.arange(self.n)
        y = self.labels.clone() if self.labels is not None else torch.arange(self.n) % self.classes
        return x, y

    def release(self, keep=()):
        self.released.append(set(keep))


def ids(batch):
    """(corruption index, severity, sample index) of every scored image of a batch."""
    px = (batch.x[batch.context:, :, 0, 0] * 255).round().long()
    return [tuple(r) for r in px.tolist()]


def labels_of(stream):
    return [seg.label for seg in stream.segments]


def test_cotta_orders_are_ten_permutations_of_the_fifteen():
    assert len(streams.COTTA_ORDERS) == 10
    for order in streams.COTTA_ORDERS:
        assert sorted(order) == sorted(CORRUPTIONS)
    assert streams.COTTA_ORDERS[0][:3] == ["brightness", "pixelate", "gaussian_noise"]
    assert streams.COTTA_ORDERS[9][-1] == "brightness"


def test_continual_order_selects_cotta_order_and_resets_once():
    ds = FakeDomains(CORRUPTIONS)
    s = streams.build("continual", ds, batch_size=10, order=3)
    assert labels_of(s) == [f"{c}-5" for c in streams.COTTA_ORDERS[3]]
    assert [seg.reset for seg in s.segments] == [True] + [False] * 14
    assert streams.build("continual", ds, batch_size=10).domain_names == [f"{c}-5" for c in CORRUPTIONS]


def test_order_on_a_subset_keeps_the_orders_relative_order():
    ds = FakeDomains(["fog", "brightness", "contrast"])
    s = streams.build("continual", ds, batch_size=10, order=0)
    assert labels_of(s) == ["brightness-5", "fog-5", "contrast-5"]


@pytest.mark.parametrize("order", [10, -1, "0", True])
def test_bad_order_is_a_config_error(order):
    with pytest.raises(ConfigError, match="order"):
        streams.build("continual", FakeDomains(["fog"]), order=order)


def test_gradual_schedule_lengths_and_severities():
    ds = FakeDomains(["gaussian_noise", "fog", "snow"], n=10)
    s = streams.build("gradual", ds, batch_size=5)
    sev = [int(label.rsplit("-", 1)[1]) for label in labels_of(s)]
    assert sev == [5, 4, 3, 2, 1] + [1, 2, 3, 4, 5, 4, 3, 2, 1] * 2
    assert len(s.segments) == 5 + 9 * 2
    assert [seg.reset for seg in s.segments] == [True] + [False] * 22
    # one column per (corruption, severity); both visits of fog-3 count under the same index
    assert len(s.domain_names) == 15 and len(set(s.domain_names)) == 15
    seen = {}
    for b in s:
        for (c, sv, _), d in zip(ids(b), b.domain.tolist()):
            assert seen.setdefault((c, sv), d) == d
            assert s.domain_names[d] == f"{CORRUPTIONS[c]}-{sv}"
    assert sum(len(b.y) for b in s) == 10 * 23
    # the corruptions before the current one are released from the cache
    assert ds.released[-1] == {("snow", k) for k in range(1, 6)}


def test_gradual_with_order():
    ds = FakeDomains(CORRUPTIONS, n=4)
    s = streams.build("gradual", ds, batch_size=4, order=2)
    firsts = [label.rsplit("-", 1)[0] for label in labels_of(s)[::1]]
    assert list(dict.fromkeys(firsts)) == streams.COTTA_ORDERS[2]


def test_lifelong_repeats_rounds_without_reset():
    ds = FakeDomains(["fog", "snow"], n=10)
    s = streams.build("lifelong", ds, batch_size=5, rounds=3)
    assert s.rounds == 3
    assert [seg.round for seg in s.segments] == [0, 0, 1, 1, 2, 2]
    assert [seg.reset for seg in s.segments] == [True] + [False] * 5
    assert s.domain_names == ["fog-5", "snow-5"]
    acc = ErrorAccumulator()
    for b in s:
        acc.update(torch.zeros(len(b.y), 4), b.y, b.domain, b.round, {}, 0.0)
    rows = acc.rows(s.domain_names)
    assert [(r["round"], r["domain"], r["n"]) for r in rows] == [(r, d, 10) for r in range(3) for d in s.domain_names]
    with pytest.raises(ConfigError):
        streams.build("lifelong", ds, rounds=0)


def test_mixed_domains_is_a_seeded_permutation_with_per_domain_accounting():
    ds = FakeDomains(["fog", "snow", "contrast"], n=30)
    s = streams.build("mixed_domains", ds, batch_size=16, seed=3)
    batches = list(s)
    seen = [i for b in batches for i in ids(b)]
    assert sorted(seen) == sorted((CORRUPTIONS.index(c), 5, k) for c in ds.corruptions for k in range(30))
    for b in batches:  # every image carries its own domain index
        assert [s.domain_names[d] for d in b.domain.tolist()] == [f"{CORRUPTIONS[c]}-5" for c, _, _ in ids(b)]
    # really mixed: the first batch holds several domains
    assert len(set(batches[0].domain.tolist())) > 1
    again = [i for b in streams.build("mixed_domains", ds, batch_size=16, seed=3) for i in ids(b)]
    other = [i for b in streams.build("mixed_domains", ds, batch_size=16, seed=4) for i in ids(b)]
    assert again == seen and other != seen
    acc = ErrorAccumulator()
    for b in batches:
        acc.update(torch.zeros(len(b.y), 4), b.y, b.domain, b.round, {}, 0.0)
    assert [r["n"] for r in acc.rows(s.domain_names)] == [30, 30, 30]


def test_correlated_sorted_by_label_within_each_domain():
    ds = FakeDomains(["fog", "snow"], n=40, classes=5)
    s = streams.build("correlated", ds, batch_size=8)
    for seg in s.segments:
        _, y, _ = seg.load()
        assert torch.equal(y, torch.sort(y).values)
    assert [seg.reset for seg in s.segments] == [True, False]
    assert [seg.reset for seg in streams.build("correlated", ds, reset_each_shift=True).segments] == [True, True]


def _batch_purity(delta, seed=0):
    n, classes, batch = 2000, 10, 100
    ds = FakeDomains(["fog"], n=n, labels=torch.arange(n) % classes)
    s = streams.build("correlated", ds, batch_size=batch, delta=delta, seed=seed)
    fractions = []
    total = Counter()
    for b in s:
        counts = torch.bincount(b.y, minlength=classes).float()
        fractions.append(float(counts.max() / counts.sum()))
        total.update(b.y.tolist())
    assert total == Counter((torch.arange(n) % classes).tolist())  # a permutation: nothing lost or repeated
    return sum(fractions) / len(fractions)


def test_dirichlet_small_delta_gives_nearly_single_class_batches():
    assert _batch_purity(1e-3) > 0.9


def test_dirichlet_large_delta_gives_nearly_uniform_batches():
    assert _batch_purity(1e4) < 0.25  # uniform would be 0.1 plus sampling noise


def test_dirichlet_moderate_delta_in_between():
    assert 0.25 < _batch_purity(0.1) < 0.9


def test_dirichlet_is_deterministic_for_a_seed():
    y = torch.arange(500) % 7
    a = streams.dirichlet_order(y, 0.5, 5, seed=1)
    assert torch.equal(a, streams.dirichlet_order(y, 0.5, 5, seed=1))
    assert not torch.equal(a, streams.dirichlet_order(y, 0.5, 5, seed=2))
    assert sorted(a.tolist()) == list(range(500))
    with pytest.raises(ConfigError):
        streams.dirichlet_order(y, 0.0, 5, seed=1)


def test_streams_are_deterministic_across_calls():
    ds = FakeDomains(["fog", "snow"], n=30)
    for name, opts in [("continual", {"order": 1}), ("mixed_domains", {"seed": 5}), ("correlated", {"delta": 0.3}),
                       ("lifelong", {"rounds": 2}), ("gradual", {})]:
        a = [(ids(b), b.y.tolist(), b.domain.tolist()) for b in streams.build(name, ds, batch_size=7, **opts)]
        b = [(ids(b), b.y.tolist(), b.domain.tolist()) for b in streams.build(name, ds, batch_size=7, **opts)]
        assert a == b, name


def test_window_stream_scores_each_sample_once():
    ds = FakeDomains(["fog", "snow"], n=20)
    s = streams.build("continual", ds, batch_size=1, window=8)
    batches = list(s)
    scored = [i for b in batches for i in ids(b)]
    assert sorted(scored) == sorted((CORRUPTIONS.index(c), 5, k) for c in ds.corruptions for k in range(20))
    # per segment: one batch of the first 8, then 12 windows of 8 with the newest image scored
    assert len(batches) == 2 * (1 + 12)
    assert [len(b.x) for b in batches] == [8] * 26
    assert [b.context for b in batches] == ([0] + [7] * 12) * 2
    assert [b.reset for b in batches] == [True] + [False] * 25
    window = (batches[1].x[:, 2, 0, 0] * 255).round().long().tolist()
    assert window == list(range(1, 9))  # images 1..8 of the segment; image 8 is the scored one
    # the runner scores logits[context:]: the accumulator counts each image once
    acc = ErrorAccumulator()
    for b in batches:
        logits = torch.zeros(len(b.x), 4)
        acc.update(logits[b.context:], b.y, b.domain, b.round, {}, 0.0)
    assert [r["n"] for r in acc.rows(s.domain_names)] == [20, 20]


def test_window_with_larger_batches_and_a_ragged_end():
    ds = FakeDomains(["fog"], n=23)
    b = list(streams.build("reset_each_shift", ds, batch_size=4, window=10))
    assert [len(x.y) for x in b] == [10, 4, 4, 4, 1]
    assert [x.context for x in b] == [0, 6, 6, 6, 9]
    assert sum(len(x.y) for x in b) == 23


@pytest.mark.parametrize("window", [1, 4, 2.5])
def test_window_must_exceed_batch_size(window):
    with pytest.raises(ConfigError, match="window"):
        streams.build("continual", FakeDomains(["fog"]), batch_size=4, window=window)


def test_every_protocol_accepts_window_and_rejects_unknown_options():
    for name in streams.available():
        streams.check_options(name, {"window": 8, "batch_size": 1})
    with pytest.raises(ConfigError, match="allowed"):
        streams.check_options("gradual", {"rounds": 2})


@pytest.mark.realdata
def test_window_stream_end_to_end_with_the_runner(data_dir):
    from tta.eval.runner import run_config
    cfg = {"model": {"name": "cifar_resnet20"}, "method": {"name": "norm"}, "setting": "continual",
           "data": {"source": "generate", "n_examples": 24, "corruptions": ["fog", "contrast"], "data_dir": str(data_dir)},
           "stream": {"batch_size": 1, "window": 8}, "output": {"save": False}, "progress": False, "device": "cpu", "threads": 1}
    res = run_config(cfg)
    assert [r["n"] for r in res["domains"]] == [24, 24]
    assert len(res["batch_errors"]) == 2 * (1 + 16)
