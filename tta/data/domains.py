"""Domains: one slice of a data set (a corruption at a severity, or a natural domain), loaded lazily.

Where corrupted images come from is the ``source`` option: ``files`` (released CIFAR-10-C / CIFAR-100-C /
ImageNet-C in RobustBench layout), ``generate`` (the seeded corruption engine applied to the clean test
set - CIFAR-10/100 in memory, ImageNet validation images on the fly on the model's device - identical to
``tta make-c`` output for the same seed), or ``auto`` (files when present, else generate, and the choice
is recorded). ``clean`` is a domain of uncorrupted test images.

ImageNet domains are :class:`~tta.data.lazy.LazyImages`: only labels are held, pixels are read chunk by
chunk when the stream plays them. Natural-shift data sets (``tta.data.folders``: ImageNet-A/R/V2/Sketch,
ImageNet-D109, DomainNet-126, the CoOp sets) have domains instead of corruptions - one per DomainNet domain
(``domains``), else one named after the data set - played in a seeded random order by default
(``shuffle``), as the official runners' shuffled loaders do; corruption data sets keep their file order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError
from ..paths import data_root
from .datasets import C_FOLDERS, imagenet_c_files, imagenet_files, load_cifar_c, load_clean

CLEAN = "clean"
CORRUPTION_DATASETS = ("cifar10", "cifar100", "imagenet")


def known_corruptions() -> List[str]:
    from .corruptions import ALL_CORRUPTIONS
    return [*ALL_CORRUPTIONS, CLEAN]


def folder_datasets() -> List[str]:
    from .folders import available
    return available()


@dataclass
class Domain:
    corruption: str
    severity: Optional[int]
    loader: Callable[[], Tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    source: str = "files"

    @property
    def name(self) -> str:
        if self.corruption == CLEAN or self.severity is None:
            return self.corruption
        return f"{self.corruption}-{self.severity}"

    def load(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images N×3×H×W or LazyImages, int64 labels)."""
        return self.loader()


