"""`orchestrator bench plan`: how long planning the curriculum (4 stages + LCNN) takes.

Each case plans stages/progressive.yaml from a cold estimate cache, without calibration,
writing nothing: the budget of the headline command (`plan --target-mem 20`) for the CPU
and for a GPU planned from a machine without one (CUDA autocast emulated), and the tight
CPU budget that `plan --verify` checks (4 GB). Figures: seconds per case, per stage of
the first case, and the number of step estimates each case ran.
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
        and `..._estimates` per case, `<stage>_s` for the first case.
    """
    import torch

    from orchestrator.bench_data import machine_info
    from orchestrator.planning import planner
    from orchestrator.planning.plan_file import PlanRequest, make_plan
    from orchestrator.training.step import estimation_step

    figures: dict[str, float] = {}
    for i, (device, gb) in enumerate(cases):
        planner.clear_estimate_cache()
        marks: list[tuple[str, float]] = []
        req = PlanRequest(curriculum=curriculum, target_mem_gb=gb, device=device,  # type: ignore[arg-type]
                          run="bench", calibrate=False)
        t0 = time.perf_counter()
        make_plan(req, estimation_step, progress=lambda name: marks.append((name, time.perf_counter())))
        end = time.perf_counter()
        name = f"plan_{device}_{gb:g}gb"
        figures[f"{name}_s"] = end - t0
        figures[f"{name}_estimates"] = planner.estimates_run()
        if i == 0:
            for (stage, start), (_n, stop) in zip(marks, [*marks[1:], ("", end)]):
                figures[f"{stage}_s"] = stop - start
    return {"bench": "plan", "machine": {**machine_info(torch.__version__),
                                         "curriculum": str(curriculum)},
            "figures": {k: round(float(v), 3) for k, v in figures.items()}}
