"""Playing a :class:`~tta.data.lazy.LazyImages` chunk by chunk with bounded memory (``data.workers``).

A segment is read in chunks of ``chunk`` images (default 500, a multiple of the engine's 100-image RNG
groups). A torch ``DataLoader`` over the chunk numbers runs stage one (reading and decoding files) in
``workers`` background processes while the adapter works on earlier chunks; chunks come back in order, and
stage two (device transfer, GPU decode, seeded corruption) runs in the main process. Pinned host memory
and ``prefetch_factor`` 2 are used when the model is on CUDA. At most ``(2 * workers + 2) * chunk`` images
are alive at once, however long the stream: 2,000 images of 224 px (0.3 GB) with the default of 1 worker.

The images a batch receives do not depend on ``workers`` or ``chunk``: stage one is deterministic and
stage two sees the chunks in order, so a run with 0 and with 2 workers gives identical numbers.

Default worker count (``data.workers: null``): half of the CPUs this process may use, at most 8 (so 1 on
a 2-core machine, 8 from 16 cores up), 0 with a single CPU; the other half is left to the model.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import torch

from ..errors import ConfigError

DEFAULT_CHUNK = 500


def default_workers() -> int:
    """Half the CPUs available to this process, at most 8 (see the module docstring)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus // 2)


def resolve_workers(workers: Optional[int]) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"data.workers must be an integer >= 0 or null (automatic), got {workers!r}")
    return workers


class _Chunks(torch.utils.data.Dataset):
    """Item k = stage one of chunk k (what a worker process computes)."""

    def __init__(self, images, chunk: int):
        self.images, self.chunk = images, chunk

    def __len__(self) -> int:
        return -(-len(self.images) // self.chunk)

    def __getitem__(self, k: int):
        lo = k * self.chunk
        return self.images.read(lo, min(lo + self.chunk, len(self.images)))


def _identity(x):
    return x


def _one_thread(_worker_id: int) -> None:
    """Workers decode with one thread each: the parallelism is the number of workers."""
    torch.set_num_threads(1)


def iter_chunks(images, device, workers: Optional[int] = None, chunk: Optional[int] = None
                ) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """``(lo, hi, uint8 images of positions lo:hi on device)`` for consecutive chunks of ``images``."""
    device = torch.device(device or "cpu")
    workers = resolve_workers(images.workers if workers is None else workers)
    chunk = int(chunk or images.chunk or DEFAULT_CHUNK)
    if chunk < 1 or chunk % 100:
        raise ConfigError(f"the loader's chunk must be a positive multiple of 100 images (the corruption engine's "
                          f"RNG groups must not straddle chunks), got {chunk}")
    images.prepare(device)
    dataset = _Chunks(images, chunk)
    n = len(images)
    if workers == 0 or not images.slow or len(dataset) <= 1:
        payloads = (dataset[k] for k in range(len(dataset)))
    else:
        payloads = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=min(workers, len(dataset)),
            collate_fn=_identity, pin_memory=device.type == "cuda", prefetch_factor=2,
            worker_init_fn=_one_thread)
    for k, payload in enumerate(payloads):
        lo, hi = k * chunk, min((k + 1) * chunk, n)
        yield lo, hi, images.finish(payload, lo, hi, device)


class Cursor:
    """Hands out consecutive, possibly overlapping ranges ``[lo, hi)`` of a chunked stream of images.

    Ranges must not move backwards (``lo`` and ``hi`` never decrease), so only the images from the current
    ``lo`` on are kept: a sliding window of W images keeps W + one chunk in memory.
    """

    def __init__(self, chunks: Iterator[Tuple[int, int, torch.Tensor]]):
        self.chunks = chunks
        self.lo, self.buf = 0, None

    def take(self, lo: int, hi: int) -> torch.Tensor:
        if lo < self.lo:
            raise ValueError(f"Cursor ranges must not move backwards ({lo} < {self.lo})")
        while self.buf is None or self.lo + len(self.buf) < hi:
            try:
                c_lo, _, x = next(self.chunks)
            except StopIteration:
                break
            if self.buf is None:
                self.lo, self.buf = c_lo, x
            else:
                self.buf = torch.cat([self.buf[max(0, lo - self.lo):], x])
                self.lo = max(self.lo, lo)
        if self.buf is None:
            raise ValueError(f"Cursor: no images at positions {lo}:{hi} (the stream is shorter)")
        return self.buf[lo - self.lo:hi - self.lo]
