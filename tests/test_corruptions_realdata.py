"""Real CIFAR-10 + ResNet-20: generated severity-5 corruptions hurt the source model in the known order."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tta.data import corruptions as C

pytestmark = pytest.mark.realdata
N_IMAGES = 500


@pytest.fixture(scope="module")
def setup():
    root = os.environ.get("TTA_DATA_DIR")
    if not root or not (Path(root) / "cifar10_test.npz").is_file():
        pytest.skip("needs TTA_DATA_DIR with cifar10_test.npz and models/resnet20-12fca82f.th")
    import tta.models
    data = np.load(Path(root) / "cifar10_test.npz")
    model = tta.models.load("cifar_resnet20")
    return data["x"][:N_IMAGES], torch.from_numpy(data["y"][:N_IMAGES]), model


def _error(model, images_u8_nchw, labels):
    with torch.inference_mode():
        pred = model(images_u8_nchw.float() / 255).argmax(1)
    return float((pred != labels).float().mean())


def test_resnet20_error_ordering_at_severity_5(setup):
    x, y, model = setup
    clean = _error(model, torch.from_numpy(x).permute(0, 3, 1, 2), y)
    err = {name: _error(model, C.corrupt_dataset(x, name, 5, seed=0), y)
           for name in ("gaussian_noise", "impulse_noise", "brightness", "contrast", "fog", "pixelate")}
    assert clean < 0.12                                        # 91.7 % accuracy on the full set
    assert err["brightness"] < 0.2                             # mild for CIFAR models
    assert err["gaussian_noise"] > err["brightness"] + 0.2     # noise is among the hardest
    assert err["impulse_noise"] > err["brightness"] + 0.1
    assert min(err.values()) >= clean - 0.02
    assert err["contrast"] > err["fog"] > err["brightness"]
