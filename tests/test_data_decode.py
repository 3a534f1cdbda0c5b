"""Decoding and preprocessing (tta.data.decode): torchvision's decoder against the PIL path, the reference's
resize/crop rules, and clear errors. The measured difference is the documented one: decoding identical,
resizing within one 8-bit level on a small fraction of the values."""
import numpy as np
import pytest
import torch

from tta.data import decode
from tta.data.datasets import load_images
from tta.errors import ConfigError
from test_data_fakes import save


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    sizes = [(256, 256), (300, 257), (257, 411), (343, 260), (480, 640), (500, 333)]
    return [save(root / f"{k}.JPEG", h, w, k) for k, (h, w) in enumerate(sizes)]


def test_torchvision_decoding_gives_pils_pixels(jpegs):
    from PIL import Image
    for p in jpegs:
        with Image.open(p) as im:
            ref = torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())
        assert torch.equal(decode.decode_one(decode.read_bytes(p)), ref)


def test_resize_crop_against_the_pil_path(jpegs):
    """Resize 256 + CenterCrop 224: at most one level apart, on under 2 % of the values (measured ~0.2 %)."""
    tv = decode.load_files(jpegs, 224, 256, decoder="torchvision")
    pil = load_images(jpegs, 224, 256)
    diff = (tv.int() - pil.int()).abs()
    assert tv.shape == pil.shape == (len(jpegs), 3, 224, 224)
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02
    for name in ("clip224", "square256"):
        tv = decode.load_files(jpegs, preprocess=name).int()
        d = tv - decode.load_files(jpegs, preprocess=name, decoder="pil").int()
        assert int(d.abs().max()) <= 2, name  # bicubic: PIL and torch round their 8-bit passes differently


def test_reference_crop_offsets_and_sizes():
    assert decode.shorter_side_size(300, 400, 256) == (256, 341)  # longer side truncated, as torchvision
    assert decode.shorter_side_size(400, 300, 256) == (341, 256)
    # torchvision's CenterCrop rounds half to even: (343 - 224) / 2 = 59.5 -> 60, (341 - 224) / 2 = 58.5 -> 58
    assert decode.center_offsets(343, 341, 224) == (60, 58)
    img = torch.arange(343 * 341, dtype=torch.int32).view(1, 343, 341)
    out = decode.resize_crop(img, 224, spec=decode.PREPROCESS["none"])
    assert int(out[0, 0, 0]) == 60 * 341 + 58


def test_pngs_named_jpeg_and_bad_files(tmp_path):
    png = save(tmp_path / "x.png", 240, 250, 1)
    disguised = tmp_path / "n0_disguised.JPEG"
    disguised.write_bytes(png.read_bytes())  # ImageNet's validation set holds one such file
    assert decode.load_files([disguised], 224).shape == (1, 3, 224, 224)
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="broken.JPEG cannot be decoded"):
        decode.load_files([broken], 224)
    small = save(tmp_path / "small.JPEG", 100, 120, 2)
    with pytest.raises(ConfigError, match="small.JPEG is 120x100 pixels after resizing, smaller than the 224px"):
        decode.load_files([small], 224, decoder="pil")
    with pytest.raises(ConfigError, match="data.decoder must be one of torchvision, pil"):
        decode.load_files([small], 224, decoder="cv2")
    with pytest.raises(ConfigError, match="data.preprocess must be one of"):
        decode.check_preprocess("resize300")
