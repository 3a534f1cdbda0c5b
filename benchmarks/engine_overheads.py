"""Where the corruption engine's time goes besides the corruptions themselves (issue 15).

    python benchmarks/engine_overheads.py                 # all three measurements, 2 threads, 3 repeats
    python benchmarks/engine_overheads.py --only processes --repeats 5

Five measurements, the timed ones interleaved so that load changes hit both sides alike:

* ``first-touch``: allocating the output of a 10,000-image call and writing it once, against writing the
  same, already touched memory again: what every entry point that returns new images pays for them
  (float32 for the functional ops and ``Corrupt``, uint8 for ``corrupt_dataset``).
* ``processes``: ``corrupt_dataset`` of the 15 corruptions on the engine's worker threads against the same
  chunks on forked worker processes (a prototype kept here, not in the library: the source images are
  copied into shared memory, every process runs one torch thread and takes the next 100-image chunk when it
  finishes one; the images are checked identical). The difference is what the threads lose to each other
  (before the workers' team-size fix, each ran every operation with a team of the caller's size).
* ``switches``: voluntary context switches, user and system time of ``corrupt_dataset`` (15 corruptions)
  with 1 thread and with ``--threads``, each in a fresh process.
* ``npy-write``: one 10,000-image ``.npy`` written by ``np.save`` of a filled array against filling a memory
  map of the file (``make_c``'s way).
* ``make-c``: ``make_c`` of the 15 corruptions writing to a folder on disk against one in ``/dev/shm``
  (memory), next to reading the source and ``corrupt_dataset`` alone: the cost of the file system.

Images come from ``$TTA_DATA_DIR/cifar10_test.npz``. Linux only (``fork``, ``/dev/shm``).
"""
from __future__ import annotations

import argparse
import mmap
import os
import pickle
import select
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tta.data import corruptions as C
from tta.data.corruptions.api import apply_levels
from tta.data.corruptions.dataset import as_nchw_uint8, chunk_seed
from tta.data.corruptions.params import resolve_table


def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<I", len(data)) + data)


