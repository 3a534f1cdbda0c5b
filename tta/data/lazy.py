"""Images that are read only when a stream reaches them: :class:`LazyImages` and its sources.

A domain of ImageNet size cannot be held in memory (50,000 images at 224 px are 7.5 GB of uint8), so a
domain built from files is a :class:`LazyImages`: labels are known up front (they come from folder names
or list files), pixels are produced chunk by chunk when the stream is played (``tta.data.loader``).
Protocols reorder and mix domains exactly as they do tensors - ``images[perm]`` and :meth:`LazyImages.cat`
only permute two small index arrays - so label-sorted, Dirichlet and mixed streams work unchanged.

Producing a chunk has two stages, so that a torch ``DataLoader`` can run the slow, deterministic part in
worker processes while the part that needs the model's device or a seeded generator runs in order in the
main process:

* ``Source.fetch(index)``: reading and CPU decoding (picklable, pure: the same index gives the same
  tensor in any process);
* ``Source.finish(payload, index, positions, device)``: moving to the device, GPU decoding, corrupting.

``positions`` are the positions of the images in the segment being played. Generated corruptions draw
their randomness per group of ``RNG_CHUNK`` (100) consecutive positions, exactly as ``corrupt_dataset``
does per 100 consecutive images, so a generated domain played in its natural order equals
``corrupt_dataset`` (and ``tta make-c``) output for the same seed, whatever the chunk size or the number
of loader workers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..errors import ConfigError
from .decode import check_decoder, decode_bytes, pil_load, read_bytes, resize_crop, spec_of


class Source:
    """Random access to uint8 images (3, H, W) by index (see the module docstring for the two stages)."""

    #: True when reading is slow enough to be worth background worker processes.
    slow = False
    #: (channels, height, width) of every image
    image_shape = (3, 224, 224)

    def __len__(self) -> int:
        raise NotImplementedError

    def prepare(self, device: torch.device) -> None:
        """Called once, in the main process, before a segment is played on ``device``."""

    def fetch(self, index: torch.Tensor):
        raise NotImplementedError

    def finish(self, payload, index: torch.Tensor, positions: torch.Tensor, device) -> torch.Tensor:
        return payload.to(device, non_blocking=True)


class TensorSource(Source):
    """Images already in memory (uint8 N x 3 x H x W)."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.image_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def fetch(self, index):
        return self.images[index]


