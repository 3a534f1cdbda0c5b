"""Experiment trackers for a run: ``output.loggers: [tensorboard, wandb, mlflow]`` (any subset).

Each tracker receives the same things: the resolved config at the start; after every stream segment the
online error of each batch of it (``online/batch_error``, step = batch index along the stream), the running
mean (``online/mean_error``) and the segment's throughput (``speed/img_per_s``); at the end every numeric
field of every per-domain row (``domain/<field>/<domain>``, step = round: error, ECE or any metric the
evaluator adds), the per-round mean (``round/mean_error``) and every numeric top-level result
(``summary/<name>``: mean error, img/s, peak memory, ...). A run resumed from a checkpoint logs the
segments it computes, with the same batch steps, so the curves of both processes line up.

Options (``output.logger_options.<logger>.<option>``):

- tensorboard: ``dir`` (default ``<run folder>/tensorboard``).
- wandb: ``project`` (tta), ``entity``, ``group``, ``tags``, ``name`` (the run's name), ``dir`` (the run
  folder), ``mode``: ``offline`` unless set here or by ``WANDB_MODE`` (``wandb sync`` uploads later).
- mlflow: ``tracking_uri``: else ``MLFLOW_TRACKING_URI``, else a file store in ``./mlruns`` of the current
  folder; ``experiment`` (tta); ``run_name`` (the run's name).

The packages are optional (``pip install 'tta[loggers]'``) and imported only when a tracker is opened;
a missing one is a :class:`~tta.errors.ConfigError` naming the pip command.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ConfigError

LOGGERS: Dict[str, Sequence[str]] = {
    "tensorboard": ("dir",),
    "wandb": ("project", "entity", "group", "tags", "name", "dir", "mode"),
    "mlflow": ("tracking_uri", "experiment", "run_name"),
}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_options(names: Any, options: Any) -> None:
    """``output.loggers`` names and ``output.logger_options`` keys; no package is imported here."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"output.loggers must be a list of names from {list(LOGGERS)}, got {names!r}")
    bad = [n for n in names if n not in LOGGERS]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"output.loggers must name each of {', '.join(LOGGERS)} at most once, got {names!r}")
    for name, opts in options.items():
        if name not in LOGGERS or not isinstance(opts, dict):
            raise ConfigError(f"output.logger_options must map logger names ({', '.join(LOGGERS)}) to option "
                              f"mappings, got {name!r}: {opts!r}")
        unknown = sorted(set(opts) - set(LOGGERS[name]))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} in output.logger_options.{name}; "
                              f"allowed: {', '.join(LOGGERS[name])}")


def _require(name: str) -> None:
    package = PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"output.loggers includes {name}, but the {package} package is not installed: "
                          f"pip install 'tta[loggers]' (or pip install {package})")