def _read(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = os.read(fd, n - len(data))
        if not part:
            raise EOFError
        data += part
    return data


def _recv(fd: int):
    try:
        return pickle.loads(_read(fd, struct.unpack("<I", _read(fd, 4))[0]))
    except EOFError:
        return None


class ForkedPool:
    """``corrupt_dataset`` for uint8 CIFAR-size sets on forked worker processes (a measurement prototype)."""

    def __init__(self, workers: int, capacity: int):
        self.inbuf, self.outbuf = mmap.mmap(-1, capacity), mmap.mmap(-1, capacity)
        self.workers = []
        for _ in range(workers):
            task_r, task_w = os.pipe()
            done_r, done_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                for fd in [task_w, done_r] + [fd for _, *fds in self.workers for fd in fds]:
                    os.close(fd)                    # the parent's ends: EOF must reach every worker
                torch.set_num_threads(1)
                try:
                    self._serve(task_r, done_w)
                finally:
                    os._exit(0)
            os.close(task_r)
            os.close(done_w)
            self.workers.append((pid, task_w, done_r))

    def _serve(self, task_r: int, done_w: int) -> None:
        source, target = np.frombuffer(self.inbuf, np.uint8), np.frombuffer(self.outbuf, np.uint8)
        while (task := _recv(task_r)) is not None:
            name, severity, table, seed, index, lo, count, shape = task
            size = int(np.prod(shape))
            x = torch.from_numpy(source[lo * size:(lo + count) * size]).view(count, *shape)
            gen = torch.Generator().manual_seed(chunk_seed(seed, name, severity, index))
            levels = apply_levels(x.to(torch.float64), name, severity, table, gen)
            torch.from_numpy(target[lo * size:(lo + count) * size]).view(count, *shape).copy_(levels)
            _send(done_w, lo)

    def corrupt(self, images, name: str, severity: int, seed: int) -> torch.Tensor:
        x = as_nchw_uint8(images)
        n, c, h, w = x.shape
        size = c * h * w
        torch.from_numpy(np.frombuffer(self.inbuf, np.uint8)[:n * size]).view(n, c, h, w).copy_(x)
        table = resolve_table(None, h, w)
        tasks = iter([(name, severity, table, seed, k, k * C.RNG_CHUNK, min(C.RNG_CHUNK, n - k * C.RNG_CHUNK),
                       (c, h, w)) for k in range(-(-n // C.RNG_CHUNK))])
        busy = {}
        for _, task_w, done_r in self.workers:
            task = next(tasks, None)
            if task is None:
                break
            _send(task_w, task)
            busy[done_r] = task_w
        while busy:
            for done_r in select.select(list(busy), [], [])[0]:
                if _recv(done_r) is None:
                    raise RuntimeError("a worker process died")
                task = next(tasks, None)
                if task is None:
                    busy.pop(done_r)
                else:
                    _send(busy[done_r], task)
        out = torch.empty(n, c, h, w, dtype=torch.uint8)
        return out.copy_(torch.from_numpy(np.frombuffer(self.outbuf, np.uint8)[:n * size]).view(n, c, h, w))

    def close(self) -> None:
        for pid, task_w, done_r in self.workers:
            os.close(task_w)
            os.close(done_r)
            os.waitpid(pid, 0)


def interleaved(runs: dict, repeats: int) -> dict:
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def first_touch(repeats: int) -> None:
    shapes = {"float32 (functional, Corrupt)": torch.float32, "uint8 (corrupt_dataset)": torch.uint8}
    for what, dtype in shapes.items():
        warm = torch.empty(10000, 3, 32, 32, dtype=dtype)
        warm.fill_(1)
        t = interleaved({"new": lambda: torch.empty(10000, 3, 32, 32, dtype=dtype).fill_(1),
                         "touched": lambda: warm.fill_(2)}, repeats)
        mb = warm.numel() * warm.element_size() / 2 ** 20
        print(f"- {what}, {mb:.0f} MiB per 10,000 images: new {t['new'] * 1e3:.1f} ms, already touched "
              f"{t['touched'] * 1e3:.1f} ms; 15 calls pay {15 * (t['new'] - t['touched']):.2f} s more")


def processes(images, threads: int, repeats: int) -> None:
    pool = ForkedPool(threads, images.nbytes + (1 << 20))
    try:
        for name in C.CORRUPTIONS:                          # caches and tables, in both
            C.corrupt_dataset(images[:200], name, 5, seed=0)
            pool.corrupt(images[:200], name, 5, 0)
        same = all(torch.equal(pool.corrupt(images[:300], n, 5, 0), C.corrupt_dataset(images[:300], n, 5, seed=0))
                   for n in C.CORRUPTIONS)
        t = interleaved({"threads": lambda: [C.corrupt_dataset(images, n, 5, seed=0) for n in C.CORRUPTIONS],
                         "processes": lambda: [pool.corrupt(images, n, 5, 0) for n in C.CORRUPTIONS]}, repeats)
    finally:
        pool.close()
    print(f"- 15 corruptions x {len(images):,} images, {threads} workers: threads {t['threads']:.2f} s, forked "
          f"processes {t['processes']:.2f} s (ratio {t['processes'] / t['threads']:.2f}); identical images: {same}")


def switches(threads: int) -> None:
    """Voluntary context switches, user and system time of ``corrupt_dataset`` (15 corruptions) with 1 thread
    and with ``threads``, each in a fresh process (what earlier measurements left behind would count too):
    threads that wait for each other (a lock, an OpenMP barrier) sleep and are woken, and each sleep counts
    as one voluntary switch."""
    import subprocess
    import sys
    for count in (1, threads):
        out = subprocess.run([sys.executable, __file__, "--switches-child", str(count)], capture_output=True,
                             text=True, check=True).stdout.strip()
        print(f"- {count} thread(s): {out}")


def _switches_child(count: int) -> None:
    import resource
    torch.set_num_threads(count)
    images = np.load(Path(os.environ.get("TTA_DATA_DIR", ".")) / "cifar10_test.npz")["x"]
    for name in C.CORRUPTIONS:
        C.corrupt_dataset(images[:200], name, 5, seed=0)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for name in C.CORRUPTIONS:
        C.corrupt_dataset(images, name, 5, seed=0)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(f"{wall:.2f} s, {after.ru_nvcsw - before.ru_nvcsw:,} voluntary context switches, "
          f"user {after.ru_utime - before.ru_utime:.2f} s, system {after.ru_stime - before.ru_stime:.2f} s")


def npy_write(repeats: int) -> None:
    """One 10,000-image uint8 .npy: an array filled, then ``np.save``d, against filling a memory map of the
    file (what ``make_c`` does), in a temporary folder on disk."""
    folder = tempfile.mkdtemp()
    shape = (10000, 32, 32, 3)
    names = iter(range(10 ** 6))             # a new file every time, as make_c writes new temporary files

    def save():
        a = np.empty(shape, np.uint8)
        a.fill(7)
        np.save(os.path.join(folder, f"a{next(names)}.npy"), a)

    def memmap():
        m = np.lib.format.open_memmap(os.path.join(folder, f"m{next(names)}.npy"), mode="w+", dtype=np.uint8,
                                      shape=shape)
        m.fill(7)
        del m

    try:
        t = interleaved({"save": save, "memmap": memmap}, repeats)
    finally:
        shutil.rmtree(folder)
    print(f"- one 29 MiB .npy: array + np.save {t['save'] * 1e3:.1f} ms, memory map {t['memmap'] * 1e3:.1f} ms")


def make_c_io(source: str, repeats: int) -> None:
    from tta.data.make_c import make_c

    def to(folder: str):
        def run():
            out = tempfile.mkdtemp(dir=folder)
            try:
                make_c(source, out, severities=[5], progress=False)
            finally:
                shutil.rmtree(out)
        return run

    def compute_only():
        x = np.load(source)["x"]
        for name in C.CORRUPTIONS:
            C.corrupt_dataset(x, name, 5, seed=0)

    t = interleaved({"read + corrupt_dataset": compute_only, "make_c to disk": to(tempfile.gettempdir()),
                     "make_c to /dev/shm": to("/dev/shm")}, repeats)
    print("- " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("first-touch", "processes", "switches", "npy-write", "make-c"), default=None)
    p.add_argument("--switches-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.switches_child is not None:
        return _switches_child(args.switches_child)
    torch.set_num_threads(args.threads)
    source = str(Path(os.environ.get("TTA_DATA_DIR", ".")) / "cifar10_test.npz")
    images = np.load(source)["x"]
    print(f"{args.threads} threads, {args.repeats} repeats (median), load average {os.getloadavg()[0]:.1f}")
    if args.only in (None, "first-touch"):
        first_touch(args.repeats * 3)
    if args.only in (None, "processes"):
        processes(images, args.threads, args.repeats)
    if args.only in (None, "switches"):
        switches(args.threads)
    if args.only in (None, "npy-write"):
        npy_write(args.repeats * 3)
    if args.only in (None, "make-c"):
        make_c_io(source, args.repeats)
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
