"""Submit a plan's stages through submitit: SLURM (chained with afterok), local, or debug.

On SLURM every stage is one job with its own resources, depending on the stage it
starts from (`afterok`); LCNN runs go beside the chain. The local and debug executors
have no dependencies, so stages run one after another and `submit` waits for each.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from orchestrator.config import ExecutorName, Plan, StagePlan
from orchestrator.errors import SubmissionError
from orchestrator.launch.job import StageJob
from orchestrator.launch.sacct import scancel
from orchestrator.launch.snapshot import code_dir, setup_lines, snapshot_code
from orchestrator.planning.resources import stage_resources
from orchestrator.runs import state as run_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    stage: str
    job_id: str
    depends_on: str | None
    parameters: dict[str, Any]


def logs_dir(plan: Plan) -> Path:
    return Path(plan.runs_dir).resolve().parent / "logs" / plan.run


def job_parameters(plan: Plan, sp: StagePlan, kind: ExecutorName,
                   depends_on: str | None) -> dict[str, Any]:
    """submitit parameters of one stage's job, from the cluster profile."""
    c = plan.cluster
    tasks, nodes = c.tasks_per_node, c.nodes
    if kind == "debug" and tasks * nodes > 1:  # one process in the caller: no DDP
        logger.warning("%s: the debug executor runs 1 task; tasks_per_node %d and nodes %d "
                       "of profile %s have no effect", sp.name, tasks, nodes, c.name)
        tasks = nodes = 1
    if kind == "local" and nodes > 1:
        raise SubmissionError(f"cluster profile {c.name}: nodes {nodes}; the local executor "
                              "runs on this machine only (expected nodes: 1)")
    res = {k: r.value for k, r in stage_resources(plan, sp).items()}
    params: dict[str, Any] = {"name": f"{plan.run}.{sp.name}", "timeout_min": res["time_min"],
                              "cpus_per_task": res["cpus_per_task"], "mem_gb": res["mem_gb"],
                              "tasks_per_node": tasks, "nodes": nodes}
    if res["gpus_per_node"]:
        params["gpus_per_node"] = res["gpus_per_node"]
    if kind == "slurm":
        extra: dict[str, Any] = {}
        if depends_on:
            extra["dependency"] = f"afterok:{depends_on}"
        for key in ("partition", "qos", "constraint", "gres"):
            if res[key]:
                params[f"slurm_{key}"] = res[key]
        if c.account:
            params["slurm_account"] = c.account
        # the profile's lines, then into the run's code snapshot (launch/snapshot.py)
        params.update(slurm_setup=[*c.setup, *setup_lines(code_dir(plan))],
                      slurm_signal_delay_s=c.signal_grace_s, slurm_additional_parameters=extra)
    return params


def _executor(plan: Plan, kind: ExecutorName) -> submitit.AutoExecutor:
    folder = logs_dir(plan) / "%j"
    return submitit.AutoExecutor(folder=folder, cluster=kind,
                                 slurm_max_num_timeout=plan.cluster.max_requeues)


def _stages(plan: Plan, include_lcnn: bool, only: list[str] | None) -> list[StagePlan]:
    out = [s for s in plan.stages if include_lcnn or s.kind != "lcnn"]
    if only is not None:
        out = [s for s in out if s.name in only]
    return out


