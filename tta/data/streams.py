"""Streams: the order in which test batches reach the adapter (METHODS.md section 2).

A protocol is a function ``fn(domains: DomainSet, *, batch_size, ...) -> Stream`` registered with
``@protocol("name")``. A :class:`Stream` is a list of segments; a segment is a tensor block cut into
batches in order, with a flag saying whether the adapter is reset before it. Images stay uint8 until a
batch is taken, and every sample carries the index of its domain, so mixed streams still report error
per domain. Streams know nothing about methods.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import ConfigError
from .datasets import to_float
from .domains import DomainSet

_PROTOCOLS: Dict[str, Callable] = {}


def protocol(name: str):
    def deco(fn):
        _PROTOCOLS[name] = fn
        return fn
    return deco


@dataclass
class StreamBatch:
    x: torch.Tensor  # float32 (B, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (B,)
    domain: torch.Tensor  # int64 (B,): index into Stream.domain_names
    reset: bool  # reset the adapter before this batch
    round: int = 0


@dataclass
class Segment:
    """A block of images handed out in order; ``load`` returns (uint8 images, labels, domain ids)."""
    load: Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(repr=False)
    reset: bool = False
    round: int = 0
    label: str = ""


class Stream:
    def __init__(self, segments: List[Segment], domain_names: List[str], batch_size: int):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.segments, self.domain_names, self.batch_size = segments, list(domain_names), batch_size

    def __iter__(self) -> Iterator[StreamBatch]:
        for seg in self.segments:
            yield from self.batches(seg)

    def batches(self, seg: Segment) -> Iterator[StreamBatch]:
        x, y, d = seg.load()
        for i in range(0, len(x), self.batch_size):
            j = i + self.batch_size
            yield StreamBatch(to_float(x[i:j]), y[i:j], d[i:j], seg.reset and i == 0, seg.round)

    @property
    def rounds(self) -> int:
        return max((s.round for s in self.segments), default=0) + 1


def _domain_segment(domain, index: int, reset: bool, round_: int = 0) -> Segment:
    def load():
        x, y = domain.load()
        return x, y, torch.full((len(x),), index, dtype=torch.long)
    return Segment(load, reset, round_, domain.name)


@protocol("continual")
def continual(domains: DomainSet, *, batch_size: int = 200) -> Stream:
    """The domains one after the other, never resetting (CoTTA's protocol)."""
    ds = domains.domains
    return Stream([_domain_segment(d, i, i == 0) for i, d in enumerate(ds)], [d.name for d in ds], batch_size)


@protocol("reset_each_shift")
def reset_each_shift(domains: DomainSet, *, batch_size: int = 200) -> Stream:
    """Each domain starts from the source model (TENT, EATA, SAR, DeYO protocols)."""
    ds = domains.domains
    return Stream([_domain_segment(d, i, True) for i, d in enumerate(ds)], [d.name for d in ds], batch_size)


def available() -> List[str]:
    return sorted(_PROTOCOLS)


def get(name: str) -> Callable:
    if name not in _PROTOCOLS:
        raise ConfigError(f"unknown setting {name!r}; available: {', '.join(available())}")
    return _PROTOCOLS[name]


def check_options(name: str, options: dict) -> None:
    params = list(inspect.signature(get(name)).parameters)[1:]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(f"unknown stream option(s) {unknown} for setting {name!r}; allowed: {', '.join(params)}")


def build(name: str, domains: DomainSet, **options) -> Stream:
    check_options(name, options)
    return get(name)(domains, **options)
