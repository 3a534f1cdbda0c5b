"""Image files -> uint8 (3, H, W) tensors with the reference's preprocessing, by torchvision or by PIL.

The ImageNet pipelines the benchmarks come from (ImageNet-C's generator, EATA's Fisher set, the
classifiers' evaluation) open each file with PIL, resize the shorter side to 256 with PIL's bilinear filter
(which widens its support when downscaling, i.e. antialiases; the longer side becomes
``int(256 * long / short)``) and take the central 224 x 224 crop with torchvision's offsets
``int(round((H - 224) / 2))``. Two decoders produce that here:

* ``torchvision`` (default): ``torchvision.io.decode_image`` (libjpeg-turbo; PNG files named .JPEG, as
  ImageNet has one, are sniffed and decoded too) and ``resize(..., antialias=True)`` on the uint8 tensor.
  Decoding gives PIL's exact pixels on the machines we measured (same libjpeg-turbo, same IDCT); the
  resize differs from PIL's by at most one level on about 0.2 % of the values (tests/test_data_decode.py
  measures both). With a CUDA device, :func:`decode_bytes` decodes a list of JPEGs in one nvjpeg call on
  the GPU (files nvjpeg cannot read fall back to the CPU) and resizes there: that path is written for
  GPUs but was not run here (no GPU), so it is not covered by a test.
* ``pil``: the original PIL loop (bit-exact with the reference's tooling, slower).

A file smaller than the crop after resizing is one clear error naming it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError

DECODERS = ("torchvision", "pil")

# name: (shorter side, or both sides when square; interpolation; square). The crop is always central.
PREPROCESS = {
    "resize256": (256, "bilinear", False),   # ImageNet classifiers, the ImageNet-C generator, EATA's Fisher set
    "square256": (256, "bilinear", True),    # both sides to 256 (DomainNet-126 test transform of Doebler's repo)
    "clip224": (224, "bicubic", False),      # CLIP's own preprocessing (its in-model resize is then the identity)
    "none": (None, "bilinear", False),       # pre-cropped files (ImageNet-C): central crop only
}


def check_decoder(name: str) -> str:
    if name not in DECODERS:
        raise ConfigError(f"data.decoder must be one of {', '.join(DECODERS)}, got {name!r}")
    return name


def check_preprocess(name: str) -> str:
    if name not in PREPROCESS:
        raise ConfigError(f"data.preprocess must be one of {', '.join(PREPROCESS)} or null (the data set's "
                          f"default), got {name!r}")
    return name


def spec_of(resize: Optional[int] = None, preprocess: Optional[str] = None) -> Tuple:
    """A preprocessing spec from a named mode, or from a plain shorter-side size (bilinear)."""
    if preprocess is not None:
        return PREPROCESS[check_preprocess(preprocess)]
    return (resize, "bilinear", False)


def shorter_side_size(height: int, width: int, resize: int) -> Tuple[int, int]:
    """(H, W) after resizing the shorter side to ``resize`` (torchvision's ``Resize(int)`` rule)."""
    if width <= height:
        return int(height * resize / width), resize
    return resize, int(width * resize / height)


def center_offsets(height: int, width: int, size: int) -> Tuple[int, int]:
    """Top-left corner of torchvision's ``CenterCrop(size)`` (round half to even, as Python's round)."""
    return int(round((height - size) / 2)), int(round((width - size) / 2))


def _target(height: int, width: int, spec) -> Optional[Tuple[int, int]]:
    resize, _, square = spec
    if resize is None:
        return None
    if square:
        return (resize, resize)
    return None if min(height, width) == resize else shorter_side_size(height, width, resize)


def _check_size(img: torch.Tensor, size: int, where) -> None:
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ConfigError(f"{where} is {w}x{h} pixels after resizing, smaller than the {size}px crop")


def resize_crop(img: torch.Tensor, size: int = 224, resize: Optional[int] = None, where="image",
                spec: Optional[Tuple] = None) -> torch.Tensor:
    """Resize (``spec``, or the shorter side to ``resize`` when given), then the central ``size`` crop."""
    spec = spec or spec_of(resize)
    target = _target(img.shape[-2], img.shape[-1], spec)
    if target is not None and tuple(img.shape[-2:]) != target:
        img = resize_image(img, target, spec[1])
    _check_size(img, size, where)
    top, left = center_offsets(img.shape[-2], img.shape[-1], size)
    return img[..., top:top + size, left:left + size]


def resize_image(img: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize of uint8 (3, H, W) images with torch's uint8 kernels - the ones torchvision's
    ``resize`` calls - without importing torchvision (its import costs seconds in every process)."""
    return torch.nn.functional.interpolate(img[None], size=list(size), mode=mode, align_corners=False,
                                           antialias=True)[0]


def resized_crop(img: torch.Tensor, box: Tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """Cut ``box = (top, left, height, width)``, resize it to ``size x size`` (bilinear, antialiased), flip."""
    top, left, h, w = box
    out = resize_image(img[..., top:top + h, left:left + w].contiguous(), (size, size))
    return out.flip(-1) if flip else out


def read_bytes(path) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (what torchvision's decoders take)."""
    data = Path(path).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_one(data: torch.Tensor, where="image") -> torch.Tensor:
    """Decode one encoded image (JPEG, PNG, ...) to uint8 RGB (3, H, W) on the CPU."""
    try:
        return _image_ops().decode_image(data, 3, False)  # 3: ImageReadMode.RGB; no EXIF rotation, as PIL
    except RuntimeError:  # formats libjpeg/libpng cannot read (e.g. some CMYK files): PIL, as the reference
        import io
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                return torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())
        except Exception as e:
            raise ConfigError(f"{where} cannot be decoded as an image ({type(e).__name__}: {e})") from None


def _image_ops():
    """torchvision's image codec ops (``torch.ops.image``), loading only its codec library when torchvision is
    not imported yet (see ``tta.data.corruptions.digital``)."""
    from .corruptions.digital import _torchvision_jpeg_ops
    if _torchvision_jpeg_ops() is None:
        raise ConfigError("the torchvision decoder needs torchvision's image library; use data.decoder=pil")
    return torch.ops.image


def decode_bytes(datas: Sequence[torch.Tensor], device=None, where: Sequence = ()) -> List[torch.Tensor]:
    """Decode several encoded images; on a CUDA device JPEGs are decoded together on the GPU (untested here)."""
    device = torch.device(device or "cpu")
    names = list(where) or [f"image {i}" for i in range(len(datas))]
    if device.type != "cuda":
        return [decode_one(d, n) for d, n in zip(datas, names)]
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # a non-JPEG or a JPEG nvjpeg refuses: decode one by one, falling back to the CPU
        out = []
        for d, n in zip(datas, names):
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(decode_one(d, n).to(device))
        return out


def pil_load(path, size: int = 224, resize: Optional[int] = None, spec: Optional[Tuple] = None) -> torch.Tensor:
    """The PIL path: open, RGB, resize as ``spec`` (PIL bilinear/bicubic), central crop; uint8 (3, size, size)."""
    from PIL import Image
    spec = spec or spec_of(resize)
    with Image.open(path) as im:
        im = im.convert("RGB")
        target = _target(im.size[1], im.size[0], spec)
        if target is not None and (im.size[1], im.size[0]) != target:
            im = im.resize((target[1], target[0]), Image.BICUBIC if spec[1] == "bicubic" else Image.BILINEAR)
        a = np.asarray(im)
    img = torch.from_numpy(a.transpose(2, 0, 1).copy())
    _check_size(img, size, path)
    top, left = center_offsets(img.shape[-2], img.shape[-1], size)
    return img[:, top:top + size, left:left + size].contiguous()


def load_files(paths: Sequence, size: int = 224, resize: Optional[int] = None, decoder: str = "torchvision",
               device=None, preprocess: Optional[str] = None) -> torch.Tensor:
    """Decode and preprocess files into one uint8 (N, 3, size, size) tensor (on ``device``)."""
    check_decoder(decoder)
    spec = spec_of(resize, preprocess)
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8, device=device)
    if decoder == "pil":
        for i, p in enumerate(paths):
            out[i] = pil_load(p, size, spec=spec)
        return out
    images = decode_bytes([read_bytes(p) for p in paths], device, paths)
    for i, (img, p) in enumerate(zip(images, paths)):
        out[i] = resize_crop(img, size, where=p, spec=spec)
    return out
