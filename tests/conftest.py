"""Shared fixtures. Real-data tests read TTA_DATA_DIR and are skipped (with a reason) without it;
CI sets it, so there they always run."""
import os
from pathlib import Path

import pytest
import torch

# One torch thread per test process: the suite runs as two pytest-xdist workers (`make test`), which
# fills two cores without torch's threads waiting on each other, and small CIFAR batches gain little
# from a second thread anyway.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = os.environ.get("TTA_DATA_DIR")
    if not root or not (Path(root) / "cifar10_test.npz").exists():
        pytest.skip("real data not available: set TTA_DATA_DIR to a folder with cifar10_test.npz and models/")
    return Path(root)


@pytest.fixture(scope="session")
def cifar_test(data_dir):
    """The CIFAR-10 test set as (uint8 N×3×32×32, labels)."""
    from tta.data.datasets import load_cifar10
    return load_cifar10(data_dir, "test")


@pytest.fixture()
def tiny_bn_model():
    """A small random BN CNN with 10 outputs, for unit tests that need no real weights."""
    torch.manual_seed(0)
    from torch import nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


@pytest.fixture(scope="session")
def dev_domains(cifar_test):
    """The first 256 CIFAR-10 test images under the REFERENCE.md dev-stream shifts (float, [0, 1])."""
    import torch.nn.functional as F
    x = cifar_test[0][:256].float() / 255
    noise = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    m = x.mean(dim=(2, 3), keepdim=True)
    return {"noise": noise, "contrast": ((x - m) * 0.15 + m).clamp(0, 1),
            "blur": F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), "dark": x * 0.4}