def _numbers(mapping: Dict[str, Any], skip=()) -> Dict[str, float]:
    return {k: float(v) for k, v in mapping.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Tracker:
    """Per-round and summary numbers default to scalars at the round's step and the last batch's step."""

    def scalars(self, values: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def rounds(self, by_round: Dict[int, Dict[str, float]]) -> None:
        for r, values in sorted(by_round.items()):
            self.scalars(values, r)

    def summary(self, values: Dict[str, float], step: int) -> None:
        self.scalars(values, step)


class TensorBoard(_Tracker):
    def __init__(self, cfg, folder: Path, options):
        from torch.utils.tensorboard import SummaryWriter
        from .. import config as config_mod
        self.writer = SummaryWriter(log_dir=str(options.get("dir") or folder / "tensorboard"))
        self.writer.add_text("config", "```yaml\n" + config_mod.dump(cfg) + "```", 0)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandB(_Tracker):
    """wandb's steps only grow, so per-round numbers get their own x axis (``round``) after the batches."""

    def __init__(self, cfg, folder: Path, options):
        import wandb
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=options.get("project", "tta"), entity=options.get("entity"),
                              group=options.get("group"), tags=options.get("tags"),
                              name=options.get("name") or cfg["output"]["run_name"] or cfg["name"],
                              dir=str(options.get("dir") or folder), config=cfg,
                              mode=options.get("mode") or os.environ.get("WANDB_MODE") or "offline",
                              settings=wandb.Settings(silent=True, console="off"))

    def scalars(self, values: Dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def rounds(self, by_round: Dict[int, Dict[str, float]]) -> None:
        self.run.define_metric("round")
        for prefix in ("domain/*", "round/*"):
            self.run.define_metric(prefix, step_metric="round")
        for r, values in sorted(by_round.items()):
            self.run.log({**values, "round": r})

    def summary(self, values: Dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MLflow(_Tracker):
    def __init__(self, cfg, folder: Path, options):
        uri = options.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks for opting in to file stores
        from mlflow import MlflowClient
        from .. import config as config_mod
        self.client = MlflowClient(tracking_uri=uri)
        name = options.get("experiment", "tta")
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except Exception:  # created by a parallel cell meanwhile
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = exp.experiment_id
        run_name = options.get("run_name") or cfg["output"]["run_name"] or cfg["name"]
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        from mlflow.entities import Param
        params = [Param(k, str(v)[:500]) for k, v in _flatten(cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, config_mod.dump(cfg), "config.yaml")

    def scalars(self, values: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _flatten(node: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The run's open trackers (possibly none); a context manager that closes them, marked failed on error."""

    def __init__(self, trackers: List[Any]):
        self.trackers = trackers
        self._batches, self._images, self._elapsed, self._error_sum = 0, 0, 0.0, 0.0

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, *_) -> None:
        for t in self.trackers:
            t.close(ok=exc_type is None)

    def begin(self, acc, elapsed: float) -> None:
        """Where the stream stands when this process starts (later than zero when resuming)."""
        self._batches, self._images, self._elapsed = len(acc.batch_errors), sum(acc.total.values()), elapsed
        self._error_sum = sum(acc.batch_errors)

    def segment(self, acc, elapsed: float) -> None:
        """Log the batches fed since the last call and their throughput."""
        if not self.trackers:
            return
        errors = acc.batch_errors
        for step in range(self._batches, len(errors)):
            self._error_sum += errors[step]
            self._log({"online/batch_error": errors[step], "online/mean_error": self._error_sum / (step + 1)}, step)
        images = sum(acc.total.values())
        if elapsed > self._elapsed and len(errors) > self._batches:
            self._log({"speed/img_per_s": (images - self._images) / (elapsed - self._elapsed)}, len(errors) - 1)
        self._batches, self._images, self._elapsed = len(errors), images, elapsed

    def finish(self, results: Dict[str, Any]) -> None:
        """Per-domain metrics (every numeric field of the rows), per-round means and the summary numbers."""
        if not self.trackers:
            return
        by_round: Dict[int, Dict[str, float]] = {}
        for row in results["domains"]:
            values = by_round.setdefault(row["round"], {})
            values.update({f"domain/{k}/{row['domain']}": v for k, v in _numbers(row, skip=("round",)).items()})
        for r in results.get("rounds", []):
            by_round.setdefault(r["round"], {})["round/mean_error"] = r["mean_error"]
        by_round = {r: _finite(values) for r, values in by_round.items()}
        summary = _finite({f"summary/{k}": v for k, v in _numbers(results, skip=("seed",)).items()})
        last = max(len(results.get("batch_errors", [])) - 1, 0)
        for t in self.trackers:
            t.rounds(by_round)
            t.summary(summary, last)

    def _log(self, values: Dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.scalars(_finite(values), step)


def _finite(values: Dict[str, float]) -> Dict[str, float]:
    return {k: v for k, v in values.items() if not math.isnan(v)}


def open_trackers(cfg: Dict[str, Any], folder: Path) -> Trackers:
    """The trackers named in ``cfg.output.loggers``, writing next to the run's results in ``folder``."""
    names = cfg["output"]["loggers"]
    for name in names:
        _require(name)
    options = cfg["output"]["logger_options"]
    opened: List[Any] = []
    try:
        for name in names:
            opened.append(TRACKERS[name](cfg, Path(folder), options.get(name, {})))
    except BaseException:
        for t in opened:
            t.close(ok=False)
        raise
    return Trackers(opened)


def default_uris(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``logger_options`` with cwd-relative defaults made absolute, for workers that start elsewhere."""
    if "mlflow" not in cfg["output"]["loggers"]:
        return None
    options = {k: dict(v) for k, v in cfg["output"]["logger_options"].items()}
    mlflow = options.setdefault("mlflow", {})
    if not mlflow.get("tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow["tracking_uri"] = Path("mlruns").resolve().as_uri()
    return options
