"""`orchestrator bench plan`: how long planning the curriculum (4 stages + LCNN) takes.

Each case plans stages/progressive.yaml from a cold estimate cache, without calibration,
writing nothing, at 4, 6, 20 and 80 GB, for the CPU and for a GPU planned from a machine
without one (CUDA autocast emulated): tight budgets walk far down each stage's ladder,
roomy ones grow the batch far. The stages are planned in parallel processes as `plan`
does (planning/pool.py).

Each case runs in a fresh Python process, as a user's `orchestrator plan` does: cases run
one after another in one process got faster as they went (imports, torch's lazy
initialisation and the workers' first fake tensors paid once). Figures per case: the
planning's seconds inside that process (`_s`), the whole process's seconds from start to
exit (`_process_s`: interpreter, imports, planning), the estimates it ran (training step
and validation); then the slowest of each and the worker processes.

`python -m orchestrator.cli.bench.plan --device cpu --gb 4 [--curriculum FILE]` plans one
case and prints its figures as JSON (what each fresh process runs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.cli.bench.data import machine_info
from orchestrator.config import DEFAULT_CURRICULUM, DeviceName
from orchestrator.errors import OrchestratorError
from orchestrator.plan_facts import GpuOption
from orchestrator.planning import estimator
from orchestrator.planning.plan_file import PlanRequest, make_plan
from orchestrator.planning.pool import default_workers
from orchestrator.training.step import estimation_step

CASES: tuple[tuple[DeviceName, float], ...] = tuple(
    (device, gb) for gb in (4.0, 6.0, 20.0, 80.0) for device in ("cpu", "cuda"))
TYPE_CASES: tuple[tuple[float, ...], ...] = ((16.0, 40.0, 80.0),)  # mixed-GPU: the types' GB
CASE_TIMEOUT_S = 900  # a case over this is a hang, not a slow plan


def plan_case(curriculum: Path, device: DeviceName, gb: float,
              types: tuple[float, ...] = ()) -> dict[str, float]:
    """Plan `curriculum` for `device` at `gb` (or for GPU types of `types` GB, placing each
    stage) from a cold estimate cache, writing nothing: {"s": seconds, "estimates":
    estimates run, "workers": worker processes}."""
    estimator.clear_estimate_cache()
    options = tuple(GpuOption(f"gpu{t:g}g", t) for t in types)
    req = PlanRequest(curriculum=curriculum, target_mem_gb=None if types else gb,
                      device="cuda" if types else device, run="bench", calibrate=False,
                      gpu_options=options)
    t0 = time.perf_counter()
    plan = make_plan(req, estimation_step)
    return {"s": time.perf_counter() - t0, "estimates": float(estimator.estimates_run()),
            "workers": float(default_workers(len(plan.stages)))}


def _fresh_case(curriculum: Path, device: DeviceName, gb: float,
                types: tuple[float, ...] = ()) -> dict[str, float]:
    """`plan_case` in a new interpreter; "process_s" adds that process's whole life.

    Raises:
        OrchestratorError: the process failed (its last line of stderr).
    """
    cmd = [sys.executable, "-m", "orchestrator.cli.bench.plan", "--device", device, "--gb", str(gb),
           "--curriculum", str(curriculum)] + (["--types", ",".join(f"{t:g}" for t in types)]
                                               if types else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, check=False)
    process_s = time.perf_counter() - t0
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        what = f"{'/'.join(f'{t:g}' for t in types)} GB types" if types else f"{device} {gb:g} GB"
        raise OrchestratorError(f"bench plan: the {what} case exited with "
                                f"{res.returncode}: {last}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "process_s": process_s}


def bench_plan(curriculum: Path = DEFAULT_CURRICULUM,
               cases: tuple[tuple[DeviceName, float], ...] = CASES,
               type_cases: tuple[tuple[float, ...], ...] = TYPE_CASES) -> dict[str, Any]:
    """Time planning for each (device, budget GB) case, each in a fresh process.

    Returns:
        {"bench": "plan", "machine": {...}, "figures": {name: number}}: per case
        `plan_<device>_<gb>gb_s`, `..._process_s` and `..._estimates` (a mixed-GPU case:
        `plan_types_16_40_80gb_...`); `slowest_case_s`,
        `slowest_process_s` and `workers`.

    Raises:
        OrchestratorError: a case's process failed.
    """
    figures: dict[str, float] = {}
    runs: list[tuple[DeviceName, float, tuple[float, ...]]] = [
        *((device, gb, ()) for device, gb in cases), *(("cuda", 0.0, t) for t in type_cases)]
    for device, gb, types in runs:
        case = _fresh_case(Path(curriculum), device, gb, types)
        name = (f"plan_types_{'_'.join(f'{t:g}' for t in types)}gb" if types
                else f"plan_{device}_{gb:g}gb")
        figures[f"{name}_s"] = case["s"]
        figures[f"{name}_process_s"] = case["process_s"]
        figures[f"{name}_estimates"] = case["estimates"]
        figures["workers"] = case["workers"]
    figures["slowest_case_s"] = max(v for k, v in figures.items() if k.endswith("gb_s"))
    figures["slowest_process_s"] = max(v for k, v in figures.items() if k.endswith("gb_process_s"))
    return {"bench": "plan", "machine": {**machine_info(torch.__version__),
                                         "curriculum": str(curriculum)},
            "figures": {k: round(float(v), 3) for k, v in figures.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Plan one `bench plan` case; print its figures as JSON.")
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--gb", type=float, required=True)
    ap.add_argument("--curriculum", type=Path, default=DEFAULT_CURRICULUM)
    ap.add_argument("--types", default="", help="GPU types' GB, e.g. 16,40,80: a mixed-GPU plan")
    args = ap.parse_args(argv)
    device: DeviceName = "cuda" if args.device == "cuda" else "cpu"
    types = tuple(float(t) for t in args.types.split(",") if t)
    sys.stdout.write(json.dumps(plan_case(args.curriculum, device, args.gb, types)) + "\n")


if __name__ == "__main__":
    main()
