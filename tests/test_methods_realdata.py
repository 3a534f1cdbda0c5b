"""The reliable-sample methods end to end on cifar_resnet20 and a few hundred shifted CIFAR-10 test images.

Two domains made here as in REFERENCE.md (gaussian noise 0.1, contrast 0.15), batches of 64.
"""
import pytest
import torch

import tta

pytestmark = pytest.mark.realdata

METHODS = {
    "eta": {}, "sar": {}, "deyo": {}, "tent_wisdom": {}, "eta_wisdom": {}, "tsallis": {}, "tsallis_wisdom": {},
    "adte": {"min_entries": 20}, "rdumb": {"every": 3}, "eata": {"fisher_n": 128, "fisher_batch_size": 64},
    "eata_c": {"fisher_n": 128, "fisher_batch_size": 64}, "come": {}, "come_eata": {"host": "eata", "fisher_n": 128, "fisher_batch_size": 64},
}
ALIASES = {"come_eata": "come"}  # a test id -> the registered method


@pytest.fixture(scope="module")
def batches(dev_domains):
    noise, contrast = dev_domains["noise"], dev_domains["contrast"]
    return [noise[:64], noise[64:128], contrast[:64], contrast[64:128]]


@pytest.fixture(scope="module")
def clean_train(data_dir):
    from tta.data.datasets import load_cifar10
    return load_cifar10(data_dir, "train")[0][:128].float() / 255


def make(name, data_dir, clean_train, **kw):
    options = dict(METHODS[name], **kw)
    if name in ("eata", "eata_c", "come_eata"):
        options["fisher_data"] = clean_train
    return tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), ALIASES.get(name, name), **options)


def state_of(adapter):
    return {k: v.clone() for k, v in adapter.model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_and_resets_bit_exactly(name, batches, data_dir, clean_train):
    adapter = make(name, data_dir, clean_train)
    source = state_of(adapter)
    runs = []
    for x in batches:
        logits = adapter(x)
        assert logits.shape == (64, 10) and torch.isfinite(logits).all()
        runs.append((logits, dict(adapter.last)))
        assert 0 <= adapter.last["selected"] <= 64
    c = adapter.counters
    assert c["batches"] == 4 and c["nonfinite"] == 0
    per_step = 2 if name == "sar" else 1
    assert c["backward"] == per_step * c["steps"] and c["steps"] >= 1
    if name == "rdumb":
        assert c["resets"] == 1
    changed = any(not torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())
    assert changed or name == "rdumb"

    adapter.reset()  # weights, optimizer and every part's state (redundancy mean, memories, RNG)
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())
    for x, (logits, last) in zip(batches[:2], runs):
        assert torch.equal(adapter(x), logits)
        assert adapter.last == last


def test_eta_selects_fewer_than_the_batch_and_weights_them(batches, data_dir, clean_train):
    adapter = make("eta", data_dir, clean_train)
    adapter(batches[0])
    first = adapter.last["selected"]
    adapter(batches[1])
    assert 0 < first < 64 and 0 < adapter.last["selected"] < 64
    out = adapter.compute_loss(batches[1], update_state=False)
    e = out.batch.entropy.detach()
    w = torch.exp(0.4 * torch.log(torch.tensor(10.0)) - e)
    assert torch.allclose(out.loss, (w * e)[out.mask].mean())


def test_nothing_selected_means_no_step_and_an_untouched_optimizer(batches, data_dir, clean_train):
    for name in ("eta", "sar", "deyo"):
        adapter = make(name, data_dir, clean_train, margin_frac=0.0)  # H < 0 never holds
        source = state_of(adapter)
        adapter(batches[0])
        assert adapter.last == {"selected": 0, "stepped": False, "loss": None, "batch": 64}
        assert adapter.counters["backward"] == 0 and adapter.counters["empty"] == 1
        assert adapter.optimizer.state_dict()["state"] == {}
        assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())


def test_sar_default_skips_the_last_stage(batches, data_dir, clean_train):
    adapter = make("sar", data_dir, clean_train)
    assert adapter.param_names and not any(".layer3." in n for n in adapter.param_names)
    assert len(make("sar", data_dir, clean_train, skip_top=False).params) > len(adapter.params)
    source = state_of(adapter)
    for x in batches[:2]:
        adapter(x)
    moved = {k for k, v in adapter.model.state_dict().items() if not torch.equal(v, source[k])}
    assert moved and not any(".layer3." in k for k in moved)
    assert adapter.counters["backward"] == 2 * adapter.counters["steps"]


def test_adte_memory_engages(batches, data_dir, clean_train):
    adapter = make("adte", data_dir, clean_train, min_entries=30)
    for x in batches:
        adapter(x)
    objective = adapter.recipe.objective
    assert objective.entries >= 30
    q = objective.class_q()
    assert q.min() >= 0.01 - 1e-6 and q.max() <= 0.9 + 1e-6 and q.max() > q.min()
