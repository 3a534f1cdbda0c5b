"""``tta table``: one protocol, a suite of methods, several seeds (and CoTTA orders), one table.

    tta table configs/cifar10c/base.yaml --methods source norm tent cotta --seeds 1 2 3 [--orders 10] \
        [--out DIR] [key=value ...]
    tta table configs/cifar10c/{source,tent,cotta}.yaml --seeds 1      # each config brings its method

Every (config, method, seed[, order]) cell is one task (:mod:`tta.eval.cells`): one
:func:`tta.eval.runner.run_config` with overrides, checkpointing into ``<out>/runs/<cell>/`` (so even a
half-finished cell resumes) and, once finished, saved atomically as ``<out>/cells/<cell>.json`` with the hash
of its resolved config. A rerun reuses every cell whose file exists with the same hash and computes only the
rest, so a long table survives interruptions and grows when methods or seeds are added. The cells run on a
backend (:mod:`tta.eval.cluster`): ``--backend local`` (in order, in this process), ``ray`` or ``slurm``;
a cell that keeps failing is listed as failed under the table while the others finish.

Outputs: ``table.md`` and ``table.csv`` (rows = methods; columns = domains, or rounds when the protocol
has several, then the mean; "mean ± std" over seeds x orders; img/s) and ``errors.png`` (error per
batch along the stream, and per round for lifelong streams, averaged over the cells of a method).
"""
from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import config as config_mod
from ..errors import ConfigError
from . import runner
from .cells import Outcome, Task, load_finished
from .lock import FolderLock
from .report import write_atomic


@dataclass(frozen=True)
class Cell:
    row: str
    config: str
    method: Optional[str]  # None: the config's own method
    seed: Optional[int]  # None: the config's own seed
    order: Optional[int]

    @property
    def key(self) -> str:
        parts = [self.row.replace(" ", "_").replace("/", "_")]
        parts += [f"seed{self.seed}"] if self.seed is not None else []
        parts += [f"order{self.order}"] if self.order is not None else []
        return "__".join(parts)

    def overrides(self, user: Sequence[str]) -> List[str]:
        """Method first (a new method starts from its own defaults), then the user's, then the cell's."""
        out = [f"method.name={self.method}"] if self.method else []
        out += list(user)
        out += [f"seed={self.seed}"] if self.seed is not None else []
        out += [f"stream.order={self.order}"] if self.order is not None else []
        return out + ["output.save=true"]


def plan(configs: Sequence[str], methods: Optional[Sequence[str]], seeds: Optional[Sequence[int]],
         orders: Optional[int]) -> List[Cell]:
    """The cells, row-major. Rows are named by method; a name used by two configs gets the config's stem."""
    pairs = [(c, m) for c in configs for m in (methods or [None])]
    names = [m or config_mod.load(c)["method"]["name"] for c, m in pairs]
    rows = [n if names.count(n) == 1 else f"{n} ({Path(c).stem})" for n, (c, _) in zip(names, pairs)]
    return [Cell(row, c, m, s, o) for row, (c, m) in zip(rows, pairs)
            for s in (seeds or [None]) for o in (range(orders) if orders else [None])]


def make_task(cell: Cell, overrides: Sequence[str], out: Path, backend) -> Task:
    """The cell resolved here, in the driver (config errors surface before any work is handed out)."""
    cfg = config_mod.load(cell.config, cell.overrides(overrides))
    from .loggers import default_uris
    options = default_uris(cfg)  # a worker may start in another folder: ./mlruns is the driver's
    if options is not None:
        cfg["output"]["logger_options"] = options
    return Task(cell.key, cfg, runner.config_hash(cfg), str(out), asdict(cell),
                threads=max(1, int(backend.cpus)) if backend.cpus else None, quiet=backend.name != "local")


def _columns(results: Dict[str, Any]) -> Dict[str, float]:
    """Per-domain errors for a single-round stream, per-round mean errors otherwise; then the mean."""
    if len(results["rounds"]) > 1:
        cols = {f"round {r['round'] + 1}": r["mean_error"] for r in results["rounds"]}
    else:
        cols = {r["domain"]: r["error"] for r in results["domains"]}
    return {**cols, "mean": results["mean_error"]}


