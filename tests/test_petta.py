"""PeTTA (METHODS-ZOO Z.13): the drift divergence, the parameter regulariser and the adaptive coefficients
on hand-made tensors, then the method on cifar_resnet20 with real CIFAR-10 images."""
import math

import pytest
import torch
from torch import nn

import tta
from tta import config
from tta.errors import ConfigError
from tta.methods.petta import drift_divergence, parameter_regulariser


def test_drift_divergence_by_hand():
    proto = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]])
    mu = torch.tensor([[0.0, 2.0], [5.0, 5.0], [1.0, 1.0]])
    var = torch.tensor([[1.0, 4.0], [1.0, 1.0], [2.0, 8.0]])
    got = drift_divergence(proto, mu, var, torch.tensor([0, 2]))
    expected = (1 / (1 + 1e-6) + 0 / (4 + 1e-6) + 4 / (2 + 1e-6) + 4 / (8 + 1e-6)) / 4
    assert math.isclose(float(got), expected, rel_tol=1e-6)


def test_parameter_regulariser_cosine_and_l2():
    p = [torch.tensor([1.0, 0.0]), torch.tensor([[2.0, 2.0]])]
    a = [torch.tensor([0.0, 1.0]), torch.tensor([[1.0, 1.0]])]
    assert math.isclose(float(parameter_regulariser(p, a, "cosine")), -(0.0 + 1.0) / 2, abs_tol=1e-6)
    assert math.isclose(float(parameter_regulariser(p, a, "l2")), (2.0 + 2.0) / 2, abs_tol=1e-6)


@pytest.fixture(scope="module")
def source(data_dir):
    from tta.data.datasets import load_cifar10
    return load_cifar10(data_dir, "train")[0][:512]


def make(data_dir, source, **kw):
    return tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), "petta", source_images=source, **kw)


@pytest.mark.realdata
def test_petta_runs_resets_and_repeats(dev_domains, data_dir, source):
    batches = [dev_domains["noise"][:64], dev_domains["noise"][64:128], dev_domains["contrast"][:64]]
    adapter = make(data_dir, source)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    outs, lasts = [], []
    for x in batches:
        outs.append(adapter(x))
        lasts.append(dict(adapter.last))
    assert all(o.shape == (64, 10) and torch.isfinite(o).all() for o in outs)
    assert lasts[0]["drift"] == 0.0  # prototypes start at the source means
    assert 0 < lasts[-1]["drift"] < 1 and math.isclose(lasts[-1]["lambda"], 10 * lasts[-1]["drift"])
    assert math.isclose(lasts[-1]["alpha"], 1e-3 * (1 - lasts[-1]["drift"]))
    init = dict(adapter.init_model.named_parameters())
    assert all(torch.equal(init[n], state[f"model.{n}"]) for n in adapter.param_names)  # never trained
    assert not all(torch.equal(v, state[k]) for k, v in adapter.state_dict().items())
    adapter.reset()
    assert all(torch.equal(v, state[k]) for k, v in adapter.state_dict().items())
    again = [adapter(x) for x in batches]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    fresh = make(data_dir, source)
    assert torch.equal(fresh(batches[0]), outs[0])
    small = make(data_dir, source)
    assert small(batches[0][:2]).shape == (2, 10) and small(batches[0][:1]).shape == (1, 10)


@pytest.mark.realdata
def test_petta_options_and_errors(dev_domains, data_dir, source):
    x = dev_domains["dark"][:32]
    for kw in ({"loss": "ce"}, {"regulariser": "l2"}, {"adaptive_lambda": False, "adaptive_alpha": False}):
        out = make(data_dir, source, **kw)(x)
        assert torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="source_images"):
        tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), "petta")
    with pytest.raises(ConfigError, match="loss must be one of"):
        make(data_dir, source, loss="kl")


def test_configs_load():
    for path in ("configs/cifar10c/petta.yaml", "configs/imagenetc/petta.yaml", "configs/cifar10c/lifelong_petta.yaml"):
        cfg = config.load(path)
        assert cfg["method"]["name"] == "petta" and cfg["method"]["source"]["dataset"] in ("cifar10_train",
                                                                                           "imagenet_val")


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(ConfigError, match="BatchNorm"):
        tta.wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)), "petta",
                 source_images=torch.rand(4, 3, 8, 8))