def submit_plan(plan: Plan, plan_path: Path, kind: ExecutorName, *, include_lcnn: bool = True,
                only: list[str] | None = None, dry_run: bool = False,
                poll: Callable[[], None] | None = None, resubmit: bool = False) -> list[Submitted]:
    """Submit the plan's stages (all, or `only` those named) and record them in state.json.

    For slurm this returns as soon as the chain is queued; for local/debug it runs the
    stages one after another and returns when they are done (or one failed).

    Args:
        resubmit: the run was submitted before (`resume`); otherwise a second submission
            of one run is refused.

    Raises:
        SubmissionError: the run was submitted already (and not `resubmit`); sbatch
            refused a job, or (local) a stage failed; the message names the stage and its log.
    """
    stages = _stages(plan, include_lcnn, only)
    run_dir = plan.run_dir
    job_of: dict[str, str] = {k: v.get("slurm_job_id") or v.get("job_id")
                              for k, v in run_state.read_state(run_dir)["stages"].items()}
    done: list[Submitted] = []
    if not dry_run:
        claim = run_state.update_run if resubmit else run_state.claim_run
        claim(run_dir, executor=kind, plan=str(plan_path), submitted=run_state.now_iso())
        code = snapshot_code(plan) if kind == "slurm" else {}  # jobs import from it
        if code:
            run_state.update_run(run_dir, **code)
        for sp in stages:
            run_state.update_stage(run_dir, sp.name, state=run_state.PENDING, job_id=None,
                                   slurm_job_id=None, error=None, executor=kind)
    for i, sp in enumerate(stages):
        in_batch = sp.init_from in {s.name for s in stages}
        dep = job_of.get(sp.init_from) if sp.init_from and in_batch else None
        params = job_parameters(plan, sp, kind, dep if kind == "slurm" else None)
        if dry_run:
            done.append(Submitted(sp.name, "-", dep, params))
            job_of[sp.name] = f"<{sp.name}>"
            continue
        ex = _executor(plan, kind)
        ex.update_parameters(**params)
        try:
            job = ex.submit(StageJob(str(plan_path.resolve()), sp.name))
        except Exception as err:  # submitit wraps sbatch's stderr in its message
            run_state.update_stage(run_dir, sp.name, state=run_state.FAILED, error=str(err)[:500])
            raise SubmissionError(f"stage {sp.name}: submission failed: {err}") from None
        job_of[sp.name] = job.job_id
        run_state.update_stage(run_dir, sp.name, state=run_state.SUBMITTED, job_id=job.job_id,
                               slurm_job_id=job.job_id if kind == "slurm" else None,
                               depends_on=dep, stdout=str(job.paths.stdout),
                               stderr=str(job.paths.stderr), submitted=run_state.now_iso())
        done.append(Submitted(sp.name, job.job_id, dep, params))
        logger.info("%s: job %s%s", sp.name, job.job_id, f" (afterok:{dep})" if dep else "")
        if kind != "slurm":
            _wait(job, sp, plan, stages[i + 1:], poll)
    return done


def _wait(job: submitit.Job, sp: StagePlan, plan: Plan, rest: list[StagePlan],
          poll: Callable[[], None] | None) -> None:
    """Wait for a local/debug job; on failure cancel what depends on it and raise."""
    if not isinstance(job, submitit.DebugJob):  # a debug job runs inside result()
        while not job.done():
            if poll:
                poll()
            time.sleep(1.0)
    try:
        job.results()  # one per task (several under DDP)
    except Exception as err:
        for other in rest:
            run_state.update_stage(plan.run_dir, other.name, state=run_state.CANCELLED,
                                   error=f"dependency {sp.name} failed")
        why = run_state.read_state(plan.run_dir)["stages"].get(sp.name, {}).get("error")
        raise SubmissionError(f"stage {sp.name} failed: {why or type(err).__name__} "
                              f"(log: {job.paths.stderr})") from None
    finally:
        if poll:
            poll()


def cancel_run(plan: Plan) -> list[str]:
    """Cancel every SLURM job of the run that is not finished; returns their ids."""
    dirs = [plan.run_dir, *run_state.fold_run_dirs(plan.run_dir)]  # and a CV run's folds
    states = {d: run_state.read_state(d)["stages"] for d in dirs}
    ids = [v["slurm_job_id"] for stages in states.values() for v in stages.values()
           if v.get("slurm_job_id") and v.get("state") not in (run_state.COMPLETED,)]
    scancel(ids)
    for d, stages in states.items():
        for name, v in stages.items():
            if v.get("state") not in (run_state.COMPLETED, run_state.FAILED):
                run_state.update_stage(d, name, state=run_state.CANCELLED)
    return ids