def _mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarise(cells: Sequence[Cell], results: Sequence[Optional[Dict[str, Any]]],
              errors: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, Any]]:
    """``{row: {"columns": {name: [values over cells]}, "img_per_s": [...], "batch_errors": [...],
    "rounds": [[per-round means] per cell], "failed": [(cell key, error)]}}`` in row order; a failed cell
    has ``None`` results and its error in ``errors``."""
    table: Dict[str, Dict[str, Any]] = {}
    for cell, res in zip(cells, results):
        row = table.setdefault(cell.row, {"columns": {}, "img_per_s": [], "peak_mb": [], "batch_errors": [],
                                          "rounds": [], "failed": []})
        if res is None:
            row["failed"].append((cell.key, (errors or {}).get(cell.key, "failed")))
            continue
        for name, value in _columns(res).items():
            row["columns"].setdefault(name, []).append(value)
        if res.get("img_per_s"):
            row["img_per_s"].append(res["img_per_s"])
        if res.get("peak_memory_mb") is not None:
            row["peak_mb"].append(res["peak_memory_mb"])
        row["batch_errors"].append(res.get("batch_errors", []))
        row["rounds"].append([r["mean_error"] for r in res["rounds"]])
    return table


def column_names(table: Dict[str, Dict[str, Any]]) -> List[str]:
    names = list(dict.fromkeys(n for row in table.values() for n in row["columns"] if n != "mean"))
    return names + ["mean"]


def format_markdown(table: Dict[str, Dict[str, Any]]) -> str:
    cols = column_names(table)
    lines = ["| method | " + " | ".join(cols) + " | img/s | peak MB |", "|---" * (len(cols) + 3) + "|"]
    failed = [item for row in table.values() for item in row.get("failed", [])]
    for name, row in table.items():
        if not row["columns"]:
            lines.append(f"| {name} | " + " | ".join(["failed"] * len(cols)) + " | - | - |")
            continue
        cells = [_mean_std(row["columns"][c]) if c in row["columns"] else "-" for c in cols]
        cells[-1] = f"**{cells[-1]}**"
        speed = f"{statistics.mean(row['img_per_s']):.0f}" if row["img_per_s"] else "-"
        peak = f"{max(row['peak_mb']):.0f}" if row["peak_mb"] else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {speed} | {peak} |")
    if failed:
        lines += ["", "Failed cells (not in the numbers above; rerun the same command to retry them):"]
        lines += [f"- `{key}`: {error}" for key, error in failed]
    return "\n".join(lines)


def to_csv(table: Dict[str, Dict[str, Any]]) -> str:
    cols = column_names(table)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "cells", *[f for c in cols for f in (c, f"{c} std")], "img_per_s", "failed"])
    for name, row in table.items():
        values = []
        for c in cols:
            v = row["columns"].get(c, [])
            values += [f"{statistics.mean(v):.4f}" if v else "", f"{statistics.stdev(v):.4f}" if len(v) > 1 else ""]
        speed = f"{statistics.mean(row['img_per_s']):.1f}" if row["img_per_s"] else ""
        w.writerow([name, len(row["rounds"]), *values, speed, len(row.get("failed", []))])
    return buf.getvalue()


def _mean_curve(curves: List[List[float]]) -> List[float]:
    n = min(len(c) for c in curves)
    return [statistics.mean(c[i] for c in curves) for i in range(n)]


