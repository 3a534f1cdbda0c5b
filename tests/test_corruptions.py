"""Public API of the corruption engine: shapes, ranges, determinism, severity ordering, errors."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tta.data import corruptions as C
from tta.errors import InputError, MissingFileError, TTAError

RANDOM = [n for n in C.ALL_CORRUPTIONS if n not in C.DETERMINISTIC]
# Corruptions whose reference constants do not make the mean change from the clean image grow at every
# step (e.g. saturate: x0.1 at severity 2 is stronger than x1.5 at 3; spatter switches from water to mud
# at 4; elastic's affine jitter shrinks with severity; glass blur trades sigma for iterations; frost
# lowers the image weight and raises the texture weight).
NOT_MONOTONE = {"glass_blur", "frost", "elastic_transform", "spatter", "saturate"}


@pytest.fixture(scope="module")
def fake_frost(tmp_path_factory):
    """Five random frost pictures big enough for 32 px crops after the x0.2 down-scaling."""
    from PIL import Image
    from tta.data.corruptions.frost import FROST_FILES
    folder = tmp_path_factory.mktemp("frost")
    rng = np.random.default_rng(0)
    for i, name in enumerate(FROST_FILES):
        Image.fromarray(rng.integers(0, 256, (220 + 10 * i, 260, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)           # some structure, not only noise
    return torch.floor(x * 255) / 255


@pytest.fixture(scope="module")
def real_images():
    root = os.environ.get("TTA_DATA_DIR")
    path = Path(root) / "cifar10_test.npz" if root else None
    if path is None or not path.is_file():
        pytest.skip("needs TTA_DATA_DIR with cifar10_test.npz")
    x = np.load(path)["x"][:64]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255


def test_names_and_functional_ops():
    assert C.CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                             "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                             "elastic_transform", "pixelate", "jpeg_compression")
    assert C.EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    for name in C.ALL_CORRUPTIONS:
        assert callable(getattr(C, name)) and getattr(C, name).__name__ == name


@pytest.mark.parametrize("name", C.ALL_CORRUPTIONS)
def test_shape_dtype_range_and_8bit_grid(name, batch, fake_frost):
    out = C.corrupt(batch, name, 5, seed=1, frost_dir=fake_frost)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    levels = out.double() * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert not torch.equal(out, batch)
    out64 = getattr(C, name)(batch.double(), 2, generator=torch.Generator().manual_seed(0), frost_dir=fake_frost)
    assert out64.dtype == torch.float64


@pytest.mark.parametrize("name", RANDOM)
def test_seeded_determinism(name, batch, fake_frost):
    a = C.corrupt(batch, name, 3, seed=5, frost_dir=fake_frost)
    b = C.corrupt(batch, name, 3, seed=5, frost_dir=fake_frost)
    c = C.corrupt(batch, name, 3, seed=6, frost_dir=fake_frost)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(C.DETERMINISTIC))
def test_deterministic_ops_ignore_the_seed(name, batch):
    assert torch.equal(C.corrupt(batch, name, 4, seed=1), C.corrupt(batch, name, 4, seed=2))


@pytest.mark.parametrize("name", C.ALL_CORRUPTIONS)
def test_severity_monotonicity_on_cifar(name, real_images):
    frost_dir = Path(os.environ["TTA_DATA_DIR"]) / "corruption_assets" / "frost"
    change = [float((C.corrupt(real_images, name, s, seed=0, frost_dir=frost_dir) - real_images).abs().mean())
              for s in range(1, 6)]
    if name in NOT_MONOTONE:
        assert max(change) > 0.003          # still a visible corruption at every severity ordering
    elif name == "motion_blur":             # severities 3 and 4 have the same blur centroid (1.30 px)
        assert all(b >= a - 0.002 for a, b in zip(change, change[1:])) and change[4] > change[0]
    else:
        assert all(b > a for a, b in zip(change, change[1:])), change


def test_corrupt_transform_and_single_image(batch):
    t = C.Corrupt("gaussian_noise", 2, seed=3)
    first, second = t(batch), t(batch)
    assert not torch.equal(first, second)                          # the stream advances
    assert torch.equal(C.Corrupt("gaussian_noise", 2, seed=3)(batch), first)
    single = C.Corrupt("contrast", 1)(batch[0])
    assert single.shape == batch[0].shape
    assert torch.equal(single, C.contrast(batch[:1], 1)[0])
    assert "gaussian_noise" in repr(t)


def test_parameter_sets_by_size_and_explicit():
    x = torch.full((2, 3, 224, 224), 0.5)
    assert C.contrast(x, 1).shape == x.shape
    odd = torch.rand(1, 3, 40, 40)
    with pytest.raises(TTAError, match="params='cifar'"):
        C.contrast(odd, 1)
    assert C.gaussian_blur(odd, 3, params="imagenet").shape == odd.shape
    with pytest.raises(TTAError, match="unknown corruption parameter set"):
        C.contrast(odd, 1, params="mnist")


def test_errors_are_clear(batch):
    with pytest.raises(TTAError, match="gaussian_noise.*jpeg_compression"):
        C.corrupt(batch, "gauss", 1)
    for bad in (0, 6, 2.0, True):
        with pytest.raises(TTAError, match="severity"):
            C.corrupt(batch, "fog", bad)
    with pytest.raises(InputError, match="shaped"):
        C.corrupt(batch[0], "fog", 1)
    with pytest.raises(InputError, match="float"):
        C.corrupt((batch * 255).to(torch.uint8), "fog", 1)
    nan = batch.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        C.corrupt(nan, "fog", 1)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        C.corrupt(batch * 2, "fog", 1)
    with pytest.raises(InputError):
        C.corrupt(batch.numpy(), "fog", 1)


def test_frost_missing_folder_names_files_and_folder(batch, tmp_path):
    with pytest.raises(MissingFileError) as err:
        C.frost(batch, 1, frost_dir=tmp_path / "nowhere")
    assert "frost1.png" in str(err.value) and "frost5.jpg" in str(err.value) and "nowhere" in str(err.value)


def test_frost_uses_only_five_pictures_and_caches(batch, fake_frost):
    from tta.data.corruptions.frost import FROST_FILES, load_frost
    assert FROST_FILES == ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
    a = load_frost(0.2, fake_frost)
    b = load_frost(0.2, fake_frost)
    assert a[0].shape[0] == 5 and a[1][0].tolist() == [44, 52] and a[0].data_ptr() == b[0].data_ptr()


def test_corrupt_dataset_independent_of_chunking(batch, fake_frost):
    images = (torch.rand(250, 32, 32, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    for name in ("gaussian_noise", "glass_blur", "frost"):
        full = C.corrupt_dataset(images, name, 4, seed=3, frost_dir=fake_frost)
        assert full.dtype == torch.uint8 and full.shape == (250, 3, 32, 32)
        small = C.corrupt_dataset(images.numpy(), name, 4, seed=3, chunk_size=100, frost_dir=fake_frost)
        tail = C.corrupt_dataset(images[200:], name, 4, seed=3, start=200, frost_dir=fake_frost)
        nchw = C.corrupt_dataset(images.permute(0, 3, 1, 2), name, 4, seed=3, frost_dir=fake_frost)
        assert torch.equal(full, small) and torch.equal(full[200:], tail) and torch.equal(full, nchw)
        assert not torch.equal(full, C.corrupt_dataset(images, name, 4, seed=4, frost_dir=fake_frost))
        # The same images on the fly, with the generator of RNG chunk 1 (images 100..199).
        gen = torch.Generator().manual_seed(C.chunk_seed(3, name, 4, 1))
        x = images[100:200].permute(0, 3, 1, 2).float() / 255
        fly = C.corrupt(x, name, 4, generator=gen, frost_dir=fake_frost)
        assert torch.equal((fly * 255).round().to(torch.uint8), full[100:200])


def test_corrupt_dataset_rejects_bad_input():
    with pytest.raises(InputError, match="uint8"):
        C.corrupt_dataset(np.zeros((2, 32, 32, 3), np.float32), "fog", 1, seed=0)
    with pytest.raises(InputError, match="RGB"):
        C.corrupt_dataset(np.zeros((2, 32, 32, 4), np.uint8), "fog", 1, seed=0)
    with pytest.raises(InputError, match="multiple"):
        C.corrupt_dataset(np.zeros((2, 32, 32, 3), np.uint8), "fog", 1, seed=0, start=50)
