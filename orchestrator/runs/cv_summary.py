"""Cross-validation summaries: mean ± std over the folds of a K-fold run.

`status` adds one per stage (best validation Dice of each fold that got one), and
`evaluate --run RUN` one per metric (each fold's mean over its own validation subjects).
The std is the population std (ddof=0) over the folds, as in evaluate's reports.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator.runs import state as run_state


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """{"mean", "std", "n"} of the finite values (mean and std None when there are none)."""
    v = [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
    return {"mean": round(mean, 6), "std": round(std, 6), "n": len(v)}


def stage_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per submitted stage, over the fold rows of `status` ("fold<i>/<stage>"): best Dice
    mean ± std, and how many folds completed it."""
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("fold") is None or "/" not in r["name"]:
            continue
        by_stage.setdefault(r["name"].split("/", 1)[1], []).append(r)
    return {stage: {"best_dice": mean_std(_dice(r) for r in rs),
                    "completed": sum(r["state"] == run_state.COMPLETED for r in rs), "folds": len(rs)}
            for stage, rs in by_stage.items() if any(r["state"] != "NOT_SUBMITTED" for r in rs)}


def _dice(row: dict[str, Any]) -> float | None:
    d = row.get("best_dice")
    return float(d) if isinstance(d, (int, float)) and d >= 0 else None  # -1: no validation yet


def metric_summary(fold_reports: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Per metric, mean ± std over the folds of each fold's subject mean."""
    return {name: mean_std(rep["metrics"][name]["mean"] for rep in fold_reports
                           if name in rep.get("metrics", {}))
            for name in names}


def format_mean_std(summary: dict[str, Any], digits: int = 3) -> str:
    """"0.512 ± 0.031 (3 folds)", or "-" without values."""
    if summary.get("mean") is None:
        return "-"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} ({summary['n']} folds)"