def plot(table: Dict[str, Dict[str, Any]], path: Path) -> None:
    """Error per batch along the stream (mean over a method's cells, smoothed over 5 batches) and,
    for multi-round streams, mean error per round."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {name: row for name, row in table.items() if row["rounds"]}  # rows whose every cell failed: no curve
    if not table:
        return
    rounds = max(len(r) for row in table.values() for r in row["rounds"])
    fig, axes = plt.subplots(1, 2 if rounds > 1 else 1, figsize=(14 if rounds > 1 else 9, 4), squeeze=False)
    ax = axes[0][0]
    for name, row in table.items():
        curve = _mean_curve(row["batch_errors"])
        smooth = [statistics.mean(curve[max(0, i - 4): i + 1]) for i in range(len(curve))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=name, linewidth=1)
    ax.set(xlabel="batch along the stream", ylabel="error % (5-batch moving mean)", title="error along the stream")
    ax.legend(fontsize=8)
    if rounds > 1:
        ax = axes[0][1]
        for name, row in table.items():
            curve = _mean_curve(row["rounds"])
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
        ax.set(xlabel="round", ylabel="mean error %", title="error per round")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def run_table(configs: Sequence[str], methods: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
              orders: Optional[int] = None, overrides: Sequence[str] = (), out: Optional[Path] = None,
              log=None, backend: str = "local", backend_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run (or reuse) every cell on ``backend``, then write table.md, table.csv and errors.png under ``out``.
    ``log`` gets one line per cell (default: printed above the progress bar)."""
    if not configs:
        raise ConfigError("tta table needs at least one config file")
    if orders is not None and orders < 1:
        raise ConfigError(f"--orders must be a positive number of CoTTA orders (1..10), got {orders}")
    from .cluster import make_backend
    out = Path(out or Path("results") / f"table_{Path(configs[0]).stem}").resolve()  # workers may start elsewhere
    engine = make_backend(backend, out, backend_options or {})
    cells = plan(configs, methods, seeds, orders)
    tasks = [make_task(cell, overrides, out, engine) for cell in cells]
    results: Dict[str, Optional[Dict[str, Any]]] = {t.key: load_finished(out, t.key, t.digest) for t in tasks}
    errors: Dict[str, str] = {}
    todo = [t for t in tasks if results[t.key] is None]
    bar = _cell_bar(len(tasks), len(tasks) - len(todo), engine.name, all(t.cfg["progress"] for t in tasks))
    say = log or bar.write
    finished = [t.key for t in tasks if results[t.key] is not None]
    for k, key in enumerate(finished, 1):
        say(f"[{k}/{len(tasks)}] {key}: mean error {results[key]['mean_error']:.2f} (saved)")

    def on_done(outcome: Outcome) -> None:
        bar.update(1)
        finished.append(outcome.key)
        position = f"[{len(finished)}/{len(tasks)}] {outcome.key}"
        if outcome.results is None:
            tries = outcome.attempts
            errors[outcome.key] = outcome.error + (f" ({tries} attempt{'s' * (tries > 1)})" if tries else "")
            bar.set_postfix(failed=len(errors))
            say(f"{position}: FAILED: {errors[outcome.key]}")
        else:
            results[outcome.key] = outcome.results
            say(f"{position}: mean error {outcome.results['mean_error']:.2f}")

    try:
        if todo:  # nothing to hand out: no cluster is started, no job submitted
            engine.run(todo, on_done)
    finally:
        bar.close()
    table = summarise(cells, [results[t.key] for t in tasks], errors)
    markdown = format_markdown(table)
    with FolderLock(out, wait=60):  # two drivers of one table: one writes at a time (cells lock their own folders)
        write_atomic(out / "table.md", markdown + "\n")
        write_atomic(out / "table.csv", to_csv(table))
        plot(table, out / "errors.png")
    return {"table": table, "markdown": markdown, "out": out, "failed": errors}


