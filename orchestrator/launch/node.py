"""What a stage job sets up on its node: the DDP environment, the time limit, requeue counts.

- Several tasks: torch.distributed's variables come from submitit's job environment.
- The time limit: SLURM's end time of the job (`SLURM_JOB_END_TIME`, else `squeue -o %e`),
  asked at every epoch boundary; the stage stops there (last.pt) when the next epoch would
  not end `signal_grace_s` before it, and the job requeues itself.
- Requeues (a preemption signal, or the time limit) are counted in state.json
  (`requeues`, of which `timeouts`); past the profile's `max_requeues` the job is not
  requeued and the stage is FAILED, with the reason (`orchestrator resume` continues).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import submitit

from orchestrator.config import load_plan
from orchestrator.runs import state as run_state
from orchestrator.training.interrupt import StopFlag

logger = logging.getLogger(__name__)
NEAR_END_S = 60.0  # a requeue this close to the job's end (after the grace) is a timeout


def export_distributed_env() -> int | None:
    """With several tasks, export MASTER_ADDR/PORT, RANK, WORLD_SIZE for torch.distributed
    (from submitit's job environment); returns this task's rank, or None for one task."""
    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return None
    # keep CUDA_VISIBLE_DEVICES: the trainer picks the GPU of LOCAL_RANK itself
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True)
    logger.info("task %d of %d, master %s:%d", dist_env.rank, dist_env.world_size,
                dist_env.master_addr, dist_env.master_port)
    return dist_env.rank


def job_end_time(job_id: str | None = None) -> float | None:
    """When SLURM ends this job (epoch seconds); None outside SLURM or without a limit."""
    env = os.environ.get("SLURM_JOB_END_TIME", "")
    if env.isdigit():  # SLURM >= 23.02 sets it
        return float(env)
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        return time.mktime(time.strptime(out.splitlines()[0].strip(), "%Y-%m-%dT%H:%M:%S"))
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None  # no limit ("NONE"), or squeue is not answering: rely on the signal


def stop_flag(plan_path: str) -> StopFlag:
    """The stage's stop flag: signals, and the time limit at epoch boundaries."""
    grace_s = load_plan(Path(plan_path)).cluster.signal_grace_s
    return StopFlag(end_time=job_end_time if os.environ.get("SLURM_JOB_ID") else None,
                    margin_s=grace_s)


def count_requeue(plan_path: str, stage: str, time_up: bool) -> bool:
    """Record one more requeue of the stage; False (stage FAILED) past `max_requeues`."""
    run_dir = Path(plan_path).parent
    cluster = load_plan(Path(plan_path)).cluster
    entry = run_state.read_state(run_dir)["stages"].get(stage, {})
    done = int(entry.get("requeues", 0))
    if done >= cluster.max_requeues:
        run_state.update_stage(run_dir, stage, state=run_state.FAILED, ended=run_state.now_iso(),
                               error=f"stopped again after {done} requeues: max_requeues "
                                     f"{cluster.max_requeues} of cluster profile {cluster.name} "
                                     "reached; `orchestrator resume` continues from last.pt")
        return False
    end = job_end_time()
    timed_out = time_up or (end is not None and end - time.time() < cluster.signal_grace_s + NEAR_END_S)
    run_state.bump_stage(run_dir, stage, "requeues", state=run_state.SUBMITTED)
    if timed_out:
        run_state.bump_stage(run_dir, stage, "timeouts")
    return True
