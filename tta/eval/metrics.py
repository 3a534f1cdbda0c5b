"""Error bookkeeping along a stream: wrong/total per (round, domain), plus the adapter's counters."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import torch


class ErrorAccumulator:
    """Counts arg-max errors per (round, domain index) and per batch (for plots along the stream)."""

    def __init__(self):
        self.wrong: Dict[Tuple[int, int], int] = defaultdict(int)
        self.total: Dict[Tuple[int, int], int] = defaultdict(int)
        self.counters: Dict[Tuple[int, int], Counter] = defaultdict(Counter)
        self.seconds: Dict[Tuple[int, int], float] = defaultdict(float)
        self.batch_errors: List[float] = []

    def update(self, logits: torch.Tensor, y: torch.Tensor, domain: torch.Tensor, round_: int,
               counter_delta: Dict[str, int], seconds: float) -> None:
        wrong = (logits.argmax(1).cpu() != y.cpu())
        domain = domain.cpu()
        self.batch_errors.append(100.0 * float(wrong.float().mean()))
        ids = domain.unique().tolist()
        for d in ids:
            sel = domain == d
            self.wrong[(round_, d)] += int(wrong[sel].sum())
            self.total[(round_, d)] += int(sel.sum())
        main = (round_, int(domain[0]))  # counters and time go to the batch's first domain
        for k, v in counter_delta.items():
            self.counters[main][k] += v
        self.seconds[main] += seconds

    def rows(self, domain_names: List[str]) -> List[dict]:
        out = []
        for key in sorted(self.total):
            r, d = key
            n = self.total[key]
            sec = self.seconds.get(key, 0.0)
            out.append({"round": r, "domain": domain_names[d], "error": 100.0 * self.wrong[key] / n, "n": n,
                        "backward": self.counters[key].get("backward", 0),
                        "selected": self.counters[key].get("selected", 0),
                        "steps": self.counters[key].get("steps", 0),
                        "resets": self.counters[key].get("resets", 0),
                        "nonfinite": self.counters[key].get("nonfinite", 0),
                        "seconds": sec, "img_per_s": n / sec if sec > 0 else None})
        return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