def _cell_bar(total: int, done: int, backend: str, show: bool):
    """The progress bar over cells (every backend); cells already saved count as done."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=done, unit="cell", desc=f"table ({backend})", disable=not show,
                dynamic_ncols=True, file=sys.stderr)


def _parser():
    p = argparse.ArgumentParser(prog="tta table", usage="tta table CONFIG... [--methods M...] [--seeds S...] "
                                "[--orders N] [--out DIR] [--backend local|ray|slurm ...] [key=value ...]",
                                description="Run methods x seeds (x CoTTA orders) over one protocol and write a "
                                "resumable table. Options and key=value overrides may follow the configs in any order.")
    p.add_argument("items", nargs="+", metavar="CONFIG_OR_OVERRIDE",
                   help="config files, and dotted key=value overrides applied to every cell")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: each config's own method)")
    p.add_argument("--seeds", nargs="+", default=None, help="seeds (default: each config's seed)")
    p.add_argument("--orders", type=int, default=None, help="average over CoTTA corruption orders 0..N-1")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/table_<config>)")
    b = p.add_argument_group("backend (each cell is one task; workers need the output folder and the data on a "
                             "shared file system, or generate the corruptions themselves)")
    b.add_argument("--backend", choices=("local", "ray", "slurm"), default="local",
                   help="local: one cell after the other here; ray: Ray tasks; slurm: Slurm jobs via submitit")
    b.add_argument("--retries", metavar="N", type=int, default=None,
                   help="attempts after the first for a failing cell (default 0 local, 2 ray/slurm)")
    b.add_argument("--cpus-per-cell", metavar="N", type=float, default=None,
                   help="CPUs per cell, fractions allowed on ray (default 1; also its torch threads unless threads=)")
    b.add_argument("--gpus-per-cell", metavar="N", type=float, default=None,
                   help="GPUs per cell, fractions allowed on ray (default 0)")
    b.add_argument("--ray-address", metavar="ADDRESS", default=None,
                   help="ray.init address (default: a local cluster for this table)")
    b.add_argument("--partition", metavar="NAME", default=None, help="slurm partition")
    b.add_argument("--time", metavar="MINUTES", type=int, default=None,
                   help="slurm time limit per cell in minutes (default 60)")
    b.add_argument("--array-parallelism", metavar="N", type=int, default=None, help="slurm: cells running at once")
    b.add_argument("--sbatch", action="append", default=None, metavar="KEY=VALUE",
                   help="extra sbatch option, repeatable (--sbatch account=abc --sbatch qos=high)")
    b.add_argument("--slurm-folder", metavar="DIR", type=Path, default=None,
                   help="submitit logs and pickles (default OUT/slurm)")
    b.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"), default=None,
                   help="submitit executor: slurm, or local/debug to run the jobs on this machine")
    return p


BACKEND_FLAGS = ("retries", "cpus_per_cell", "gpus_per_cell", "ray_address", "partition", "time", "array_parallelism",
                 "sbatch", "slurm_folder", "submitit_cluster")


def parse(argv: Sequence[str]) -> Dict[str, Any]:
    """Arguments of ``tta table``; a key=value caught by --methods/--seeds is an override too."""
    parser = _parser()
    ns = parser.parse_intermixed_args(list(argv))
    words = ns.items + (ns.methods or []) + (ns.seeds or [])
    overrides = [w for w in words if "=" in w]
    configs = [w for w in ns.items if "=" not in w]
    seeds = [w for w in ns.seeds or [] if "=" not in w]
    if not configs:
        parser.error("give at least one config file")
    try:
        seeds = [int(s) for s in seeds] or None
    except ValueError:
        parser.error(f"--seeds takes integers, got {seeds}")
    return dict(configs=configs, methods=[m for m in ns.methods or [] if "=" not in m] or None, seeds=seeds,
                orders=ns.orders, overrides=overrides, out=ns.out, backend=ns.backend,
                backend_options={k: getattr(ns, k) for k in BACKEND_FLAGS})


def _cli(args) -> int:
    result = run_table(**parse(args.argv))
    print(result["markdown"])
    print(f"\nwritten to {result['out']}/ (table.md, table.csv, errors.png, cells/)")
    if result["failed"]:
        print(f"error: {len(result['failed'])} cell(s) failed (listed under the table); rerun the same command to "
              "retry them, finished cells are kept", file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers) -> None:
    """The verb takes its arguments as one list parsed by :func:`parse`, because argparse's subcommands
    cannot mix options and trailing key=value overrides (``... --out DIR method.lr=0.01``)."""
    inner = _parser()
    p = subparsers.add_parser("table", help="run methods x seeds (x CoTTA orders) over one protocol; resumable table",
                              usage=inner.format_usage().replace("usage: ", ""), description=inner.format_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_cli)
