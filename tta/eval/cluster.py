"""Backends that run table cells: ``local`` (one after the other, in this process), ``ray`` and ``slurm``
(submitit). A backend gets the cells still to compute and reports each :class:`~tta.eval.cells.Outcome` as
it arrives; cells write their own results (see :mod:`tta.eval.cells`), so the driver only collects small
dicts, and a cell that keeps failing is reported as failed while the others finish.

Ray and submitit are the optional extra ``pip install 'tta[cluster]'`` and are imported only here, only when
their backend runs, so ``import tta`` and ``tta table --backend local`` never load them.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from ..errors import ConfigError
from .cells import Outcome, Task, describe, execute

OnDone = Callable[[Outcome], None]
BACKENDS = ("local", "ray", "slurm")
DEFAULT_RETRIES = {"local": 0, "ray": 2, "slurm": 2}  # a crash on a cluster is often the node, not the cell
OPTIONS = {  # option -> the backends it applies to
    "retries": BACKENDS, "cpus_per_cell": ("ray", "slurm"), "gpus_per_cell": ("ray", "slurm"),
    "ray_address": ("ray",), "partition": ("slurm",), "time": ("slurm",), "array_parallelism": ("slurm",),
    "sbatch": ("slurm",), "slurm_folder": ("slurm",), "submitit_cluster": ("slurm",),
}


def _require(module: str, import_it: bool = True):
    """The engine's module, or one error naming the pip command (checked before any cell is resolved)."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--backend {'ray' if module == 'ray' else 'slurm'} needs the {module} package: "
                          f"pip install 'tta[cluster]' (or pip install {module})")
    return importlib.import_module(module) if import_it else None


def _ok(task: Task, done: Dict[str, Any], attempts: Optional[int]) -> Outcome:
    return Outcome(task.key, done["results"], None, attempts, done["seconds"], done["worker"])


class LocalBackend:
    """Cells in this process, in order; the per-image progress bar of each run is shown as before."""

    name = "local"
    cpus = None  # cells use the config's threads (torch's default when unset), as `tta run` does

    def __init__(self, retries: int = 0):
        self.retries = retries

    def run(self, tasks: Sequence[Task], on_done: OnDone) -> None:
        for task in tasks:
            for attempt in range(1, self.retries + 2):
                try:
                    done = execute(task)
                except Exception as e:  # noqa: BLE001 - any failure of a cell is reported, not raised
                    error = describe(e)
                    continue
                on_done(_ok(task, done, attempt))
                break
            else:
                on_done(Outcome(task.key, None, error, self.retries + 1))


class RayBackend:
    """One Ray task per cell. ``address=None`` starts a local cluster (stopped at the end) unless this process
    is already connected to one; Ray retries a task whose worker died (``kill -9``, a lost node) or that
    raised, ``retries`` times, and the cell resumes from its checkpoint."""

    name = "ray"

    def __init__(self, retries: int = 2, address: Optional[str] = None, cpus_per_cell: float = 1.0,
                 gpus_per_cell: float = 0.0):
        self.retries, self.address, self.cpus, self.gpus = retries, address, cpus_per_cell, gpus_per_cell

    def run(self, tasks: Sequence[Task], on_done: OnDone) -> None:
        ray = _require("ray")
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, logging_level="warning")
        try:
            remote = ray.remote(execute).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.retries,
                                                 retry_exceptions=True)
            pending = {remote.remote(task): task for task in tasks}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        done = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - Ray has retried it already
                        on_done(Outcome(task.key, None, describe(e), self.retries + 1))
                        continue
                    on_done(_ok(task, done, None))
        finally:
            if started:
                ray.shutdown()


