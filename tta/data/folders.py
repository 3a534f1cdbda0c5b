"""Image-folder data sets in their usual layouts: ``load_manifest(name, root) -> Manifest``.

A manifest is what a stream needs to read a data set lazily: image paths, int64 labels, class names in
label order, and - for ImageNet variants scored by a 1,000-class classifier - the ImageNet output indices
the labels correspond to (``logit_indices``: apply ``logits[:, logit_indices]``). It is built from
whichever known layout is present under ``root`` (``data_root(data_dir)``, i.e. ``TTA_DATA_DIR``); a
missing folder, split file or listed image is one :class:`~tta.errors.MissingFileError` naming what was
looked for and the layouts expected.

Data sets (``name``; folders tried in order, relative to ``root``):

* ``imagenet_val`` (ImageNet validation): ``imagenet/val``, ``ImageNet/val``, ``imagenet/images/val``,
  ``imagenet2012/val``
  - one folder per WordNet id; label = ImageNet-1k index of the id.
* ``imagenet_a`` (200 classes): ``imagenet-a``, ``imagenet-adversarial/imagenet-a``, ``ImageNet-A``;
  ``imagenet_r`` (200): ``imagenet-r``, ``imagenet-rendition/imagenet-r``, ``ImageNet-R``
  - label = rank of the WordNet id among the data set's 200 (sorted), ``logit_indices`` = their ImageNet
  indices (``tta.data.classes``).
* ``imagenet_sketch``: ``ImageNet-Sketch/sketch``, ``ImageNet-Sketch``, ``imagenet-sketch/images``,
  ``imagenet-sketch``; ``imagenet_v2`` (matched frequency): ``imagenetv2-matched-frequency-format-val``
  (also under ``imagenetv2/`` or ``imagenet-v2/``) - folders ``0..999``; label = ImageNet index, via the
  string-sorted folder order (``ImageFolder`` labels) mapped back as the official code does.
* ``imagenet_d109`` and ``domainnet126``: list files ``<domain>_list.txt`` (``<relative path> <label>``)
  in ``imagenet-d109/`` resp. ``domainnet126/`` (or a ``*_lists`` folder inside), images relative to that
  folder. ImageNet-D109 labels are 0..108 and ``logit_indices`` maps them to ImageNet outputs;
  DomainNet-126 models have 126 outputs of their own.
* the ten CoOp fine-grained sets (``tta.data.coop``): ``caltech101``, ``dtd``, ``eurosat``,
  ``fgvc_aircraft``, ``food101``, ``flowers102``, ``oxford_pets``, ``stanford_cars``, ``sun397``,
  ``ucf101`` with their ``split_zhou_*.json`` test split (Aircraft: ``variants.txt`` and
  ``images_variant_test.txt``); labels and class names from the split file.

Class names of folder sets are the folder names (WordNet ids for ImageNet variants): the data layer does
not know CLIP's prompts; a CLIP config names its class list itself (``model.options.classes``).

``sh_filter=True`` reproduces the TDA family's file lister, which silently drops every file or folder whose
name contains ``"sh"`` (METHODS-VLM V.1): off by default, for reproducing their numbers only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, MissingFileError
from ..paths import data_root
from . import classes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class Manifest:
    name: str
    root: Path
    paths: List[Path]
    labels: torch.Tensor
    classnames: List[str]
    logit_indices: Optional[List[int]] = None
    preprocess: str = "resize256"  # the default preprocessing of this data set (tta.data.decode.PREPROCESS)
    domains: Tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.paths)


def _find(root: Path, candidates: Sequence[str], name: str, layout: str) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise MissingFileError(f"data set {name} not found under {root}: expected one of the folders "
                           f"{', '.join(candidates)} holding {layout} (set TTA_DATA_DIR or data.data_dir to "
                           "choose the root)")


def _listdir(folder: Path, sh_filter: bool) -> List[str]:
    """Sorted names in ``folder`` without hidden ones (and without any containing "sh" when asked)."""
    names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith("."))
    return [n for n in names if "sh" not in n] if sh_filter else names


def _class_folders(folder: Path, sh_filter: bool) -> Tuple[List[str], List[Path], List[str]]:
    """(class folder names, image paths, the class folder of each path) of an ImageFolder layout."""
    names = [n for n in _listdir(folder, sh_filter) if (folder / n).is_dir()]
    paths, owners = [], []
    for n in names:
        for f in _listdir(folder / n, sh_filter):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                paths.append(folder / n / f)
                owners.append(n)
    return names, paths, owners


_IMAGENET_FOLDERS = {
    "imagenet_val": ("imagenet/val", "ImageNet/val", "imagenet/images/val", "imagenet2012/val"),
    "imagenet_a": ("imagenet-a", "imagenet-adversarial/imagenet-a", "ImageNet-A"),
    "imagenet_r": ("imagenet-r", "imagenet-rendition/imagenet-r", "ImageNet-R"),
    "imagenet_sketch": ("ImageNet-Sketch/sketch", "ImageNet-Sketch", "imagenet-sketch/images", "imagenet-sketch"),
    "imagenet_v2": ("imagenetv2-matched-frequency-format-val", "imagenetv2/imagenetv2-matched-frequency-format-val",
                    "imagenet-v2/imagenetv2-matched-frequency-format-val"),
}


def _imagenet_variant(name: str, root: Path, sh_filter: bool = False, **_) -> Manifest:
    v2 = name == "imagenet_v2"
    folder = _find(root, _IMAGENET_FOLDERS[name], name,
                   "one folder per class named 0..999" if v2 else "one folder per WordNet id (n01440764, ...)")
    names, paths, owners = _class_folders(folder, sh_filter)
    if not paths:
        raise MissingFileError(f"no images found in the class folders of {folder} ({name})")
    indices = classes.logit_indices(name)
    if v2:
        bad = [n for n in names if not (n.isdigit() and 0 <= int(n) < 1000)]
        if bad:
            raise ConfigError(f"{folder} holds folders {bad[:5]} that are not ImageNet-V2 class folders 0..999")
        order = classes.v2_folder_order()  # ImageFolder label (string order) -> ImageNet index
        rank = {str(c): k for k, c in enumerate(order)}
        to_label = {n: order[rank[n]] for n in names}
        classnames = [str(i) for i in range(1000)]
    else:
        known = classes.wnid_to_index()
        allowed = sorted(known) if indices is None else [classes.IMAGENET_WNIDS[i] for i in indices]
        position = {w: k for k, w in enumerate(allowed)}
        bad = [n for n in names if n not in position]
        if bad:
            raise ConfigError(f"{folder} holds folders {bad[:5]} that are not {name} classes (WordNet ids of "
                              f"{'ImageNet-1k' if indices is None else 'its ' + str(len(allowed)) + ' classes'})")
        to_label = {n: position[n] for n in names}
        classnames = allowed
    labels = torch.tensor([to_label[o] for o in owners], dtype=torch.int64)
    return Manifest(name, folder, paths, labels, classnames, indices)


def read_list_file(path: Path, image_root: Path) -> Tuple[List[Path], torch.Tensor]:
    """``<relative path> <label>`` per line (DomainNet / ImageNet-D list files)."""
    paths, labels = [], []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ConfigError(f"{path} line {k} is {line!r}; expected '<relative image path> <integer label>'")
        paths.append(image_root / parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise ConfigError(f"{path} lists no images")
    return paths, torch.tensor(labels, dtype=torch.int64)


_LIST_SETS = {
    # name: (folders, list sub-folders, domains, classes, logit indices, default preprocessing)
    "imagenet_d109": (("imagenet-d109", "imagenet_d109"), ("", "imagenet_d109_lists", "lists"),
                      ("clipart", "infograph", "painting", "real", "sketch"), 109, "imagenet_d109", "resize256"),
    "domainnet126": (("domainnet126", "DomainNet126", "domainnet"), ("", "domainnet126_lists", "lists"),
                     ("clipart", "painting", "real", "sketch"), 126, None, "square256"),
}


def _list_set(name: str, root: Path, domain: Optional[str] = None, **_) -> Manifest:
    folders, subs, domains, n_classes, mask, preprocess = _LIST_SETS[name]
    if domain is None:
        raise ConfigError(f"{name} needs a domain, one of {', '.join(domains)} (data.domains)")
    folder = _find(root, folders, name, "<domain>_list.txt files and the images they list")
    candidates = [folder / s / f"{domain}_list.txt" for s in subs]
    lists = [c for c in candidates if c.is_file()]
    if not lists:
        raise MissingFileError(f"{name} list file for domain {domain!r} not found: looked for "
                               f"{', '.join(str(c) for c in candidates)} (lines '<path relative to {folder}> <label>')")
    paths, labels = read_list_file(lists[0], folder)
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ConfigError(f"{lists[0]} holds labels in [{int(labels.min())}, {int(labels.max())}]; {name} has "
                          f"{n_classes} classes (0..{n_classes - 1})")
    check_exist(paths, lists[0])
    names = {}
    for p, y in zip(paths, labels.tolist()):
        names.setdefault(y, p.parent.name)
    classnames = [names.get(k, str(k)) for k in range(n_classes)]
    indices = classes.logit_indices(mask) if mask else None
    return Manifest(name, folder, paths, labels, classnames, indices, preprocess, domains)


def check_exist(paths: Sequence[Path], listed_in) -> None:
    """Every listed image exists, else one error naming the first missing ones (before any image is read)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingFileError(f"{len(missing)} of the {len(paths)} images listed in {listed_in} are missing, "
                               f"e.g. {', '.join(str(p) for p in missing[:3])}")


