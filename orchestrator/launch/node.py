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

import json
import logging
import os
import re
import shutil
import socket
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
    """With several tasks, export what training/distributed.py needs: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR (rank 0's node), the node of every rank (ORCH_RANK_NODES),
    their logs (ORCH_RANK_LOGS: submitit's per-task stderr; run-chain sets its stage log
    itself) and this attempt's
    rendezvous key (ORCH_RENDEZVOUS_KEY: job, restart, step). No port: rank 0 takes one
    from the OS. Returns this task's rank, or None for one task.

    In a SLURM job step (a submitit job's tasks, run-chain's stages) from SLURM's variables;
    in submitit's local executor from its job environment; elsewhere (a batch script's
    own shell, a login node) one task.
    """
    env = os.environ
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") is not None:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        if world <= 1:
            return None
        rank, local = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
        hosts = slurm_hostnames(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE")
                                or env.get("SLURM_TASKS_PER_NODE", ""), len(hosts))
        nodes = [h for h, n in zip(hosts, counts) for _ in range(n)]  # block distribution
        if len(nodes) != world:
            nodes = [env.get("SLURMD_NODENAME", socket.gethostname()) if r == rank else "?"
                     for r in range(world)]
        # SLURM_JOB_ID is an array task's own id; a requeue keeps it and counts a restart
        key = (f"{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT') or '0'}."
               f"{env.get('SLURM_STEP_ID', '0')}")
    elif env.get("SUBMITIT_EXECUTOR"):
        job_env = submitit.JobEnvironment()
        world = job_env.num_tasks
        if world <= 1:
            return None
        rank, local = job_env.global_rank, job_env.local_rank
        nodes = [socket.gethostname()] * world
        key = f"{job_env.job_id}.0.0"
    else:
        return None
    if env.get("SUBMITIT_FOLDER"):
        job_id = submitit.JobEnvironment().job_id
        env["ORCH_RANK_LOGS"] = json.dumps([str(submitit.core.utils.JobPaths(
            env["SUBMITIT_FOLDER"], job_id=job_id, task_id=r).stderr) for r in range(world)])
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
               LOCAL_WORLD_SIZE=str(nodes.count(nodes[rank])), MASTER_ADDR=nodes[0],
               ORCH_RANK_NODES=",".join(nodes), ORCH_RENDEZVOUS_KEY=key)
    env.pop("MASTER_PORT", None)  # chosen by rank 0 (training/distributed.py)
    logger.info("task %d of %d on %s; ranks on %s", rank, world, nodes[rank], ",".join(nodes))
    return rank


def slurm_hostnames(nodelist: str) -> list[str]:
    """`n[1-2],gpu7` -> ["n1", "n2", "gpu7"] (scontrol's own expansion)."""
    if not nodelist:
        return [socket.gethostname()]
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
    except (subprocess.SubprocessError, OSError):
        out = []
    return out or [nodelist]


def tasks_per_node(spec: str, nodes: int) -> list[int]:
    """SLURM's tasks-per-node list, `2(x3),1` -> [2, 2, 2, 1]; one each when unknown."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return [1] * nodes
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts or [1] * nodes


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