class DomainSet:
    """Makes domains of one data set on demand and keeps those already built (streams revisit domains)."""

    def __init__(self, dataset: str = "cifar10", source: str = "auto", data_dir=None,
                 n_examples: Optional[int] = None, seed: int = 0, corruptions=(), severities=(5,),
                 imagenet_subset: bool = True, *, workers: Optional[int] = None, decoder: str = "torchvision",
                 jpeg_roundtrip: bool = False, preprocess: Optional[str] = None, shuffle: Optional[bool] = None,
                 domains: Optional[List[str]] = None, sh_filter: bool = False, chunk: int = 500):
        self.dataset, self.source, self.data_dir = dataset, source, data_dir
        self.imagenet_subset = imagenet_subset  # RobustBench's 5,000-image list (CoTTA) or all 50,000
        self.n_examples, self.seed = n_examples, seed
        self.decoder, self.jpeg_roundtrip, self.preprocess = decoder, jpeg_roundtrip, preprocess
        self.sh_filter, self.chunk = sh_filter, chunk
        from .loader import resolve_workers
        self.workers = resolve_workers(workers)
        self.natural = dataset not in CORRUPTION_DATASETS
        if self.natural:
            from .folders import domains_of
            if dataset not in folder_datasets():
                raise ConfigError(f"data.dataset must be one of {', '.join((*CORRUPTION_DATASETS, *folder_datasets()))}"
                                  f", got {dataset!r}")
            if list(corruptions):
                raise ConfigError(f"{dataset} has domains, not corruptions: set data.corruptions=[] "
                                  f"(data.domains chooses among {list(domains_of(dataset)) or [dataset]})")
            allowed = list(domains_of(dataset)) or [dataset]
            chosen = list(domains) if domains else allowed
            bad = [d for d in chosen if d not in allowed]
            if bad:
                raise ConfigError(f"unknown domain(s) {bad} of {dataset}; allowed: {', '.join(allowed)}")
            self.corruptions, self.severities = chosen, [None]
        else:
            if domains:
                raise ConfigError(f"data.domains applies to multi-domain data sets (domainnet126, imagenet_d109), "
                                  f"not {dataset}")
            self.corruptions, self.severities = list(corruptions), list(severities)
        self.shuffle = self.natural if shuffle is None else bool(shuffle)
        self._cache: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._clean: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._claims: dict = {}  # single-severity CIFAR-C files -> the severity they were taken to hold

    @property
    def domains(self) -> List[Domain]:
        """The configured domains: every corruption at every severity, corruption-major."""
        return [self.make(c, s) for c in self.corruptions for s in self.severities]

    def make(self, corruption: str, severity) -> Domain:
        if self.natural:
            if corruption not in self.corruptions or severity is not None:
                raise ConfigError(f"{self.dataset} has no domain {corruption!r} at severity {severity!r} "
                                  f"(settings that walk severities, such as gradual, need a corruption data set)")
            return Domain(corruption, None, lambda: self._load(corruption, None, "files"), "files")
        if corruption not in known_corruptions():
            raise ConfigError(f"unknown corruption {corruption!r}; allowed: {', '.join(known_corruptions())}")
        source = self.resolve_source(corruption, severity)
        return Domain(corruption, severity, lambda: self._load(corruption, severity, source), source)

    def resolve_source(self, corruption: str, severity: int = 5) -> str:
        if corruption == CLEAN or self.source != "auto":
            return "clean" if corruption == CLEAN else self.source
        root = data_root(self.data_dir)
        if self.dataset in C_FOLDERS:
            from .cifar_c import image_file
            return "files" if image_file(root / C_FOLDERS[self.dataset], corruption, severity) else "generate"
        return "files" if (root / "ImageNet-C" / corruption / str(severity)).is_dir() else "generate"

    # ------------------------------------------------------------------------------- clean images
    def manifest(self, name: str, domain: Optional[str] = None):
        from .folders import load_manifest
        return load_manifest(name, self.data_dir, domain=domain, sh_filter=self.sh_filter)

    def _lazy(self, source):
        from .lazy import LazyImages
        return LazyImages.of(source, self.workers, self.chunk)

    def clean(self):
        """The clean test images (CIFAR in memory; ImageNet validation images lazily, Resize 256 + crop 224)."""
        if self._clean is None:
            if self.dataset == "imagenet":
                from .lazy import FileSource
                paths, y = self.imagenet_val_files()
                x = self._lazy(FileSource(paths, self.preprocess or "resize256", self.decoder))
            else:
                x, y = load_clean(self.dataset, self.data_dir)
            if self.n_examples is not None:
                x, y = x[:self.n_examples], y[:self.n_examples]
            self._clean = (x, y)
        return self._clean

    def imagenet_val_files(self):
        """ImageNet validation paths and labels: RobustBench's 5,000 in list order, or all 50,000 sorted."""
        paths, labels = imagenet_files("val", self.data_dir)
        if not self.imagenet_subset:
            return paths, labels
        from .._compat import imagenet_5000_ids
        index = {f"{p.parent.name}/{p.name}": k for k, p in enumerate(paths)}
        ids = imagenet_5000_ids(as_list=True)
        missing = [i for i in ids if i not in index]
        if missing:
            raise ConfigError(f"{len(missing)} of RobustBench's 5,000 ImageNet validation images are missing from "
                              f"{paths[0].parent.parent}, e.g. {missing[0]}; use data.imagenet_subset=all or add them")
        chosen = [index[i] for i in ids]
        return [paths[k] for k in chosen], labels[chosen]

    # ------------------------------------------------------------------------------- domains
    def _load(self, corruption: str, severity, source: str):
        key = (corruption, severity)
        if key not in self._cache:
            self._cache[key] = self._read(corruption, severity, source)
        return self._cache[key]

    def _read(self, corruption: str, severity, source: str):
        if self.natural:
            return self._read_folder(corruption)
        if source == "clean":
            return self.clean()
        if source == "generate":
            x, y = self.clean()
            if self.dataset == "imagenet":
                from .lazy import CorruptedSource, LazyImages
                base = x.sources[0]
                gen = CorruptedSource(base, corruption, severity, self.seed, self.jpeg_roundtrip)
                return LazyImages([gen], x.src, x.idx, self.workers, self.chunk), y
            from .corruptions import corrupt_dataset
            return corrupt_dataset(x, corruption, severity, seed=self.seed), y
        if self.dataset == "imagenet":
            from .lazy import FileSource
            paths, y = imagenet_c_files(corruption, severity, self.data_dir, self.imagenet_subset, self.n_examples)
            return self._lazy(FileSource(paths, self.preprocess or "none", self.decoder)), y
        return load_cifar_c(corruption, severity, self.dataset, self.data_dir, self.n_examples, download=True,
                            claims=self._claims)

    def _read_folder(self, domain: str):
        from .lazy import FileSource
        m = self.manifest(self.dataset, None if domain == self.dataset else domain)
        x, y = self._lazy(FileSource(m.paths, self.preprocess or m.preprocess, self.decoder)), m.labels
        if self.shuffle:
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
            x, y = x[order], y[order]
        if self.n_examples is not None:
            x, y = x[:self.n_examples], y[:self.n_examples]
        return x, y

    def logit_indices(self) -> Optional[List[int]]:
        """ImageNet-1k outputs this data set is scored on (``logits[:, indices]``), or None."""
        from .classes import logit_indices
        if self.dataset in ("imagenet_a", "imagenet_r", "imagenet_d109"):
            return logit_indices(self.dataset)
        return None

    def release(self, keep=()) -> None:
        """Drop cached domains not in ``keep`` (long streams visit each domain once)."""
        for key in list(self._cache):
            if key not in keep:
                del self._cache[key]
