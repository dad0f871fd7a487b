"""`plan --verify`: run each planned stage for a few real steps and measure its peak.

Each stage runs in a fresh process (`python -m <worker> --plan P --stage S`), so that
one stage's allocations and imports do not hide in another's high-water mark. What is
measured is what a budget limits:

- CPU: the process's peak resident set (Linux VmHWM, reset after the imports through
  /proc/self/clear_refs), the same quantity the plan's prediction stands for (live
  tensors x (1 + allocator gap) + the process's baseline): the kernel's memory limit
  (SLURM's cgroup) counts it. Alongside, the peak of live tensor bytes on the real
  tensors (the estimator's own count), which tells whether the fake run saw every tensor
  (tensor_ratio) or the difference lies in the allocator and the baseline.
- CUDA: torch.cuda.max_memory_reserved plus the CUDA context (device memory in use
  before the first tensor), and max_memory_allocated against the live-tensor count;
  beside them NVML's used memory of the process (what nvidia-smi shows).

`measure()` runs inside the worker; `verify_plan()` starts the workers and compares.
The planner never imports training/: the CLI names the worker module.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import Plan, StagePlan
from orchestrator.errors import PlanError
from orchestrator.plan_facts import OverheadsRecord
from orchestrator.planning.memory import DEFAULT_OVERHEADS, LivePeak
from orchestrator.planning.nvml import process_used_gb

logger = logging.getLogger(__name__)
GIB = 1024**3
# The CPU peak RSS still grows a little after the second step (glibc's heap settles):
# 3.61, 3.66, 3.68, 3.72, 3.72 GB over steps 2-6 of a 112^3 stage; three steps catch most.
VERIFY_STEPS = 3
CPU_METHOD = "peak RSS of a fresh process (VmHWM) vs predicted; live tensor bytes vs estimate"
CUDA_METHOD = "torch.cuda.max_memory_reserved + CUDA context vs predicted; max_memory_allocated"


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(run: Callable[[], None], device_type: str) -> dict[str, Any]:
    """Peak memory of `run()` (which builds the model, the batch and runs the steps).

    Returns:
        {"method", "device", "peak_gb" (what the plan predicted), "tensor_peak_gb",
        "seconds"} plus "baseline_gb" (CPU) or "allocated_gb", "reserved_gb",
        "context_gb" (CUDA).
    """
    gc.collect()
    out: dict[str, Any] = {"device": device_type}
    if device_type == "cuda":
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        context = total - free  # the context (+ any other process on the device)
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _status_bytes("VmRSS") or 0
        exact = _reset_peak_rss()
    t0 = time.perf_counter()
    with LivePeak() as tracker:
        run()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["tensor_peak_gb"] = tracker.peak / GIB
    if device_type == "cuda":
        torch.cuda.synchronize()
        reserved = torch.cuda.max_memory_reserved()
        out.update(method=CUDA_METHOD, peak_gb=(reserved + context) / GIB,
                   allocated_gb=torch.cuda.max_memory_allocated() / GIB,
                   reserved_gb=reserved / GIB, context_gb=context / GIB)
        # the driver's view while the allocator still holds what it reserved: its peak
        out["nvml_used_gb"], out["nvml_how"] = process_used_gb(os.getpid(),
                                                               torch.cuda.current_device())
    else:
        peak = _status_bytes("VmHWM") if exact else None
        if peak is None:  # no reset: the lifetime peak, imports included
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(method=CPU_METHOD if exact else CPU_METHOD.replace("(VmHWM)", "(ru_maxrss)"),
                   peak_gb=peak / GIB, baseline_gb=baseline / GIB)
    return out


def plan_overheads(plan: Plan) -> OverheadsRecord:
    """The overheads the plan's estimate added; the device's defaults for a plan that
    records none (one made by hand, as the tests' and benches' are)."""
    return plan.assumptions.overheads or DEFAULT_OVERHEADS[plan.device]


def predicted_tensor_gb(plan: Plan, sp: StagePlan) -> float:
    """The live-tensor part of a stage's (uncalibrated) prediction."""
    o = plan_overheads(plan)
    raw = _train_gb(sp) / (sp.calibration_ratio or 1.0)
    return (raw - o.workspace_gb - o.context_gb) / (1 + o.alloc_fraction)


def _train_gb(sp: StagePlan) -> float:
    """What the trial measures: the training step (plans before validation was counted
    have predicted_gb only)."""
    return sp.train_gb if sp.train_gb is not None else sp.predicted_gb


def verify_stage(plan: Plan, plan_path: Path, sp: StagePlan, worker: str, steps: int,
                 timeout_s: float | None = None) -> dict[str, Any]:
    """Run the worker for one stage; its measurement compared with the prediction."""
    cmd = [sys.executable, "-m", worker, "--plan", str(plan_path), "--stage", sp.name,
           "--steps", str(steps)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:g} s"}
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        if res.returncode < 0:
            tail = f"killed by signal {-res.returncode} (out of memory?); {tail}"
        return {"error": f"exit {res.returncode}: {tail}"}
    try:
        m = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"no JSON result from {worker}: {res.stdout[-300:]!r}"}
    predicted = _train_gb(sp)
    raw = predicted / (sp.calibration_ratio or 1.0)
    tensor = predicted_tensor_gb(plan, sp)
    m.update(steps=steps, predicted_gb=predicted, ratio=m["peak_gb"] / predicted,
             uncalibrated_predicted_gb=raw, uncalibrated_ratio=m["peak_gb"] / raw,
             predicted_tensor_gb=tensor, tensor_ratio=m["tensor_peak_gb"] / tensor,
             budget_use=m["peak_gb"] / plan.budget_gb)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}


def verify_plan(plan: Plan, plan_path: Path, worker: str, steps: int = VERIFY_STEPS,
                progress: Callable[[str], None] | None = None) -> Plan:
    """Measure every stage of a written plan in its own process; the plan with
    measured_gb and measurement set (not written).

    Raises:
        PlanError: the plan is for a GPU and this machine has none.
    """
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise PlanError(f"--verify: plan {plan.run} is for cuda and this machine has no GPU; "
                        "run `plan --verify` on a GPU node (or plan with --device cpu)")
    stages = []
    for sp in plan.stages:
        if progress:
            progress(sp.name)
        m = verify_stage(plan, plan_path, sp, worker, steps)
        logger.debug("%s: %s", sp.name, m)
        measured = round(m["peak_gb"], 4) if "peak_gb" in m else None
        stages.append(sp.model_copy(update={"measured_gb": measured, "measurement": m}))
    return plan.model_copy(update={"stages": stages})