def _registry() -> Dict[str, Callable]:
    from . import coop
    reg: Dict[str, Callable] = {n: (lambda r, _n=n, **kw: _imagenet_variant(_n, r, **kw)) for n in _IMAGENET_FOLDERS}
    reg.update({n: (lambda r, _n=n, **kw: _list_set(_n, r, **kw)) for n in _LIST_SETS})
    reg.update({n: (lambda r, _n=n, **kw: coop.manifest(_n, r, **kw)) for n in coop.LAYOUTS})
    return reg


def available() -> List[str]:
    from . import coop
    return [*_IMAGENET_FOLDERS, *_LIST_SETS, *coop.LAYOUTS]


def domains_of(name: str) -> Tuple[str, ...]:
    """The domains of a multi-domain list data set (empty for single-domain sets)."""
    return _LIST_SETS[name][2] if name in _LIST_SETS else ()


def load_manifest(name: str, root=None, *, domain: Optional[str] = None, sh_filter: bool = False,
                  split: str = "test") -> Manifest:
    """The manifest of data set ``name`` under ``root`` (default ``data_root()``); see the module docstring."""
    reg = _registry()
    if name not in reg:
        raise ConfigError(f"unknown folder data set {name!r}; known: {', '.join(available())}")
    return reg[name](data_root(root), domain=domain, sh_filter=sh_filter, split=split)
