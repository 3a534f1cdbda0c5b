"""``corrupt_dataset``: the one function that corrupts whole uint8 image sets, seeded per fixed chunk.

Both file generation (``tta.data.make_c``) and on-the-fly streams call it, so the same seed gives the same
images either way. Images are split into fixed chunks of ``RNG_CHUNK = 100`` consecutive images (by their
index in the array); chunk k draws all its randomness from a ``torch.Generator`` seeded with a stable hash
of ``(seed, corruption name, severity, k)``. The ``chunk_size`` argument only sets how many images are
moved to a GPU at a time (rounded up to a multiple of ``RNG_CHUNK``; on the CPU the chunks are worked
through by the engine's threads straight from the uint8 set), so the output does not depend on it, nor on
the number of threads, nor on how a caller slices its work - as long as slices start at multiples of 100
(use ``start`` to say where a slice begins in the full set).
"""
from __future__ import annotations

import hashlib
import threading
from typing import Optional

import numpy as np
import torch

from ...errors import InputError
from ._workers import run_chunks
from .api import RNG_CHUNK, apply_levels, check_name, check_severity
from .params import resolve_table


def chunk_seed(seed: int, name: str, severity: int, chunk: int) -> int:
    """Stable 63-bit seed for one RNG chunk (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(f"{int(seed)}|{name}|{int(severity)}|{int(chunk)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def as_nchw_uint8(images) -> torch.Tensor:
    """A uint8 image array (N, H, W, 3) or (N, 3, H, W), NumPy or torch, as a CPU torch tensor NCHW."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.ndim != 4:
        raise InputError(f"corrupt_dataset takes a 4-D uint8 image array, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} with shape {tuple(getattr(t, 'shape', ()))}")
    if t.shape[1] == 3:
        return t
    if t.shape[-1] == 3:
        return t.permute(0, 3, 1, 2)
    raise InputError(f"corrupt_dataset needs RGB images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(t.shape)}")


def corrupt_dataset(images, name: str, severity: int, seed: int, chunk_size: int = 1000, device="cpu",
                    progress: bool = False, params: Optional[str] = None, frost_dir=None,
                    start: int = 0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Corrupt uint8 images with ``name`` at ``severity``; returns a CPU uint8 tensor (N, 3, H, W).

    ``start`` is the index of ``images[0]`` in the full set and must be a multiple of ``RNG_CHUNK``.
    ``out``: a CPU uint8 tensor (N, 3, H, W) of any strides to write into and return instead - e.g.
    ``torch.from_numpy(nhwc).permute(0, 3, 1, 2)`` fills an NHWC array chunk by chunk, with no extra pass.
    """
    check_name(name)
    check_severity(severity)
    if start % RNG_CHUNK:
        raise InputError(f"start must be a multiple of {RNG_CHUNK}, got {start}")
    x = as_nchw_uint8(images)
    n, _, h, w = x.shape
    table = resolve_table(params, h, w)
    step = max(RNG_CHUNK, -(-int(chunk_size) // RNG_CHUNK) * RNG_CHUNK)
    if out is None:
        out = torch.empty((n, 3, h, w), dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.device.type != "cpu" or tuple(out.shape) != (n, 3, h, w):
        raise InputError(f"out must be a CPU uint8 tensor of shape {(n, 3, h, w)}, got {out.dtype} on "
                         f"{out.device} with shape {tuple(out.shape)}")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=f"{name} s{severity}", unit="img", leave=False)
    tick = threading.Lock()

    def one(k: int, chunk: torch.Tensor, lo: int) -> None:
        """RNG chunk ``k`` of the transfer chunk starting at image ``lo`` (float64 per 100 images: in cache)."""
        b = k * RNG_CHUNK
        index = (start + lo + b) // RNG_CHUNK
        gen = torch.Generator(device=chunk.device).manual_seed(chunk_seed(seed, name, severity, index))
        block = chunk[b:b + RNG_CHUNK].to(torch.float64, memory_format=torch.contiguous_format)
        levels = apply_levels(block, name, severity, table, gen, frost_dir)
        if levels.device.type != "cpu":
            levels = levels.to(torch.uint8)                     # 1 byte per value over the bus, not 8
        out[lo + b:lo + b + levels.shape[0]].copy_(levels)    # levels are integers: the cast to uint8 is exact
        if bar is not None:
            with tick:
                bar.update(levels.shape[0])

    # On the CPU the whole set is one transfer chunk, so the workers never wait for each other.
    step = n if torch.device(device).type == "cpu" else step
    for lo in range(0, n, step):
        chunk = x[lo:lo + step].to(device=device)
        run_chunks(lambda k: one(k, chunk, lo), -(-chunk.shape[0] // RNG_CHUNK), device, pixels=h * w)
    if bar is not None:
        bar.close()
    return out
