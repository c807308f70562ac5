"""Shared statistics and output paths of the benchmark scripts.

Every timing is reported as its median with its spread (the range of the samples, and their count),
and every ratio divides the same statistic (the median) of both sides. Results go where ``--out``
says; by default under ``runs/benchmarks/`` (ignored by git), so a run never overwrites the tracked
tables in ``benchmarks/results/`` unless asked to (``--out benchmarks/results/bench_x.md``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


def default_out(name: str) -> str:
    """Default table path for benchmark ``name``: untracked, next to the training runs."""
    return str(REPO / "runs" / "benchmarks" / f"{name}.md")


def summary(values: Sequence[float]) -> dict:
    """Median, min, max and count of ``values``."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(values: Sequence[float], unit: str = "s", digits: int = 3) -> str:
    """``"0.717 s [0.702-0.731, n=5]"``: median, then the range of the samples and their count."""
    s = summary(values)
    if s["n"] == 1:
        return f"{s['median']:.{digits}f} {unit} [n=1]"
    return f"{s['median']:.{digits}f} {unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']}]"


def ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """median(a) / median(b): the same statistic on both sides."""
    return statistics.median(a) / statistics.median(b)


def write(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return path
