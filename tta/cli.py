"""``tta`` command line: ``run`` a benchmark config, ``make-c`` corruption files, ``table`` over methods
and seeds, ``methods`` (what each method does and costs), ``demo`` (the offline quick start). Verbs live with their code and register themselves here."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import TTAError

# modules that provide register_cli(subparsers); a verb whose module is missing is simply not offered
VERB_MODULES = ("tta.data.make_c", "tta.eval.table", "tta.demo")


def _run(args) -> int:
    from .eval.report import format_table
    from .eval.runner import run_config, run_dir
    from . import config as config_mod
    cfg = config_mod.load(args.config, args.overrides)
    results = run_config(cfg)
    print(format_table(results))
    if cfg["output"]["save"]:
        print(f"\nwritten to {run_dir(cfg)}/ (config.yaml, results.json, results.csv, table.md)")
    return 0


def method_rows(requires=None):
    """One row per registered method: name, summary, what it adapts, cost, source data, model it needs."""
    from . import methods
    rows = []
    for name in methods.available():
        info = methods.info(name)
        if requires and info.requires != requires:
            continue
        rows.append([name, info.summary, info.adapts, str(info.cost), info.source_data or "-", info.requires])
    return rows


METHOD_HEADER = ["method", "summary", "adapts", "fwd / bwd per batch", "source data", "model"]


def _methods(args) -> int:
    rows = method_rows(args.requires)
    if args.markdown:
        print("| " + " | ".join(METHOD_HEADER) + " |\n|" + "---|" * len(METHOD_HEADER))
        print("\n".join("| `" + r[0] + "` | " + " | ".join(r[1:]) + " |" for r in rows))
        return 0
    for r in rows:
        print(f"{r[0]:<16}{r[1]}")
        print(f"{'':16}adapts: {r[2]}; fwd / bwd per batch: {r[3]}; model: {r[5]}"
              + (f"; source data: {r[4]}" if r[4] != "-" else ""))
    print(f"\n{len(rows)} methods. Costs count forwards and backwards in batches of B images (view methods: "
          "views per image); 'model: clip' needs tta.models.load('openclip:...'), 'timm_vit' a timm ViT.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta", description="Test-time adaptation toolkit")
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="run a benchmark config and print its per-domain error table")
    run.add_argument("config", help="YAML config (with _base_ inheritance)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.lr=0.0005 setting=continual")
    run.set_defaults(func=_run)
    listing = sub.add_parser("methods", help="list every method: summary, what it adapts, cost, source data")
    listing.add_argument("--requires", choices=("classifier", "clip", "timm_vit"), help="only methods for this model")
    listing.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    listing.set_defaults(func=_methods)
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except TTAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
