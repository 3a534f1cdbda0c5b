"""``tta`` command line: ``run`` a benchmark config, ``make-c`` corruption files, ``table`` over methods
and seeds, ``demo`` (the offline quick start). Verbs live with their code and register themselves here."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta", description="Test-time adaptation toolkit")
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="run a benchmark config and print its per-domain error table")
    run.add_argument("config", help="YAML config (with _base_ inheritance)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.lr=0.0005 setting=continual")
    run.set_defaults(func=_run)
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
