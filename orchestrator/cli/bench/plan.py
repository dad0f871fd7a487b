"""`orchestrator bench plan`: how long planning the curriculum (4 stages + LCNN) takes.

Each case plans stages/progressive.yaml from a cold estimate cache, without calibration,
writing nothing, at 4, 6, 20 and 80 GB, for the CPU and for a GPU planned from a machine
without one (CUDA autocast emulated): tight budgets walk far down each stage's ladder,
roomy ones grow the batch far. The stages are planned in parallel processes as `plan`
does (planning/pool.py). Figures: seconds per case, the estimates (training step and
validation) each case ran, the slowest case, and the worker processes.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from orchestrator.cli.bench.data import machine_info
from orchestrator.config import DEFAULT_CURRICULUM, DeviceName
from orchestrator.planning import estimator
from orchestrator.planning.plan_file import PlanRequest, make_plan
from orchestrator.planning.pool import default_workers
from orchestrator.training.step import estimation_step

CASES: tuple[tuple[DeviceName, float], ...] = tuple(
    (device, gb) for gb in (4.0, 6.0, 20.0, 80.0) for device in ("cpu", "cuda"))


def bench_plan(curriculum: Path = DEFAULT_CURRICULUM,
               cases: tuple[tuple[DeviceName, float], ...] = CASES) -> dict:
    """Time `make_plan` for each (device, budget GB) case.

    Returns:
        {"bench": "plan", "machine": {...}, "figures": {name: number}}: `plan_<device>_<gb>gb_s`
        and `..._estimates` per case, `slowest_case_s`, and `workers`.
    """
    figures: dict[str, float] = {}
    for device, gb in cases:
        estimator.clear_estimate_cache()
        req = PlanRequest(curriculum=curriculum, target_mem_gb=gb, device=device,
                          run="bench", calibrate=False)
        t0 = time.perf_counter()
        plan = make_plan(req, estimation_step)
        name = f"plan_{device}_{gb:g}gb"
        figures[f"{name}_s"] = time.perf_counter() - t0
        figures[f"{name}_estimates"] = estimator.estimates_run()
        figures["workers"] = default_workers(len(plan.stages))
    figures["slowest_case_s"] = max(v for k, v in figures.items() if k.endswith("gb_s"))
    return {"bench": "plan", "machine": {**machine_info(torch.__version__),
                                         "curriculum": str(curriculum)},
            "figures": {k: round(float(v), 3) for k, v in figures.items()}}
