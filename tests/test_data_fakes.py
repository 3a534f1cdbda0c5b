"""Data generated for the data-path tests (no tests here): JPEG trees in the usual layouts, tiny and seeded.

Images are smooth colour blocks plus noise, so JPEG behaves as on photographs (no huge flat areas) while
the files stay a few kB.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

import numpy as np
from PIL import Image

from tta.data.classes import IMAGENET_WNIDS, logit_indices


def picture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((h // 16 + 1, w // 16 + 1, 3))
    a = np.kron(base, np.ones((16, 16, 1)))[:h, :w] * 200 + rng.random((h, w, 3)) * 55
    return a.astype(np.uint8)


def save(path: Path, h: int, w: int, seed: int, quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(picture(h, w, seed)).save(path, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return path


def imagenet_val(root: Path, classes: int = 3, per_class: int = 4, side: int = 256) -> List[Path]:
    """``root/imagenet/val/<wnid>/ILSVRC2012_val_*.JPEG`` for the first ``classes`` ImageNet classes."""
    paths = []
    for c, wnid in enumerate(IMAGENET_WNIDS[:classes]):
        for j in range(per_class):
            name = f"ILSVRC2012_val_{c * 1000 + j:08d}.JPEG"
            paths.append(save(root / "imagenet" / "val" / wnid / name, side + 8 * j, side + 24 * c, 100 * c + j))
    return paths


def wnid_tree(folder: Path, wnids: Sequence[str], per_class: int = 2, side: int = 64, names=None) -> None:
    for c, wnid in enumerate(wnids):
        for j in range(per_class):
            name = names[j] if names else f"img_{j}.jpg"
            save(folder / wnid / name, side, side + 8 * j, 7 * c + j)


def subset_wnids(name: str, k: int) -> List[str]:
    return [IMAGENET_WNIDS[i] for i in logit_indices(name)[:k]]


def coop_split(path: Path, entries) -> None:
    """A ``split_zhou_*.json`` with train/val copies of the test entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": entries, "val": entries, "test": entries}))
