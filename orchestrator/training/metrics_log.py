"""metrics.csv (one row per epoch) and memory_usage.json, rewritten atomically."""
from __future__ import annotations

import csv
import io
import json
import resource
from pathlib import Path
from typing import Any

import torch

from orchestrator.atomic import atomic_write_text

GIB = 1024**3


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """Peak memory so far: allocated/reserved on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GIB, 3)}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mem_gb": round(rss_kb * 1024 / GIB, 3)}


class MetricsLog:
    """Keeps metrics.csv and memory_usage.json in step with the epochs trained."""

    def __init__(self, stage_dir: Path) -> None:
        self.csv_path = stage_dir / "metrics.csv"
        self.mem_path = stage_dir / "memory_usage.json"
        self.rows: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as fh:
            return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(fh)]

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs a requeued run will train again (written after last.pt)."""
        self.rows = [r for r in self.rows if int(r["epoch"]) <= epoch]
        self._flush()

    def write_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._flush()

    def val_dices(self, with_start: bool = False) -> list[float]:
        """Validation Dice per trained epoch (with_start: also the epoch-0 row of a hand-off)."""
        return [float(r["val_dice"]) for r in self.rows if r.get("val_dice") not in (None, "")
                and (with_start or int(r["epoch"]) > 0)]

    def _flush(self) -> None:
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, buf.getvalue())
        mem = [{k: r[k] for k in ("epoch", "peak_mem_gb", "peak_reserved_gb") if k in r}
               for r in self.rows]
        atomic_write_text(self.mem_path, json.dumps({"epochs": mem}, indent=2))


def _num(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v
