"""Streams: the order in which test batches reach the adapter (METHODS.md section 2).

A protocol is a function ``fn(domains: DomainSet, *, batch_size, ...) -> Stream`` registered with
``@protocol("name")``. A :class:`Stream` is a list of segments; a segment is a tensor block cut into
batches in order, with a flag saying whether the adapter is reset before it. Images stay uint8 until a
batch is taken, and every sample carries the index of its domain, so mixed streams still report error
per domain. Streams know nothing about methods.

Protocols: ``continual`` / ``reset_each_shift`` / ``lifelong`` (rounds) / ``gradual`` (CoTTA's
severity schedule) take ``order: 0..9`` for one of CoTTA's ten corruption orders; ``mixed_domains``
pools and shuffles every domain; ``correlated`` orders each domain by label (sorted, or Dirichlet
time slots); ``ccc`` plays Continually Changing Corruptions (``tta.data.ccc_stream``). Every protocol also
takes ``window`` (see :meth:`Stream.batches`). Whatever is random takes a ``seed`` and is the same for the
same seed. Segments may hold lazily read images (:class:`~tta.data.lazy.LazyImages`): protocols reorder
them like tensors, and :meth:`Stream.batches` reads them chunk by chunk.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from .datasets import to_float
from .domains import DomainSet
from .lazy import LazyImages, as_lazy
from .loader import Cursor, iter_chunks

_PROTOCOLS: Dict[str, Callable] = {}
# options every protocol accepts; build() applies them to the Stream
COMMON_OPTIONS = ("window",)

# CoTTA's ten random corruption orders (ImageNet-C continual and CIFAR-10 gradual; METHODS.md 2.3)
COTTA_ORDERS: List[List[str]] = [line.split() for line in """
brightness pixelate gaussian_noise motion_blur zoom_blur glass_blur impulse_noise jpeg_compression defocus_blur elastic_transform shot_noise frost snow fog contrast
jpeg_compression shot_noise zoom_blur frost contrast fog defocus_blur elastic_transform gaussian_noise brightness glass_blur impulse_noise pixelate snow motion_blur
contrast defocus_blur gaussian_noise shot_noise snow frost glass_blur zoom_blur elastic_transform jpeg_compression pixelate brightness impulse_noise motion_blur fog
shot_noise fog glass_blur pixelate snow elastic_transform brightness impulse_noise defocus_blur frost contrast gaussian_noise motion_blur jpeg_compression zoom_blur
pixelate glass_blur zoom_blur snow fog impulse_noise brightness motion_blur frost jpeg_compression gaussian_noise shot_noise contrast defocus_blur elastic_transform
motion_blur snow fog shot_noise defocus_blur contrast zoom_blur brightness frost elastic_transform glass_blur gaussian_noise pixelate jpeg_compression impulse_noise
frost impulse_noise jpeg_compression contrast zoom_blur glass_blur pixelate snow defocus_blur motion_blur brightness elastic_transform shot_noise fog gaussian_noise
glass_blur zoom_blur impulse_noise fog snow jpeg_compression gaussian_noise frost shot_noise brightness contrast motion_blur pixelate defocus_blur elastic_transform
defocus_blur motion_blur zoom_blur shot_noise gaussian_noise glass_blur jpeg_compression fog contrast pixelate frost snow brightness elastic_transform impulse_noise
contrast gaussian_noise defocus_blur zoom_blur frost glass_blur jpeg_compression fog pixelate elastic_transform shot_noise impulse_noise snow motion_blur brightness
""".strip().splitlines()]

# CoTTA's gradual schedule: the first corruption ramps down from 5, every later one goes up and back
GRADUAL_FIRST = (5, 4, 3, 2, 1)
GRADUAL_LATER = (1, 2, 3, 4, 5, 4, 3, 2, 1)


def protocol(name: str):
    def deco(fn):
        _PROTOCOLS[name] = fn
        return fn
    return deco


@dataclass
class StreamBatch:
    x: torch.Tensor  # float32 (B, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (B - context,): labels of the scored images
    domain: torch.Tensor  # int64 (B - context,): index into Stream.domain_names
    reset: bool  # reset the adapter before this batch
    round: int = 0
    context: int = 0  # leading images of x given as context only: their predictions are not scored


@dataclass
class Segment:
    """A block of images handed out in order; ``load`` returns (uint8 images, labels, domain ids)."""
    load: Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(repr=False)
    reset: bool = False
    round: int = 0
    label: str = ""


class Stream:
    def __init__(self, segments: List[Segment], domain_names: List[str], batch_size: int,
                 window: Optional[int] = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if window is not None and (not isinstance(window, int) or window <= batch_size):
            raise ConfigError(f"stream.window must be an integer larger than batch_size ({batch_size}), got {window!r}")
        self.segments, self.domain_names, self.batch_size = segments, list(domain_names), batch_size
        self.window = window

    def __iter__(self) -> Iterator[StreamBatch]:
        for seg in self.segments:
            yield from self.batches(seg)

    def batches(self, seg: Segment, device=None) -> Iterator[StreamBatch]:
        """The segment's batches. With ``window = W`` each batch is the last W images of the segment up
        to and including the ``batch_size`` new ones; only the new ones are scored (``context`` says how
        many lead images are not), so every image is predicted and counted exactly once while methods
        that normalise with batch statistics see W images. The first W images of a segment form one
        ordinary batch (the stream waits until W images have arrived). The window restarts at every
        segment, so a run checkpointed between segments resumes to the same numbers.

        ``device``: the segment's uint8 images are moved there once, so batches are cut and converted to
        float on the model's device (no per-batch host-to-device copy of float images). A segment of
        :class:`~tta.data.lazy.LazyImages` (file-backed and generated ImageNet domains) is instead read chunk
        by chunk by a background loader (``tta.data.loader``): the same batches, with bounded memory."""
        x, y, d = seg.load()
        if isinstance(x, LazyImages):
            take = Cursor(iter_chunks(x, device)).take
        else:
            if device is not None:
                x = x.to(device)
            take = lambda lo, hi: x[lo:hi]  # noqa: E731
        n, b = len(y), self.batch_size
        if self.window is None:
            for i in range(0, n, b):
                yield StreamBatch(to_float(take(i, i + b)), y[i:i + b], d[i:i + b], seg.reset and i == 0, seg.round)
            return
        w = self.window
        first = min(w, n)
        yield StreamBatch(to_float(take(0, first)), y[:first], d[:first], seg.reset, seg.round)
        for i in range(first, n, b):
            j = min(i + b, n)
            yield StreamBatch(to_float(take(j - w, j)), y[i:j], d[i:j], False, seg.round, context=i - (j - w))

    @property
    def rounds(self) -> int:
        return max((s.round for s in self.segments), default=0) + 1


def _domain_segment(domain, index: int, reset: bool, round_: int = 0, before: Optional[Callable] = None,
                    reorder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Segment:
    """``before`` runs first (cache release); ``reorder(labels) -> permutation`` reorders the domain."""
    def load():
        if before is not None:
            before()
        x, y = domain.load()
        if reorder is not None:
            idx = reorder(y)
            x, y = x[idx], y[idx]
        return x, y, torch.full((len(x),), index, dtype=torch.long)
    return Segment(load, reset, round_, domain.name)


def _sequence(seq: Sequence, batch_size: int, *, reset_each: bool = False, rounds: int = 1,
              before: Optional[Callable] = None, reorder: Optional[Callable] = None) -> Stream:
    """Domains one after the other, ``rounds`` times; a domain visited twice keeps one index (one column).
    Reset before the first segment, or before every domain when ``reset_each``."""
    names = list(dict.fromkeys(d.name for d in seq))
    index = {n: i for i, n in enumerate(names)}
    segments = [_domain_segment(d, index[d.name], reset_each or (r == 0 and k == 0), r,
                                before and (lambda d=d: before(d)), reorder)
                for r in range(rounds) for k, d in enumerate(seq)]
    return Stream(segments, names, batch_size)


def ordered_corruptions(domains: DomainSet, order: Optional[int]) -> List[str]:
    """The configured corruptions, in CoTTA order ``order`` when given. A subset keeps the relative order
    of that CoTTA order; configured names outside the 15 (``clean``, extras) follow in their own order."""
    if order is None:
        return list(domains.corruptions)
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order < len(COTTA_ORDERS):
        raise ConfigError(f"stream.order must be an integer 0..{len(COTTA_ORDERS) - 1} (CoTTA's orders) or "
                          f"null (the configured order), got {order!r}")
    configured, ref = set(domains.corruptions), COTTA_ORDERS[order]
    return [c for c in ref if c in configured] + [c for c in domains.corruptions if c not in ref]


def _ordered_domains(domains: DomainSet, order: Optional[int]) -> list:
    return [domains.make(c, s) for c in ordered_corruptions(domains, order) for s in domains.severities]


@protocol("continual")
def continual(domains: DomainSet, *, batch_size: int = 200, order: Optional[int] = None) -> Stream:
    """The domains one after the other, never resetting (CoTTA's protocol)."""
    return _sequence(_ordered_domains(domains, order), batch_size)


@protocol("reset_each_shift")
def reset_each_shift(domains: DomainSet, *, batch_size: int = 200, order: Optional[int] = None) -> Stream:
    """Each domain starts from the source model (TENT, EATA, SAR, DeYO protocols)."""
    return _sequence(_ordered_domains(domains, order), batch_size, reset_each=True)


@protocol("lifelong")
def lifelong(domains: DomainSet, *, batch_size: int = 200, rounds: int = 10, order: Optional[int] = None) -> Stream:
    """The domain sequence repeated ``rounds`` times with no reset (LCoTTA: 50 rounds of ImageNet-C);
    errors are kept per (round, domain)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"stream.rounds must be a positive integer, got {rounds!r}")
    return _sequence(_ordered_domains(domains, order), batch_size, rounds=rounds)


def gradual_schedule(corruptions: Sequence[str]) -> List[Tuple[str, int]]:
    """CoTTA's gradual (corruption, severity) sequence: 5,4,3,2,1 for the first corruption, then
    1,2,3,4,5,4,3,2,1 for each later one."""
    return [(c, s) for k, c in enumerate(corruptions) for s in (GRADUAL_LATER if k else GRADUAL_FIRST)]


@protocol("gradual")
def gradual(domains: DomainSet, *, batch_size: int = 200, order: Optional[int] = None) -> Stream:
    """Severities change gradually, never resetting (CoTTA, CIFAR-10). ``data.severities`` is not used:
    the schedule visits all five. Errors are kept per (corruption, severity), pooled over both visits.
    Domains of earlier corruptions are dropped from memory when a new corruption starts."""
    seq = [domains.make(c, s) for c, s in gradual_schedule(ordered_corruptions(domains, order))]
    keep = lambda d: domains.release(keep={(d.corruption, s) for s in GRADUAL_FIRST})  # noqa: E731
    return _sequence(seq, batch_size, before=keep)


@protocol("mixed_domains")
def mixed_domains(domains: DomainSet, *, batch_size: int = 200, seed: int = 0) -> Stream:
    """All domains' images pooled and shuffled into one stream (SAR/DeYO "mixed shifts"); every image
    keeps its domain index, so the error is still reported per domain."""
    ds = domains.domains

    def load():
        parts = [d.load() for d in ds]
        sizes = [len(p[1]) for p in parts]
        n = sum(sizes)
        position = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # sample g goes to position[g]
        lazy = any(isinstance(p[0], LazyImages) for p in parts)
        x = None if lazy else torch.empty((n, *parts[0][0].shape[1:]), dtype=parts[0][0].dtype)
        y = torch.empty(n, dtype=torch.long)
        dom = torch.empty(n, dtype=torch.long)
        start = 0
        for i, ((xi, yi), size) in enumerate(zip(parts, sizes)):
            pos = position[start:start + size]
            y[pos], dom[pos] = yi, i
            if not lazy:
                x[pos] = xi
            start += size
        if lazy:  # the same placement, as an index: position p holds sample argsort(position)[p]
            x = LazyImages.cat([as_lazy(xi) for xi, _ in parts])[torch.argsort(position)]
        return x, y, dom
    return Stream([Segment(load, True, 0, "mixed")], [d.name for d in ds], batch_size)


def label_sorted(labels: torch.Tensor) -> torch.Tensor:
    """Indices that sort by class, keeping the original order inside a class."""
    return torch.sort(labels, stable=True).indices


def dirichlet_order(labels: torch.Tensor, delta: float, slots: int, seed: int) -> torch.Tensor:
    """A label-correlated order: the stream is cut into ``slots`` time slots, each class spreads its
    samples over the slots with proportions drawn from Dirichlet(delta, ..., delta), and slots are
    played in order; inside a slot the classes come one after the other in a random order (so that
    classes landing in the same slot do not mix) and samples of a class in random order. Small delta
    puts each class into one slot (nearly single-class batches, a label-sorted stream in random class
    order); large delta spreads every class evenly (each slot, one batch long, is a uniform mix).
    Vectorised: no loop over samples or classes."""
    if not delta > 0:
        raise ConfigError(f"stream.delta must be positive (or null for label-sorted order), got {delta!r}")
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    n, num_classes = len(y), int(y.max()) + 1
    share = rng.dirichlet(np.full(slots, float(delta)), size=num_classes)  # (C, slots)
    by_class = np.lexsort((rng.random(n), y))  # grouped by class, random inside a class
    counts = np.bincount(y, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n)
    rank[by_class] = np.arange(n) - starts[y[by_class]]
    quantile = (rank + 0.5) / counts[y]  # where a sample sits within its class, in (0, 1)
    slot = (np.cumsum(share, axis=1)[y] < quantile[:, None]).sum(1)
    class_rank = rng.random((slots + 1, num_classes))  # classes sharing a slot play in a random order
    return torch.from_numpy(np.lexsort((rng.random(n), class_rank[slot, y], slot)))


@protocol("correlated")
def correlated(domains: DomainSet, *, batch_size: int = 200, delta: Optional[float] = None, seed: int = 0,
               order: Optional[int] = None, reset_each_shift: bool = False) -> Stream:
    """Continual (or reset-each-shift) stream whose labels are correlated in time within each domain:
    sorted by class when ``delta`` is null, else Dirichlet(delta) over time slots of one batch each
    (:func:`dirichlet_order`; domain ``i`` uses ``seed + i``)."""
    seq = _ordered_domains(domains, order)
    index = {d.name: i for i, d in enumerate(seq)}

    def reorder_for(i):
        if delta is None:
            return label_sorted
        return lambda y: dirichlet_order(y, delta, max(1, math.ceil(len(y) / batch_size)), seed + i)
    segments = [_domain_segment(d, index[d.name], reset_each_shift or k == 0, 0, reorder=reorder_for(k))
                for k, d in enumerate(seq)]
    return Stream(segments, [d.name for d in seq], batch_size)


def available() -> List[str]:
    return sorted(_PROTOCOLS)


def get(name: str) -> Callable:
    if name not in _PROTOCOLS:
        raise ConfigError(f"unknown setting {name!r}; available: {', '.join(available())}")
    return _PROTOCOLS[name]


def check_options(name: str, options: dict) -> None:
    params = list(inspect.signature(get(name)).parameters)[1:] + list(COMMON_OPTIONS)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(f"unknown stream option(s) {unknown} for setting {name!r}; allowed: {', '.join(params)}")


def build(name: str, domains: DomainSet, **options) -> Stream:
    check_options(name, options)
    window = options.pop("window", None)
    stream = get(name)(domains, **options)
    return Stream(stream.segments, stream.domain_names, stream.batch_size, window)


from .ccc_stream import ccc_protocol  # noqa: E402  (registers "ccc"; it builds on Segment and Stream above)

protocol("ccc")(ccc_protocol)
