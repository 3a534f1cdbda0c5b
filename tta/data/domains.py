"""Domains: one (corruption, severity) slice of a data set, loaded lazily as uint8 tensors.

Where the images come from is the ``source`` option: ``files`` (released CIFAR-10-C / CIFAR-100-C /
ImageNet-C in RobustBench layout), ``generate`` (the seeded corruption engine applied to the clean test
set, identical to ``tta make-c`` output for the same seed), or ``auto`` (files when present, else
generate, and the choice is recorded). ``clean`` is a domain of uncorrupted test images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError
from ..paths import data_root
from .datasets import C_FOLDERS, imagenet_c_files, load_cifar10, load_cifar_c, load_images

CLEAN = "clean"


def known_corruptions() -> List[str]:
    from .corruptions import ALL_CORRUPTIONS
    return [*ALL_CORRUPTIONS, CLEAN]


@dataclass
class Domain:
    corruption: str
    severity: int
    loader: Callable[[], Tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    source: str = "files"

    @property
    def name(self) -> str:
        return self.corruption if self.corruption == CLEAN else f"{self.corruption}-{self.severity}"

    def load(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images N×3×H×W, int64 labels)."""
        return self.loader()


class DomainSet:
    """Makes domains of one data set on demand and keeps those already built (streams revisit domains)."""

    def __init__(self, dataset: str = "cifar10", source: str = "auto", data_dir=None,
                 n_examples: Optional[int] = None, seed: int = 0, corruptions=(), severities=(5,),
                 imagenet_subset: bool = True):
        self.dataset, self.source, self.data_dir = dataset, source, data_dir
        self.imagenet_subset = imagenet_subset  # RobustBench's 5,000-image list (CoTTA) or all 50,000
        self.n_examples, self.seed = n_examples, seed
        self.corruptions, self.severities = list(corruptions), list(severities)
        self._cache: Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._clean: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def domains(self) -> List[Domain]:
        """The configured domains: every corruption at every severity, corruption-major."""
        return [self.make(c, s) for c in self.corruptions for s in self.severities]

    def make(self, corruption: str, severity: int) -> Domain:
        if corruption not in known_corruptions():
            raise ConfigError(f"unknown corruption {corruption!r}; allowed: {', '.join(known_corruptions())}")
        source = self.resolve_source(corruption)
        return Domain(corruption, severity, lambda: self._load(corruption, severity, source), source)

    def resolve_source(self, corruption: str) -> str:
        if corruption == CLEAN or self.source != "auto":
            return "clean" if corruption == CLEAN else self.source
        if self.dataset in C_FOLDERS:
            present = (data_root(self.data_dir) / C_FOLDERS[self.dataset] / f"{corruption}.npy").exists()
            return "files" if present else "generate"
        return "files"

    def clean(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._clean is None:
            if self.dataset != "cifar10":
                raise ConfigError(f"clean images / generation are available for cifar10 only, not {self.dataset!r} "
                                  "(no clean test set of it is shipped; use data.source=files)")
            x, y = load_cifar10(self.data_dir, "test")
            if self.n_examples is not None:
                x, y = x[:self.n_examples], y[:self.n_examples]
            self._clean = (x, y)
        return self._clean

    def _load(self, corruption: str, severity: int, source: str):
        key = (corruption, severity)
        if key not in self._cache:
            self._cache[key] = self._read(corruption, severity, source)
        return self._cache[key]

    def _read(self, corruption: str, severity: int, source: str):
        if source == "clean":
            return self.clean()
        if source == "generate":
            from .corruptions import corrupt_dataset
            x, y = self.clean()
            return corrupt_dataset(x, corruption, severity, seed=self.seed), y
        if self.dataset == "imagenet":
            paths, y = imagenet_c_files(corruption, severity, self.data_dir, self.imagenet_subset,
                                        self.n_examples)
            return load_images(paths), y
        return load_cifar_c(corruption, severity, self.dataset, self.data_dir, self.n_examples, download=True)

    def release(self, keep=()) -> None:
        """Drop cached domains not in ``keep`` (long streams visit each domain once)."""
        for key in list(self._cache):
            if key not in keep:
                del self._cache[key]
