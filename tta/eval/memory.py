"""Peak memory of a block of work: resident set above the level at entry (CPU, sampled by a thread),
or the CUDA allocator's peak above the allocation at entry."""
from __future__ import annotations

import threading
import time

import torch


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.peak`` in MiB."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self.peak = torch.device(device), interval, 0.0

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2 ** 20

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            self.base, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2 ** 20 - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)