class SlurmBackend:
    """One Slurm job per cell, submitted as a job array through submitit; a failed job is resubmitted up to
    ``retries`` times. ``cluster="local"`` runs the same jobs as processes on this machine (for testing)."""

    name = "slurm"

    def __init__(self, folder: Path, retries: int = 2, partition: Optional[str] = None, time: Optional[int] = None,
                 cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, array_parallelism: Optional[int] = None,
                 sbatch: Sequence[str] = (), cluster: str = "slurm", poll: Optional[float] = None):
        if gpus_per_cell != int(gpus_per_cell):
            raise ConfigError(f"--gpus-per-cell must be a whole number on Slurm, got {gpus_per_cell}")
        self.folder, self.retries, self.cluster, self.cpus = folder, retries, cluster, cpus_per_cell
        self.poll = poll if poll is not None else (10.0 if cluster == "slurm" else 0.5)
        self.params: Dict[str, Any] = {"name": "tta-table", "timeout_min": time or 60,
                                       "cpus_per_task": max(1, math.ceil(cpus_per_cell)),
                                       "gpus_per_node": int(gpus_per_cell)}
        if partition:
            self.params["slurm_partition"] = partition
        if array_parallelism:
            self.params["slurm_array_parallelism"] = array_parallelism
        if sbatch:
            self.params["slurm_additional_parameters"] = parse_sbatch(sbatch)

    def run(self, tasks: Sequence[Task], on_done: OnDone) -> None:
        submitit = _require("submitit")
        executor = submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster)
        executor.update_parameters(**self.params)
        with executor.batch():
            jobs = [executor.submit(execute, task) for task in tasks]
        pending = dict(zip(jobs, tasks))
        attempts = {task.key: 1 for task in tasks}
        while pending:
            for job, task in list(pending.items()):
                if not job.done():
                    continue
                del pending[job]
                try:
                    done = job.result()
                except Exception as e:  # noqa: BLE001 - the job failed, timed out or was cancelled
                    if attempts[task.key] <= self.retries:
                        attempts[task.key] += 1
                        pending[executor.submit(execute, task)] = task
                    else:
                        on_done(Outcome(task.key, None, describe(e), attempts[task.key]))
                    continue
                on_done(_ok(task, done, attempts[task.key]))
            if pending:
                time.sleep(self.poll)


def parse_sbatch(items: Sequence[str]) -> Dict[str, str]:
    """``--sbatch account=abc --sbatch=--qos=high`` -> ``{"account": "abc", "qos": "high"}`` (``#SBATCH`` lines)."""
    out = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not key:
            raise ConfigError(f"--sbatch takes KEY=VALUE (an sbatch option without its dashes), got {item!r}")
        out[key] = value if sep else True
    return out


def make_backend(name: str, out: Path, options: Dict[str, Any]):
    """The backend ``name`` with the options the user gave (None: not given); an option that belongs to
    another backend or a value out of range is a ConfigError."""
    if name not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    given = {k: v for k, v in options.items() if v not in (None, [], ())}
    wrong = [k for k in given if name not in OPTIONS[k]]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ConfigError(f"{flags} do(es) not apply to --backend {name}")
    retries = given.get("retries", DEFAULT_RETRIES[name])
    if retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {retries}")
    if given.get("cpus_per_cell", 1) <= 0 or given.get("gpus_per_cell", 0) < 0:
        raise ConfigError(f"--cpus-per-cell must be > 0 and --gpus-per-cell >= 0, got {given.get('cpus_per_cell')} "
                          f"and {given.get('gpus_per_cell')}")
    if name == "local":
        return LocalBackend(retries)
    _require("ray" if name == "ray" else "submitit", import_it=False)
    if name == "ray":
        return RayBackend(retries, given.get("ray_address"), given.get("cpus_per_cell", 1.0),
                          given.get("gpus_per_cell", 0.0))
    folder = Path(given.get("slurm_folder") or Path(out) / "slurm")
    return SlurmBackend(folder, retries, given.get("partition"), given.get("time"), given.get("cpus_per_cell", 1.0),
                        given.get("gpus_per_cell", 0.0), given.get("array_parallelism"), given.get("sbatch", ()),
                        given.get("submitit_cluster", "slurm"))

