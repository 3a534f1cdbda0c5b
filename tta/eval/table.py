"""``tta table``: one protocol, a suite of methods, several seeds (and CoTTA orders), one table.

    tta table configs/cifar10c/base.yaml --methods source norm tent cotta --seeds 1 2 3 [--orders 10] \
        [--out DIR] [key=value ...]
    tta table configs/cifar10c/{source,tent,cotta}.yaml --seeds 1      # each config brings its method

Every (config, method, seed[, order]) cell is one :func:`tta.eval.runner.run_config` with overrides,
checkpointing into ``<out>/runs/<cell>/`` (so even a half-finished cell resumes) and, once finished,
saved atomically as ``<out>/cells/<cell>.json`` with the hash of its resolved config. A rerun reuses
every cell whose file exists with the same hash and computes only the rest, so a long table survives
interruptions and grows when methods or seeds are added.

Outputs: ``table.md`` and ``table.csv`` (rows = methods; columns = domains, or rounds when the protocol
has several, then the mean; "mean ± std" over seeds x orders; img/s) and ``errors.png`` (error per
batch along the stream, and per round for lifelong streams, averaged over the cells of a method).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import config as config_mod
from ..errors import ConfigError
from . import runner
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


def run_cell(cell: Cell, overrides: Sequence[str], out: Path) -> Dict[str, Any]:
    """The cell's results: from ``<out>/cells/`` when computed before with the same config, else run now."""
    cfg = config_mod.load(cell.config, cell.overrides(overrides))
    digest = runner.config_hash(cfg)
    path = out / "cells" / f"{cell.key}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config_hash") == digest:
            return saved["results"]
    results = runner.run_config(cfg, out_dir=out / "runs" / cell.key)
    write_atomic(path, json.dumps({"config_hash": digest, "cell": asdict(cell), "results": results}))
    return results


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


def summarise(cells: Sequence[Cell], results: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{row: {"columns": {name: [values over cells]}, "img_per_s": [...], "batch_errors": [...],
    "rounds": [[per-round means] per cell]}}`` in row order."""
    table: Dict[str, Dict[str, Any]] = {}
    for cell, res in zip(cells, results):
        row = table.setdefault(cell.row, {"columns": {}, "img_per_s": [], "peak_mb": [], "batch_errors": [],
                                          "rounds": []})
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
    for name, row in table.items():
        cells = [_mean_std(row["columns"][c]) if c in row["columns"] else "-" for c in cols]
        cells[-1] = f"**{cells[-1]}**"
        speed = f"{statistics.mean(row['img_per_s']):.0f}" if row["img_per_s"] else "-"
        peak = f"{max(row['peak_mb']):.0f}" if row["peak_mb"] else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {speed} | {peak} |")
    return "\n".join(lines)


def to_csv(table: Dict[str, Dict[str, Any]]) -> str:
    cols = column_names(table)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "cells", *[f for c in cols for f in (c, f"{c} std")], "img_per_s"])
    for name, row in table.items():
        values = []
        for c in cols:
            v = row["columns"].get(c, [])
            values += [f"{statistics.mean(v):.4f}" if v else "", f"{statistics.stdev(v):.4f}" if len(v) > 1 else ""]
        speed = f"{statistics.mean(row['img_per_s']):.1f}" if row["img_per_s"] else ""
        w.writerow([name, len(row["rounds"]), *values, speed])
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
              log=print) -> Dict[str, Any]:
    """Run (or reuse) every cell, then write table.md, table.csv and errors.png under ``out``."""
    if not configs:
        raise ConfigError("tta table needs at least one config file")
    if orders is not None and orders < 1:
        raise ConfigError(f"--orders must be a positive number of CoTTA orders (1..10), got {orders}")
    out = Path(out or Path("results") / f"table_{Path(configs[0]).stem}")
    cells = plan(configs, methods, seeds, orders)
    results = []
    for k, cell in enumerate(cells, 1):
        res = run_cell(cell, overrides, out)
        log(f"[{k}/{len(cells)}] {cell.key}: mean error {res['mean_error']:.2f}")
        results.append(res)
    table = summarise(cells, results)
    markdown = format_markdown(table)
    write_atomic(out / "table.md", markdown + "\n")
    write_atomic(out / "table.csv", to_csv(table))
    plot(table, out / "errors.png")
    return {"table": table, "markdown": markdown, "out": out}


def _parser():
    p = argparse.ArgumentParser(prog="tta table", usage="tta table CONFIG... [--methods M...] [--seeds S...] "
                                "[--orders N] [--out DIR] [key=value ...]",
                                description="Run methods x seeds (x CoTTA orders) over one protocol and write a "
                                "resumable table. Options and key=value overrides may follow the configs in any order.")
    p.add_argument("items", nargs="+", metavar="CONFIG_OR_OVERRIDE",
                   help="config files, and dotted key=value overrides applied to every cell")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: each config's own method)")
    p.add_argument("--seeds", nargs="+", default=None, help="seeds (default: each config's seed)")
    p.add_argument("--orders", type=int, default=None, help="average over CoTTA corruption orders 0..N-1")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/table_<config>)")
    return p


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
                orders=ns.orders, overrides=overrides, out=ns.out)


def _cli(args) -> int:
    result = run_table(**parse(args.argv))
    print(result["markdown"])
    print(f"\nwritten to {result['out']}/ (table.md, table.csv, errors.png, cells/)")
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
