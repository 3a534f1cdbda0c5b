"""The ten fine-grained data sets of the CoOp protocol, read from their split files (METHODS-VLM V.16).

Each data set is accepted in the layouts the CLIP test-time adaptation repositories use (folders relative
to the data root; the first that exists wins):

* CoOp's ``DATASETS.md`` layout (TDA, BoostAdapter, DPE): e.g. ``caltech-101/101_ObjectCategories`` with
  ``caltech-101/split_zhou_Caltech101.json``;
* the TPT family's layout: e.g. ``Caltech101/`` with the JSON paths resolved directly inside it and the
  split file in the folder or in ``<root>/data_splits/`` (TPT keeps them in its repository);
* lower-case variants (ZERO, torchvision-style names).

The split file's ``"test"`` list holds ``[relative image path, label, class name]``; labels and class names
(ordered by label) come from it. FGVC-Aircraft has no JSON: ``variants.txt`` names the 100 classes (label =
line number) and ``images_variant_test.txt`` lists ``<image id> <variant>`` for ``images/<id>.jpg``.
A missing folder, split file or listed image is one error naming them and the layouts expected.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from ..errors import ConfigError, MissingFileError

# name: (split file, [(dataset folder, image folder inside it), ...])
LAYOUTS = {
    "caltech101": ("split_zhou_Caltech101.json", [("caltech-101", "101_ObjectCategories"), ("Caltech101", ""),
                                                  ("caltech101", "101_ObjectCategories"), ("caltech-101", "images")]),
    "dtd": ("split_zhou_DescribableTextures.json", [("dtd", "images"), ("DTD", "images"), ("dtd/dtd", "images")]),
    "eurosat": ("split_zhou_EuroSAT.json", [("eurosat", "2750"), ("eurosat", ""), ("eurosat", "images")]),
    "fgvc_aircraft": ("images_variant_test.txt", [("fgvc_aircraft", ""), ("fgvc-aircraft-2013b/data", "")]),
    "food101": ("split_zhou_Food101.json", [("food-101", "images"), ("Food101", "images"), ("food101", "images")]),
    "flowers102": ("split_zhou_OxfordFlowers.json", [("oxford_flowers", "jpg"), ("Flower102", "jpg"),
                                                    ("flower102", "jpg"), ("flowers-102", "jpg")]),
    "oxford_pets": ("split_zhou_OxfordPets.json", [("oxford_pets", "images"), ("OxfordPets", ""),
                                                  ("oxford-iiit-pet", "images")]),
    "stanford_cars": ("split_zhou_StanfordCars.json", [("stanford_cars", ""), ("stanfordcars", ""),
                                                      ("StanfordCars", "")]),
    "sun397": ("split_zhou_SUN397.json", [("sun397", "SUN397"), ("SUN397", ""), ("sun397", "images"), ("sun397", "")]),
    "ucf101": ("split_zhou_UCF101.json", [("ucf101", "UCF-101-midframes"), ("UCF101", ""), ("ucf101", "images")]),
}


def _layouts_text(name: str) -> str:
    split, options = LAYOUTS[name]
    return "; ".join(f"{d}/{i + '/' if i else ''}<images> with {split} in {d}/" for d, i in options)


def _find(name: str, root: Path) -> Tuple[Path, Path]:
    """(dataset folder, image folder) of the first layout present."""
    for folder, images in LAYOUTS[name][1]:
        if (root / folder / images).is_dir():
            return root / folder, root / folder / images
    raise MissingFileError(f"data set {name} not found under {root}: expected {_layouts_text(name)} "
                           "(set TTA_DATA_DIR or data.data_dir to choose the root)")


def _split_file(name: str, root: Path, folder: Path) -> Path:
    split = LAYOUTS[name][0]
    candidates = [folder / split, root / "data_splits" / split, root / "splits" / split]
    for c in candidates:
        if c.is_file():
            return c
    raise MissingFileError(f"{name} split file {split} not found: looked in "
                           f"{', '.join(str(c.parent) for c in candidates)}")


def read_split(path: Path, image_root: Path, split: str = "test") -> Tuple[List[Path], torch.Tensor, List[str]]:
    """Paths, labels and class names (by label) of one split of a ``split_zhou_*.json`` file."""
    try:
        entries = json.loads(path.read_text())[split]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a split file with a {split!r} list of [path, label, class name] "
                          f"({type(e).__name__}: {e})") from None
    names = {}
    paths, labels = [], []
    for k, item in enumerate(entries):
        if not (isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[1], int)):
            raise ConfigError(f"{path} entry {k} of {split!r} is {item!r}; expected [relative path, label, class name]")
        rel, label, cname = item
        if names.setdefault(label, cname) != cname:
            raise ConfigError(f"{path}: label {label} is named both {names[label]!r} and {cname!r}")
        paths.append(image_root / rel)
        labels.append(label)
    if not paths:
        raise ConfigError(f"{path} has an empty {split!r} split")
    n = max(names) + 1
    if sorted(names) != list(range(n)):
        missing = sorted(set(range(n)) - set(names))[:5]
        raise ConfigError(f"{path}: the {split!r} labels are not 0..{n - 1} (missing {missing})")
    return paths, torch.tensor(labels, dtype=torch.int64), [names[k] for k in range(n)]


def read_aircraft(folder: Path, split: str = "test") -> Tuple[List[Path], torch.Tensor, List[str]]:
    """FGVC-Aircraft: ``variants.txt`` (class names, label = line) and ``images_variant_<split>.txt``."""
    variants, listing = folder / "variants.txt", folder / f"images_variant_{split}.txt"
    for f in (variants, listing):
        if not f.is_file():
            raise MissingFileError(f"fgvc_aircraft file {f.name} not found in {folder} (expected variants.txt, "
                                   f"images_variant_{split}.txt and images/<id>.jpg)")
    classnames = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classnames)}
    paths, labels = [], []
    for k, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in index:
            raise ConfigError(f"{listing} line {k}: variant {variant!r} is not in {variants}")
        paths.append(folder / "images" / f"{image_id}.jpg")
        labels.append(index[variant])
    return paths, torch.tensor(labels, dtype=torch.int64), classnames


def manifest(name: str, root: Path, split: str = "test", **_):
    from .folders import Manifest, check_exist
    folder, images = _find(name, root)
    if name == "fgvc_aircraft":
        paths, labels, classnames = read_aircraft(folder, split)
        listed_in: Sequence = folder / f"images_variant_{split}.txt"
    else:
        listed_in = _split_file(name, root, folder)
        paths, labels, classnames = read_split(listed_in, images, split)
    check_exist(paths, listed_in)
    return Manifest(name, folder, paths, labels, classnames, None, "clip224")
