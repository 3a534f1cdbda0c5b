"""Every classifier method of the registry through the runner on the two protocols the issue names for
them: a single-image stream with the sliding window (``stream.batch_size=1, stream.window``) and
``reset_each_shift``; the runner also checkpoints (pickles) each adapter after every domain, so this
covers checkpoint/resume too. Random-init cifar_resnet20 (no checkpoint needed) and a few generated
CIFAR-10-C images, with each method's cheapest settings: this checks mechanics, not numbers."""
import math
import pickle

import pytest
import torch

import tta
from tta.eval.runner import run_config

pytestmark = pytest.mark.realdata

CHEAP = {  # options that shrink the work, not the algorithm
    "ttaug": {"views": 3}, "memo": {"views": 3}, "cotta": {"augmentations": 2},
    "rmt": {"warmup_samples": 32, "source_batch_size": 16}, "gtta": {"source_batch_size": 16},
    "adacontrast": {"queue_size": 64}, "eata": {"fisher_n": 32, "fisher_batch_size": 16},
    "eata_c": {"fisher_n": 32, "fisher_batch_size": 16}, "lcotta": {"k": 2, "every": 1, "window": 4},
}
SOURCE = {"dataset": "cifar10_train", "n": 64}
CLASSIFIER_METHODS = [m for m in tta.methods.available() if tta.methods.info(m).requires == "classifier"]


def method_block(name):
    block = {"name": name, **CHEAP.get(name, {})}
    options = tta.methods.method_options(name)
    if "source_images" in options:
        block["source"] = SOURCE
    if "fisher_data" in options and name != "come":
        block["fisher"] = SOURCE
    return block


def config(name, tmp_path, **stream):
    return {"name": f"all_{name}", "seed": 1, "threads": 1, "progress": False, "setting": "reset_each_shift",
            "model": {"name": "cifar_resnet20", "checkpoint": "none"},
            "data": {"dataset": "cifar10", "source": "generate", "corruptions": ["gaussian_noise", "fog"],
                     "n_examples": 12},
            "stream": stream, "method": method_block(name),
            "output": {"dir": str(tmp_path), "save": True}}


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_single_image_window_stream_and_reset_each_shift(name, tmp_path, data_dir):
    results = run_config(config(name, tmp_path, batch_size=1, window=6))
    rows = results["domains"]
    assert [r["n"] for r in rows] == [12, 12]  # every image scored once, context images not
    assert all(math.isfinite(r["error"]) and math.isfinite(r["nll"]) for r in rows)


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_adapters_pickle_and_continue_identically(name, tiny_data):
    """What the runner's checkpoint relies on: a pickled adapter continues exactly like the original."""
    from tta import config as cfg_mod
    from tta.eval.runner import build_adapter
    cfg = cfg_mod.from_dict(config(name, "/tmp/unused"))
    adapter = build_adapter(cfg, torch.device("cpu"))
    first, second = tiny_data
    adapter(first)
    clone = pickle.loads(pickle.dumps(adapter))
    assert torch.equal(adapter(second), clone(second))


@pytest.fixture(scope="module")
def tiny_data(dev_domains):
    return dev_domains["noise"][:8], dev_domains["dark"][:8]
