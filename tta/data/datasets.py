"""Data sets as tensors: images ``uint8 (N, 3, H, W)``, labels ``int64 (N,)``.

Images stay uint8 until a batch is taken (``to_float``), so a 15-domain CIFAR stream holds 460 MB,
not 1.8 GB. Files are looked for under ``data_root(data_dir)`` (``TTA_DATA_DIR``):

* clean CIFAR-10: ``cifar10_test.npz`` / ``cifar10_train*.npz`` (``x`` uint8 NHWC, ``y``) or the
  torchvision folder ``cifar-10-batches-py``; clean CIFAR-100: ``cifar100_test.npz`` or ``cifar-100-python``;
* CIFAR-10-C / CIFAR-100-C in RobustBench layout: ``<root>/CIFAR-10-C/<corruption>.npy`` (50,000
  images, severity-major, or 10,000 images of one severity) and ``labels.npy``, checked by
  :mod:`tta.data.cifar_c`;
* ImageNet-C folders: ``<root>/ImageNet-C/<corruption>/<severity>/<wnid>/<file>.JPEG``, optionally
  restricted to RobustBench's 5,000-image list (listing only: the images are read by streams chunk by
  chunk, :mod:`tta.data.lazy`).

Other image-folder data sets (ImageNet-A/R/V2/Sketch/D109, DomainNet-126, the CoOp sets) are listed by
:mod:`tta.data.folders`.

When a file is missing and ``download=True``, robustbench's own downloader is tried (needs a network);
otherwise, and when that fails, one :class:`~tta.errors.MissingFileError` names the files and the folder.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError, MissingFileError
from ..paths import data_root

C_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1]."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _nhwc_to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def read_npz(path) -> Tuple[np.ndarray, np.ndarray]:
    """The arrays of an ``.npz`` holding ``x`` uint8 (N, H, W, 3) and ``y`` labels, checked."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image set not found: {path}")
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise ConfigError(f"{path} must hold arrays 'x' (uint8 N,H,W,3) and 'y'; it has {list(f.keys())}")
        x, y = f["x"], f["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ConfigError(f"{path}: 'x' must be uint8 of shape (N, H, W, 3), got {x.dtype} {x.shape}")
    return x, y


def load_npz(path) -> Tuple[torch.Tensor, torch.Tensor]:
    """``read_npz`` as tensors: uint8 NCHW images and int64 labels."""
    x, y = read_npz(path)
    return _nhwc_to_tensor(x), torch.from_numpy(y.astype(np.int64))


def load_cifar10(data_dir=None, split: str = "test") -> Tuple[torch.Tensor, torch.Tensor]:
    """Clean CIFAR-10 (uint8 NCHW, labels). ``split`` is ``test`` or ``train`` (the ``train_10k`` subset
    when only that is present)."""
    root = data_root(data_dir)
    if split not in ("test", "train"):
        raise ConfigError(f"split must be 'test' or 'train', got {split!r}")
    names = ["cifar10_test.npz"] if split == "test" else ["cifar10_train.npz", "cifar10_train_10k.npz"]
    for name in names:
        if (root / name).exists():
            return load_npz(root / name)
    folder = root / "cifar-10-batches-py"
    batches = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    if all((folder / b).exists() for b in batches):
        xs, ys = [], []
        for b in batches:
            with open(folder / b, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(d[b"data"].reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    raise MissingFileError(f"clean CIFAR-10 ({split}) not found: place {' or '.join(names)} "
                           f"(x uint8 N,32,32,3 and y) or the torchvision folder cifar-10-batches-py in {root} "
                           "(set TTA_DATA_DIR or data_dir to choose the folder)")


def load_cifar100(data_dir=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clean CIFAR-100 test set (uint8 NCHW, fine labels): ``cifar100_test.npz`` (``x`` uint8 N,32,32,3 and
    ``y``) or the torchvision folder ``cifar-100-python/test``. Needed only to generate CIFAR-100-C."""
    root = data_root(data_dir)
    if (root / "cifar100_test.npz").exists():
        x, y = load_npz(root / "cifar100_test.npz")
        if x.shape[1:] != (3, 32, 32) or len(y) != len(x) or (len(y) and (int(y.min()) < 0 or int(y.max()) > 99)):
            raise ConfigError(f"{root / 'cifar100_test.npz'} holds x {tuple(x.shape)} and y {tuple(y.shape)} with "
                              f"labels in [{int(y.min())}, {int(y.max())}]; expected 32x32 RGB images and as many "
                              "labels in [0, 99]")
        return x, y
    path = root / "cifar-100-python" / "test"
    if path.exists():
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return (torch.from_numpy(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)),
                torch.from_numpy(np.asarray(d[b"fine_labels"], dtype=np.int64)))
    raise MissingFileError(f"clean CIFAR-100 (test) not found: place cifar100_test.npz (x uint8 N,32,32,3 and y) "
                           f"or the torchvision folder cifar-100-python in {root} "
                           "(set TTA_DATA_DIR or data_dir to choose the folder)")


def load_clean(dataset: str, data_dir=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The clean test set a CIFAR corruption data set is generated from."""
    if dataset == "cifar10":
        return load_cifar10(data_dir, "test")
    if dataset == "cifar100":
        return load_cifar100(data_dir)
    raise ConfigError(f"no clean test set of {dataset!r} in memory (cifar10 and cifar100 only)")


def load_cifar_c(corruption: str, severity: int, dataset: str = "cifar10", data_dir=None,
                 n_examples: Optional[int] = None, download: bool = False,
                 claims: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One (corruption, severity) slice of CIFAR-10-C / CIFAR-100-C in RobustBench layout, checked
    (row counts, dtype, shape, label file; single-severity files: see :mod:`tta.data.cifar_c`)."""
    from . import cifar_c
    if dataset not in C_FOLDERS:
        raise ConfigError(f"dataset must be one of {sorted(C_FOLDERS)}, got {dataset!r}")
    folder = data_root(data_dir) / C_FOLDERS[dataset]
    present = cifar_c.image_file(folder, corruption, severity) is not None and (folder / "labels.npy").is_file()
    if not present and download:
        _robustbench_download(dataset, corruption, data_root(data_dir))
    return cifar_c.read(corruption, severity, dataset, data_dir, n_examples, claims)


def _robustbench_download(dataset: str, corruption: str, root: Path) -> None:
    """Let robustbench fetch the released files (only where a network exists)."""
    try:
        from .._compat import import_robustbench
        import_robustbench()
        from robustbench.data import load_cifar10c, load_cifar100c
        loader = load_cifar10c if dataset == "cifar10" else load_cifar100c
        loader(n_examples=1, severity=5, data_dir=str(root), corruptions=[corruption])
    except Exception:  # offline: the caller raises the one clear MissingFileError
        pass


def imagenet_val_files(data_dir=None) -> List[Path]:
    """Clean ImageNet validation images in ImageFolder layout, ``<root>/imagenet/val/<wnid>/*.JPEG``."""
    return imagenet_files("val", data_dir)[0]


def imagenet_files(split: str = "val", data_dir=None) -> Tuple[List[Path], torch.Tensor]:
    """Clean ImageNet images of ``split`` (``train`` or ``val``) in ImageFolder layout,
    ``<root>/imagenet/<split>/<wnid>/*.JPEG``, and their labels (index of the wnid in sorted order)."""
    root = data_root(data_dir) / "imagenet" / split
    paths = sorted(root.glob("*/*.JPEG")) if root.is_dir() else []
    if not paths:
        raise MissingFileError(f"clean ImageNet {split} images not found: place them as {root}/<wnid>/*.JPEG "
                               "(set TTA_DATA_DIR or data_dir to choose the folder)")
    index = wnid_index(sorted({p.parent.name for p in paths}))
    return paths, torch.tensor([index[p.parent.name] for p in paths], dtype=torch.int64)


def wnid_index(folders: List[str]) -> dict:
    """Label of each class folder: its ImageNet-1k index when every folder is an ImageNet WordNet id (so a
    folder holding only some classes keeps the model's class numbers), else its rank in sorted order."""
    from .classes import IMAGENET_WNIDS
    known = {w: i for i, w in enumerate(IMAGENET_WNIDS)}
    if folders and all(f in known for f in folders):
        return {f: known[f] for f in folders}
    return {f: i for i, f in enumerate(sorted(folders))}


def imagenet_c_files(corruption: str, severity: int, data_dir=None, subset_5000: bool = True,
                     n_examples: Optional[int] = None) -> Tuple[List[Path], torch.Tensor]:
    """Paths and labels of one ImageNet-C (corruption, severity) folder; labels are sorted-wnid indices.

    With ``subset_5000`` the RobustBench list of 5,000 images is used, in list order (CoTTA protocol).
    """
    root = data_root(data_dir) / "ImageNet-C" / corruption / str(severity)
    if not root.is_dir():
        raise MissingFileError(f"ImageNet-C folder {root} not found: place the released ImageNet-C "
                               "(<corruption>/<severity>/<wnid>/*.JPEG) under <data_dir>/ImageNet-C "
                               "(set TTA_DATA_DIR or data_dir to choose the folder)")
    index = wnid_index(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if subset_5000:
        from .._compat import imagenet_5000_ids
        rel = [line.split()[0] for line in imagenet_5000_ids() if line.strip()]
        paths = [root / r for r in rel]
    else:
        paths = sorted(root.glob("*/*.JPEG"))
    if n_examples is not None:
        paths = paths[:n_examples]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise MissingFileError(f"{len(missing)} ImageNet-C image(s) missing under {root}, e.g. {missing[0]}")
    labels = torch.tensor([index[p.parent.name] for p in paths], dtype=torch.int64)
    return paths, labels


def load_images(paths: List[Path], size: int = 224, resize: Optional[int] = None,
                decoder: str = "pil") -> torch.Tensor:
    """Decode image files into uint8 NCHW: optionally resize the shorter side to ``resize`` (bilinear, as
    torchvision's Resize on PIL images), then take the central crop of ``size`` with torchvision's offsets
    (ImageNet-C files are already 224 px). ``decoder``: ``pil`` (the reference's) or ``torchvision``
    (faster; see :mod:`tta.data.decode` for the measured difference). Whole sets only: streams read files
    chunk by chunk instead (:mod:`tta.data.lazy`)."""
    from .decode import load_files
    return load_files(paths, size, resize, decoder)
