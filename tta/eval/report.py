"""Reports: Markdown table, CSV and JSON of a run, written atomically (temp file, then rename)."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List

from .. import config as config_mod

CSV_FIELDS = ["round", "domain", "error", "ece", "nll", "brier", "n", "backward", "selected", "steps", "resets",
              "nonfinite", "seconds", "img_per_s"]
CALIBRATION = (("ece", "ECE %", 2), ("nll", "NLL", 3), ("brier", "Brier", 3))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def format_table(results: Dict[str, Any]) -> str:
    """Markdown: one row per round, one column per domain, then the mean, img/s and peak memory."""
    rows = results["domains"]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    rounds = sorted({r["round"] for r in rows})
    header = ["method", *(["round"] if len(rounds) > 1 else []), *domains, "mean", "img/s", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(r["round"], r["domain"]): r["error"] for r in rows}
    speed = results.get("img_per_s")
    for rd in rounds:
        errs = [by_key.get((rd, d)) for d in domains]
        vals = [f"{e:.2f}" if e is not None else "-" for e in errs]
        present = [e for e in errs if e is not None]
        cells = [results["method"], *([str(rd + 1)] if len(rounds) > 1 else []), *vals,
                 f"**{sum(present) / len(present):.2f}**", f"{speed:.0f}" if speed else "-",
                 f"{results['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + calibration_table(results, domains, rounds))


def calibration_table(results: Dict[str, Any], domains: List[str], rounds: List[int]) -> List[str]:
    """ECE (%), NLL and Brier score per domain and their mean, one row per metric and round."""
    rows = results["domains"]
    if not rows or "ece" not in rows[0]:
        return []
    header = ["method", *(["round"] if len(rounds) > 1 else []), "metric", *domains, "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rd in rounds:
        for key, label, digits in CALIBRATION:
            by_domain = {r["domain"]: r[key] for r in rows if r["round"] == rd}
            vals = [by_domain.get(d) for d in domains]
            present = [v for v in vals if v is not None]
            cells = [results["method"], *([str(rd + 1)] if len(rounds) > 1 else []), label,
                     *(f"{v:.{digits}f}" if v is not None else "-" for v in vals),
                     f"{sum(present) / len(present):.{digits}f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_csv(rows: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_outputs(out: Path, cfg: Dict[str, Any], results: Dict[str, Any]) -> None:
    write_atomic(out / "config.yaml", config_mod.dump(cfg))
    write_atomic(out / "results.csv", to_csv(results["domains"]))
    write_atomic(out / "table.md", format_table(results) + "\n")
    write_atomic(out / "results.json", json.dumps(results, indent=1))
