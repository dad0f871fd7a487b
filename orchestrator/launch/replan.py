"""A stage of a mixed-GPU plan that starts on another GPU than planned plans itself again.

An untyped request (`gres: gpu:1`), or a site that ignores the type, can start a stage
placed on one type on another. At start-up the job finds what it got: the GPU NVML sees
(its name and memory), else the type in its SLURM allocation (`scontrol show job -d`:
`JOB_GRES=gpu:TYPE:N`) with that type's memory from the profile or the built-in table.
A stage starting fresh is planned again for that memory, its base filters at least
those of the stage it starts from (the floor rule); plan.yaml (under the run's lock) and
state.json record it, and the log says so. A stage resuming from last.pt keeps its
numbers: its checkpoint holds a model of those shapes.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from orchestrator.atomic import atomic_write_text
from orchestrator.config import Plan, load_plan, plan_to_yaml
from orchestrator.errors import PlanError
from orchestrator.launch.inventory import type_memory
from orchestrator.planning.estimator import Budget
from orchestrator.planning.floors import filter_floor
from orchestrator.planning.memory import DEFAULT_OVERHEADS
from orchestrator.planning.placement import numbers
from orchestrator.planning.planner import Shortfall, plan_or_shortfall
from orchestrator.planning.probe import probe
from orchestrator.planning.schedule import batch_cap, measure_dataset
from orchestrator.runs import state as run_state
from orchestrator.training.step import estimation_step

logger = logging.getLogger(__name__)
SAME_GB = 0.05  # a GPU within 5 % of the planned type's memory is the planned one
_JOB_GRES = re.compile(r"JOB_GRES=gpu:([^:,\s()]+):\d+")


def gres_type_of_job(job_id: str, timeout_s: float = 10) -> str | None:
    """The GPU type of a running SLURM job's allocation; None without one."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-d", job_id], capture_output=True,
                             text=True, timeout=timeout_s).stdout
    except (subprocess.TimeoutExpired, OSError):
        return None
    m = _JOB_GRES.search(out)
    return m.group(1) if m else None


def gpu_got(plan: Plan) -> tuple[str, float] | None:
    """(name, GB) of the GPU this job got: NVML's first visible GPU, else the type of its
    SLURM allocation with that type's known memory; None where neither tells."""
    gpus = probe().gpus
    if gpus:
        return gpus[0].name, gpus[0].total_gb
    job = os.environ.get("SLURM_JOB_ID")
    gpu_type = gres_type_of_job(job) if job else None
    if gpu_type is None:
        return None
    mem = type_memory(gpu_type, plan.cluster)
    return (gpu_type, mem.gb) if mem else None


def replan_on_start(plan_path: Path | str, stage: str) -> str | None:
    """Plan `stage` again where its job got another GPU than its placement (module doc).

    Returns:
        The line logged and recorded, or None where nothing was planned again.

    Raises:
        PlanError: the stage fits nothing on the GPU it got (the line names both types).
    """
    plan = load_plan(Path(plan_path))
    sp = plan.stage(stage)
    pl = sp.placement
    if pl is None or (plan.run_dir / stage / "checkpoints" / "last.pt").exists():
        return None
    got = gpu_got(plan)
    if got is None:
        return None
    name, gb = got
    if name.lower() == pl.gpu_type.lower() or abs(gb - pl.mem_gb) <= SAME_GB * pl.mem_gb:
        return None
    src = next((s for s in plan.stages if s.name == sp.init_from), None)
    floor = filter_floor(sp.kind, src)
    budget = Budget(gb, DEFAULT_OVERHEADS["cuda"], cuda_target=True)
    if plan.assumptions.val_volume_vox:  # what validation slides over, as planned
        budget.val_volume_vox = tuple(plan.assumptions.val_volume_vox)
    cap = batch_cap(sp.spec, measure_dataset(Path(plan.data_dir))) if plan.data_dir else None
    new, _ = plan_or_shortfall(sp.spec, sp.init_from, budget, estimation_step, cap, floor)
    if isinstance(new, Shortfall):
        raise PlanError(f"{stage}: planned for {pl.gpu_type} ({pl.mem_gb:g} GB), the job got "
                        f"{name} ({gb:g} GB), on which its smallest configuration needs "
                        f"{new.need_gb:.2f} GB; expected a {pl.gpu_type}: resubmit with "
                        f"--gres=gpu:{pl.gpu_type}:N (the profile's gres for {stage})")
    line = (f"{stage}: started on {name} ({gb:g} GB) instead of the planned {pl.gpu_type} "
            f"({pl.mem_gb:g} GB): planned again for it: {numbers(new)} (was {numbers(sp)})")
    placed = pl.model_copy(update={"gpu_type": name, "mem_gb": gb, "replanned": line})
    new = new.model_copy(update={"placement": placed, "reasons": [line, *new.reasons],
                                 "time_estimate_min": sp.time_estimate_min})

    def rewrite() -> None:  # under the run's lock: other stages' jobs may rewrite it too
        now = load_plan(Path(plan_path))
        now = now.model_copy(update={"stages": [new if s.name == stage else s for s in now.stages]})
        atomic_write_text(Path(plan_path), plan_to_yaml(now))

    run_state.under_lock(plan.run_dir, rewrite)
    run_state.update_stage(plan.run_dir, stage, replanned=line, gpu=name)
    logger.warning(line)
    return line
