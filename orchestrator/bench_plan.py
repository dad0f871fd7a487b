"""`orchestrator bench plan`: how long planning the curriculum (4 stages + LCNN) takes.

Each case plans stages/progressive.yaml from a cold estimate cache, without calibration,
writing nothing: the budget of the headline command (`plan --target-mem 20`) for the CPU
and for a GPU planned from a machine without one (CUDA autocast emulated), and the tight
CPU budget that `plan --verify` checks (4 GB). The stages are planned in parallel
processes as `plan` does (planning/pool.py). Figures: seconds per case, the estimates
(training step and validation) each case ran, and the worker processes.
"""
from __future__ import annotations

import time
from pathlib import Path

from orchestrator.config import DEFAULT_CURRICULUM

CASES = (("cpu", 20.0), ("cuda", 20.0), ("cpu", 4.0))


def bench_plan(curriculum: Path = DEFAULT_CURRICULUM,
               cases: tuple[tuple[str, float], ...] = CASES) -> dict:
    """Time `make_plan` for each (device, budget GB) case.

    Returns:
        {"bench": "plan", "machine": {...}, "figures": {name: number}}: `plan_<device>_<gb>gb_s`
        and `..._estimates` per case, and `workers`.
    """
    import torch

    from orchestrator.bench_data import machine_info
    from orchestrator.planning import planner
    from orchestrator.planning.plan_file import PlanRequest, make_plan
    from orchestrator.planning.pool import default_workers
    from orchestrator.training.step import estimation_step

    figures: dict[str, float] = {}
    for device, gb in cases:
        planner.clear_estimate_cache()
        req = PlanRequest(curriculum=curriculum, target_mem_gb=gb, device=device,  # type: ignore[arg-type]
                          run="bench", calibrate=False)
        t0 = time.perf_counter()
        plan = make_plan(req, estimation_step)
        name = f"plan_{device}_{gb:g}gb"
        figures[f"{name}_s"] = time.perf_counter() - t0
        figures[f"{name}_estimates"] = planner.estimates_run()
        figures["workers"] = default_workers(len(plan.stages))
    return {"bench": "plan", "machine": {**machine_info(torch.__version__),
                                         "curriculum": str(curriculum)},
            "figures": {k: round(float(v), 3) for k, v in figures.items()}}
