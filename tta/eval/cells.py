"""One table cell as a self-contained task that any backend can run anywhere (this process, a Ray worker,
a Slurm job): everything it needs travels in a small :class:`Task` (the resolved config, a few paths), and
everything it produces is written by the cell itself, atomically, under the table folder:

    <out>/runs/<key>/    the runner's checkpoint and outputs (a half-finished cell resumes from it)
    <out>/cells/<key>.json    the finished cell: its results and the hash of its config

The images are never shipped: the worker reads them from ``data.data_dir`` / ``TTA_DATA_DIR`` (a shared
file system) or generates the corruptions itself, which is deterministic by seed. The cell holds the lock of
its run folder while it checks for a finished result and computes, so two drivers (or a retried task that
overlaps a slow one) never compute the same cell at once: the second one waits and then reuses the result.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from . import runner
from .lock import HOST, FolderLock
from .report import write_atomic


@dataclass(frozen=True)
class Task:
    key: str
    cfg: Dict[str, Any]  # resolved config (a few kB)
    digest: str  # runner.config_hash(cfg)
    out: str  # absolute table folder, on a file system the worker shares
    cell: Dict[str, Any]  # the Cell as a dict, recorded with the results
    threads: Optional[int] = None  # torch threads when the config leaves them open (the cell's CPU share)
    quiet: bool = False  # no per-image progress bar (a worker's output is a log, not a terminal)


@dataclass
class Outcome:
    key: str
    results: Optional[Dict[str, Any]]  # None: failed
    error: Optional[str] = None
    attempts: Optional[int] = None  # None where the engine does not say (Ray retries on its own)
    seconds: float = 0.0  # wall time inside the worker
    worker: str = ""  # host:pid that computed it ("" when reused)


def cell_file(out, key: str) -> Path:
    return Path(out) / "cells" / f"{key}.json"


def load_finished(out, key: str, digest: str) -> Optional[Dict[str, Any]]:
    """The saved results of a cell computed before with the same config, else None."""
    path = cell_file(out, key)
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["results"] if saved.get("config_hash") == digest else None


def execute(task: Task) -> Dict[str, Any]:
    """Compute (or reuse) one cell; returns ``{"results", "seconds", "worker"}``. Raises on failure, so that
    the engine can retry it."""
    t0, started = time.perf_counter(), time.time()
    if task.threads and not task.cfg["threads"]:
        import torch
        torch.set_num_threads(task.threads)
    cfg = dict(task.cfg, progress=False) if task.quiet else task.cfg
    folder = Path(task.out) / "runs" / task.key
    with FolderLock(folder, wait=task.cfg["output"]["lock_wait"]):  # None: wait while the holder lives
        results = load_finished(task.out, task.key, task.digest)
        worker = ""
        if results is None:
            results = runner.run_config(cfg, out_dir=folder)
            worker = f"{HOST}:{os.getpid()}"
            record = {"config_hash": task.digest, "cell": task.cell, "results": results, "worker": worker,
                      "started": started, "seconds": time.perf_counter() - t0}
            write_atomic(cell_file(task.out, task.key), json.dumps(record))
    return {"results": results, "seconds": time.perf_counter() - t0, "worker": worker}


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Held)\b.*")


def describe(error: BaseException) -> str:
    """One line for the table: the original exception under the engine's wrapper (Ray keeps it as ``cause``,
    submitit only as the text of the worker's traceback)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Traceback" in text:
        matches = [ln for ln in lines if _ERROR_LINE.match(ln)]
        if matches:
            return matches[-1][:300]
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first}"[:300]
