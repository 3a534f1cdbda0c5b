"""Released CIFAR-C files are checked before use: single-severity files accepted (how their severity is told),
any other row count, label file length, dtype or shape is one clear error naming the file; CIFAR-100-C is
generated from a CIFAR-100 test npz."""
import numpy as np
import pytest
import torch

from tta.data import streams
from tta.data.domains import DomainSet
from tta.errors import ConfigError, MissingFileError


def images(rows, fill=None, shape=(32, 32, 3), dtype=np.uint8):
    a = np.zeros((rows, *shape), dtype=dtype)
    a[:, 0, 0, 0] = np.arange(rows) % 251 if fill is None else fill
    return a


def folder(tmp_path, name="CIFAR-10-C"):
    f = tmp_path / name
    f.mkdir(exist_ok=True)
    return f


def load(tmp_path, corruption="fog", severities=(5,), dataset="cifar10"):
    ds = DomainSet(dataset, "files", tmp_path, None, 0, [corruption], list(severities))
    return [d.load() for d in ds.domains]


def test_single_severity_file_is_the_configured_severity(tmp_path):
    f = folder(tmp_path)
    np.save(f / "fog.npy", images(10000))
    np.save(f / "labels.npy", np.tile(np.arange(10000) % 10, 5).astype(np.uint8))  # the released 50,000 labels
    (x, y), = load(tmp_path, severities=[3])
    assert x.shape == (10000, 3, 32, 32) and x[:5, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert y[:3].tolist() == [0, 1, 2]  # labels of severity 3's slice
    with pytest.raises(ConfigError, match=r"fog.npy holds a single severity \(10000 images\), taken to be severity 3 "
                                          r"earlier in this run, so it cannot also be severity 5"):
        load(tmp_path, severities=[3, 5])
    # one file per severity, named <corruption>_<severity>.npy, wins over the plain name
    np.save(f / "fog_5.npy", images(10000, fill=77))
    (x3, _), (x5, _) = load(tmp_path, severities=[3, 5])
    assert int(x3[0, 0, 0, 0]) == 0 and int(x5[0, 0, 0, 0]) == 77


def test_released_layout_slices_severities(tmp_path):
    f = folder(tmp_path)
    a = np.lib.format.open_memmap(f / "snow.npy", mode="w+", dtype=np.uint8, shape=(50000, 32, 32, 3))
    a[::10000, 0, 0, 0] = [1, 2, 3, 4, 5]
    a.flush()
    del a
    np.save(f / "labels.npy", (np.arange(10000) % 10).astype(np.int64))  # 10,000 labels serve every severity
    (x2, y2), (x4, _) = load(tmp_path, "snow", [2, 4])
    assert int(x2[0, 0, 0, 0]) == 2 and int(x4[0, 0, 0, 0]) == 4 and len(y2) == 10000


@pytest.mark.parametrize("what, make, message", [
    ("rows", lambda f: np.save(f / "fog.npy", images(9999)),
     r"fog.npy holds 9999 images; expected 50000 \(severities 1-5, severity-major\) or 10000"),
    ("dtype", lambda f: np.save(f / "fog.npy", images(10000, dtype=np.float32)),
     r"fog.npy holds float32 of shape \(10000, 32, 32, 3\); expected uint8 images of shape"),
    ("shape", lambda f: np.save(f / "fog.npy", images(10000, shape=(3, 32, 32))),
     r"fog.npy holds uint8 of shape \(10000, 3, 32, 32\); expected uint8 images of shape "
     r"\(50000 or 10000, 32, 32, 3\)"),
    ("truncated", lambda f: (f / "fog.npy").write_bytes(b"\x93NUMPY" + b"\x00" * 20),
     r"fog.npy is not a readable .npy file"),
])
def test_malformed_image_files(tmp_path, what, make, message):
    f = folder(tmp_path)
    make(f)
    np.save(f / "labels.npy", np.zeros(10000, dtype=np.uint8))
    with pytest.raises(ConfigError, match=message):
        load(tmp_path)


@pytest.mark.parametrize("labels, message", [
    (np.zeros(12345, dtype=np.uint8), r"labels.npy holds 12345 labels; expected 50000 \(severities 1-5\) or 10000"),
    (np.zeros((10000, 1), dtype=np.uint8), r"labels.npy holds uint8 of shape \(10000, 1\); expected a 1-D integer"),
    (np.full(10000, 10, dtype=np.int64), r"labels.npy holds labels in \[10, 10\]; expected class indices in \[0, 9\]"),
])
def test_malformed_label_files(tmp_path, labels, message):
    f = folder(tmp_path)
    np.save(f / "fog.npy", images(10000))
    np.save(f / "labels.npy", labels)
    with pytest.raises(ConfigError, match=message):
        load(tmp_path)


def test_missing_files_and_auto_source(tmp_path):
    from tta.data.datasets import load_cifar_c
    with pytest.raises(MissingFileError, match="fog.npy, labels.npy not found"):
        load_cifar_c("fog", 5, "cifar10", tmp_path)  # (no download attempt: that needs robustbench and a network)
    f = folder(tmp_path)
    np.save(f / "fog_5.npy", images(10000))
    ds = DomainSet("cifar10", "auto", tmp_path, None, 0, ["fog", "snow"], [5])
    assert [d.source for d in ds.domains] == ["files", "generate"]


def test_cifar100_c_is_generated_from_a_cifar100_test_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    y = np.arange(200) % 100
    np.savez(tmp_path / "cifar100_test.npz", x=x, y=y)
    ds = DomainSet("cifar100", "generate", tmp_path, None, 0, ["gaussian_noise"], [5])
    batches = list(streams.build("continual", ds, batch_size=100))
    assert [tuple(b.x.shape) for b in batches] == [(100, 3, 32, 32)] * 2
    assert torch.cat([b.y for b in batches]).tolist() == y.tolist()
    from tta.data.corruptions import corrupt_dataset
    ref = corrupt_dataset(x, "gaussian_noise", 5, seed=0)
    assert torch.equal((torch.cat([b.x for b in batches]) * 255).round().to(torch.uint8), ref)
    np.savez(tmp_path / "cifar100_test.npz", x=x, y=y + 100)
    with pytest.raises(ConfigError, match="labels in \\[100, 199\\]; expected 32x32 RGB images and as many labels in"):
        DomainSet("cifar100", "generate", tmp_path, None, 0, ["gaussian_noise"], [5]).domains[0].load()
