"""How the engine spends CPU threads: independent image chunks on worker threads, one torch thread each.

Why not torch's own intra-op threads: a 100-image CIFAR chunk is a few hundred thousand elements per
operation, so every operation is a short OpenMP parallel region that ends in a barrier. When another
process holds one of the cores, the thread that lost its core keeps the other waiting at every barrier;
measured on the 2-core development machine under load, 2 intra-op threads made ``corrupt_dataset`` about
16x slower than 1 thread. Chunks are independent (each has its own generator), so they parallelise
without any barrier: ``threads`` workers take the next chunk as they finish one, and a worker that loses
its core delays only its own chunk.

Every entry point (the functional ops and ``corrupt``, ``Corrupt``, ``corrupt_dataset`` and so
``tta make-c`` and on-the-fly streams) goes through :func:`run_chunks`. The number of workers is the
caller's ``torch.get_num_threads()``, so ``torch.set_num_threads`` (or the runner's ``threads``) keeps
meaning what it says, and the caller's own thread settings are never changed. Each chunk runs with
exactly one torch thread whatever the worker count, so the output does not depend on the thread setting
(no reduction is split differently).

CUDA inputs run in the caller's thread, chunk after chunk: the GPU does the parallel work.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

# A single chunk of images larger than this (pixels per image) runs in the caller's thread with the
# caller's torch threads: at ImageNet size (224 x 224) one operation is millions of elements, long enough
# for intra-op threading to pay for its barriers. Smaller images always take one torch thread.
LARGE_IMAGE_PIXELS = 64 * 64

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _single_torch_thread(ready: threading.Barrier) -> None:
    """Worker initialiser: one torch thread in this worker for good.

    A thread's OpenMP team size is set from the process-wide default the first time that thread asks for
    it (``torch.get_num_threads()``, or its first parallel operation), not by ``set_num_threads`` alone. Asked
    here, while the default is 1, the worker keeps 1 when the caller's setting is put back; asked later (as
    before this was found), every worker ran each operation with a team of the caller's size: two workers
    on two cores meant four busy threads, ~95,000 context switches and ~1.2 s more CPU per 150,000 images.
    """
    torch.set_num_threads(1)
    torch.get_num_threads()     # fixes this thread's team size at 1 now, while the default is 1
    ready.wait()


def _executor() -> ThreadPoolExecutor:
    """The engine's worker threads, all started (and set to one torch thread) when first needed.

    ``torch.set_num_threads`` sets the OpenMP team size of the calling thread and a process-wide default
    that a thread reads the first time it asks for its own (see :func:`_single_torch_thread`). The workers
    are therefore started together, once, each fixing its own size at 1 while the default is 1, and the
    default is put back right after: no later call changes the workers, nor they the caller.
    """
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None:
            saved = torch.get_num_threads()  # fixes this thread's own team size before the workers start
            size = max(2, min(os.cpu_count() or 1, 64))
            ready = threading.Barrier(size + 1)
            pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="tta-corrupt",
                                      initializer=_single_torch_thread, initargs=(ready,))
            for _ in range(size):  # the initialisers block on the barrier, so every submit starts a thread
                pool.submit(int)
            ready.wait()
            torch.set_num_threads(saved)
            _pool, _pool_size = pool, size
        return _pool


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: start a pool of its own when it needs one."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_chunks(fn: Callable[[int], None], count: int, device, pixels: int = 0,
               threads: Optional[int] = None) -> None:
    """Call ``fn(k)`` for every chunk ``k`` in ``range(count)``; ``fn`` writes its own result.

    On the CPU, up to ``threads`` (default: the caller's ``torch.get_num_threads()``) chunks run at a
    time on worker threads with one torch thread each. A single chunk of images larger than
    ``LARGE_IMAGE_PIXELS`` (``pixels`` per image) runs in the caller's thread with its torch threads.
    The first exception raised by a chunk is re-raised here once the running chunks have finished.
    """
    if count <= 0:
        return
    if torch.device(device).type != "cpu" or (count == 1 and pixels > LARGE_IMAGE_PIXELS):
        for k in range(count):
            fn(k)
        return
    pool = _executor()
    threads = max(1, min(int(threads or torch.get_num_threads()), count, _pool_size))
    next_chunk = iter(range(count))
    take = threading.Lock()
    failed: list = []

    def worker() -> None:
        while not failed:
            with take:
                k = next(next_chunk, None)
            if k is None:
                return
            try:
                fn(k)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller below
                failed.append(err)

    futures = [pool.submit(worker) for _ in range(threads)]
    try:
        for future in futures:
            future.result()
    except BaseException as err:  # e.g. KeyboardInterrupt while waiting: stop handing out chunks
        failed.append(err)
        raise
    if failed:
        raise failed[0]