class FileSource(Source):
    """Image files, preprocessed as ``preprocess`` (``tta.data.decode.PREPROCESS``) by ``decoder``.

    With the torchvision decoder on a CUDA device the workers only read the files' bytes and the main
    process decodes them on the GPU (:func:`tta.data.decode.decode_bytes`; untested here: no GPU).
    """

    slow = True

    def __init__(self, paths: Sequence, preprocess: str = "resize256", decoder: str = "torchvision", size: int = 224):
        self.paths = [str(p) for p in paths]
        self.size, self.spec, self.decoder = size, spec_of(preprocess=preprocess), check_decoder(decoder)
        self.gpu_decode = False
        self.image_shape = (3, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    def prepare(self, device):
        self.gpu_decode = torch.device(device).type == "cuda" and self.decoder == "torchvision"

    def fetch(self, index):
        paths = [self.paths[i] for i in index.tolist()]
        if self.gpu_decode:
            return [read_bytes(p) for p in paths]
        out = torch.empty(len(paths), 3, self.size, self.size, dtype=torch.uint8)
        if self.decoder == "pil":
            for k, p in enumerate(paths):
                out[k] = pil_load(p, self.size, spec=self.spec)
            return out
        for k, (img, p) in enumerate(zip(decode_bytes([read_bytes(p) for p in paths], where=paths), paths)):
            out[k] = resize_crop(img, self.size, where=p, spec=self.spec)
        return out

    def finish(self, payload, index, positions, device):
        if not isinstance(payload, list):
            return payload.to(device, non_blocking=True)
        paths = [self.paths[i] for i in index.tolist()]
        images = decode_bytes(payload, device, paths)
        return torch.stack([resize_crop(img, self.size, where=p, spec=self.spec) for img, p in zip(images, paths)])


class CorruptedSource(Source):
    """Another source's images corrupted on the device with the engine's constants, seeded per 100 positions.

    ``jpeg_roundtrip`` adds the quality-85 JPEG save that every released ImageNet-C file went through.
    """

    def __init__(self, base: Source, corruption: str, severity: int, seed: int, jpeg_roundtrip: bool = False,
                 params: Optional[str] = None):
        from .corruptions.api import check_name, check_severity
        self.base, self.corruption = base, check_name(corruption)
        self.severity, self.seed = check_severity(severity), int(seed)
        self.jpeg_roundtrip, self.params = bool(jpeg_roundtrip), params
        self.slow, self.image_shape = base.slow, base.image_shape

    def __len__(self) -> int:
        return len(self.base)

    def prepare(self, device):
        self.base.prepare(device)

    def fetch(self, index):
        return self.base.fetch(index)

    def finish(self, payload, index, positions, device):
        from .corruptions import RNG_CHUNK, chunk_seed
        from .corruptions.api import apply_levels
        from .corruptions.params import resolve_table
        x = self.base.finish(payload, index, positions, device)
        table = resolve_table(self.params, x.shape[-2], x.shape[-1])
        out = torch.empty_like(x)
        groups = positions // RNG_CHUNK
        for g in torch.unique(groups).tolist():  # ascending, as corrupt_dataset's chunks
            sel = (groups == g).nonzero().flatten().to(x.device)
            gen = torch.Generator(device=x.device).manual_seed(chunk_seed(self.seed, self.corruption, self.severity, g))
            levels = apply_levels(x[sel].to(torch.float64), self.corruption, self.severity, table, gen)
            out[sel] = jpeg85(levels) if self.jpeg_roundtrip else levels.to(torch.uint8)
        return out


def jpeg85(levels: torch.Tensor) -> torch.Tensor:
    """The released files' final step: truncating uint8 cast, then a JPEG quality-85 (4:2:0) round trip."""
    from .corruptions.digital import jpeg_compression
    return jpeg_compression(torch.floor(levels), 85).to(torch.uint8)


class LazyImages:
    """A sequence of images drawn from one or more sources: position p is ``sources[src[p]][idx[p]]``.

    ``workers`` / ``chunk`` say how the loader plays it (``tta.data.loader``); they travel with the object
    so that protocols need not know about them.
    """

    def __init__(self, sources: List[Source], src: torch.Tensor, idx: torch.Tensor, workers: int = 0,
                 chunk: int = 500, offset: int = 0):
        self.sources, self.src, self.idx = list(sources), src.long(), idx.long()
        self.workers, self.chunk, self.offset = int(workers), int(chunk), int(offset)
        if len(self.src) != len(self.idx):
            raise ConfigError("LazyImages: src and idx must have the same length")

    @classmethod
    def of(cls, source: Source, workers: int = 0, chunk: int = 500) -> "LazyImages":
        """All images of one source in index order."""
        n = len(source)
        return cls([source], torch.zeros(n, dtype=torch.long), torch.arange(n), workers, chunk)

    def __len__(self) -> int:
        return len(self.idx)

    #: images come out as uint8, like the in-memory tensors they stand in for
    dtype = torch.uint8

    @property
    def shape(self):
        """(N, C, H, W) of the images this stands for (nothing is read)."""
        return (len(self), *self.sources[0].image_shape) if self.sources else (0,)

    def __getitem__(self, key) -> "LazyImages":
        """Reorder or subset by an index tensor, a list or a slice (positions, not pixels). A contiguous slice
        keeps the positions its images had (``offset``), so a slice of a generated domain gets the same
        noise as in the whole domain; any other reordering numbers the positions afresh."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            offset = self.offset + start if step == 1 else 0
            return LazyImages(self.sources, self.src[key], self.idx[key], self.workers, self.chunk, offset)
        key = torch.as_tensor(key, dtype=torch.long)
        return LazyImages(self.sources, self.src[key], self.idx[key], self.workers, self.chunk)

    @staticmethod
    def cat(parts: Sequence["LazyImages"]) -> "LazyImages":
        """The parts one after the other (sources shared by several parts are kept once per part)."""
        sources, srcs, idxs = [], [], []
        for p in parts:
            srcs.append(p.src + len(sources))
            idxs.append(p.idx)
            sources.extend(p.sources)
        return LazyImages(sources, torch.cat(srcs), torch.cat(idxs), parts[0].workers, parts[0].chunk)

    @property
    def slow(self) -> bool:
        return any(s.slow for s in self.sources)

    def prepare(self, device) -> None:
        for s in self.sources:
            s.prepare(device)

    def read(self, lo: int, hi: int):
        """Stage one for positions ``lo:hi``: ``[(source id, selected offsets, payload)]`` (runs in workers)."""
        src, idx = self.src[lo:hi], self.idx[lo:hi]
        out = []
        for s in torch.unique(src).tolist():
            sel = (src == s).nonzero().flatten()
            out.append((s, sel, self.sources[s].fetch(idx[sel])))
        return out

    def finish(self, payload, lo: int, hi: int, device) -> torch.Tensor:
        """Stage two: uint8 images of positions ``lo:hi`` on ``device``, in position order."""
        idx = self.idx[lo:hi]
        out = None
        for s, sel, data in payload:
            sel = torch.as_tensor(sel, dtype=torch.long)
            x = self.sources[s].finish(data, idx[sel], sel + lo + self.offset, device)
            if out is None:
                out = torch.empty((hi - lo, *x.shape[1:]), dtype=x.dtype, device=x.device)
            out[sel.to(x.device)] = x
        if out is None:
            return torch.empty((0, 3, 1, 1), dtype=torch.uint8, device=device)
        return out


def as_lazy(images) -> LazyImages:
    """``images`` as :class:`LazyImages` (in-memory tensors are wrapped, not copied)."""
    return images if isinstance(images, LazyImages) else LazyImages.of(TensorSource(images))
