"""Plan the stages of a curriculum, several at once.

A stage's plan depends on nothing but its own spec, the budget and the step factory, and
its estimates are single-threaded Python (fake tensors dispatch op by op), so on a
machine with several cores the stages are planned in worker processes, one stage each:
about half the wall time on 2 cores for the 4 stages + LCNN (docs/benchmarks.md). The
workers are forked where the platform can (nothing to import again, and the parent's
estimate cache comes with them) and never where CUDA is initialised in this process (a
forked CUDA context is unusable); each sends the estimates it ran back to the parent's
cache, so a second plan in one process (tests, `plan` then `submit`) reuses them.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from orchestrator.config import StagePlan, StageSpec
from orchestrator.errors import PlanError
from orchestrator.planning.floors import keep_filters
from orchestrator.planning.planner import (
    Budget,
    Shortfall,
    StepFactory,
    add_estimates,
    plan_or_shortfall,
    shortfall_message,
)

logger = logging.getLogger(__name__)
MAX_WORKERS = 4
ENV_WORKERS = "ORCHESTRATOR_PLAN_WORKERS"  # 1: plan the stages one after another


def default_workers(n_stages: int) -> int:
    """Processes to plan with: the usable cores (capped), at most one per stage."""
    env = os.environ.get(ENV_WORKERS, "").strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), n_stages)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_stages, MAX_WORKERS))


def _context() -> mp.context.BaseContext:
    import torch

    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def plan_curriculum(stages: list[tuple[StageSpec, str | None]], budget: Budget,
                    step_factory: StepFactory,
                    batch_caps: dict[str, tuple[int, str]] | None = None,
                    progress: Callable[[str], None] | None = None,
                    workers: int | None = None) -> list[StagePlan]:
    """Plan every stage (see `planner.plan_stage`); the plans in the stages' order.

    Args:
        progress: called with a stage's name when its planning starts (one process) or
            ends (several).
        workers: processes; default `default_workers` (env ORCHESTRATOR_PLAN_WORKERS).

    Raises:
        PlanError: some stages fit nothing; one message names them and the smallest budget
            that fits every stage. An estimate that fails raises its own PlanError.
    """
    caps = batch_caps or {}
    jobs = [(spec, init, budget, step_factory, caps.get(spec.name)) for spec, init in stages]
    n = workers if workers is not None else default_workers(len(jobs))
    if n > 1 and not _picklable(jobs):  # e.g. a step factory defined in a function
        logger.debug("the stages' jobs cannot be sent to workers: planning in this process")
        n = 1
    results: list[StagePlan | Shortfall] = []
    if n <= 1:
        for job in jobs:
            if progress:
                progress(job[0].name)
            result, _ = plan_or_shortfall(*job)
            results.append(result)
    else:
        logger.debug("planning %d stages in %d processes", len(jobs), n)
        with ProcessPoolExecutor(max_workers=n, mp_context=_context()) as pool:
            futures = [pool.submit(plan_or_shortfall, *job) for job in jobs]
            for job, future in zip(jobs, futures):
                result, ran = future.result()
                add_estimates(ran)  # a later plan in this process reuses them
                if progress:
                    progress(job[0].name)
                results.append(result)
    short = [r for r in results if isinstance(r, Shortfall)]
    if short:
        raise PlanError(shortfall_message(budget, short))

    def replan(spec: StageSpec, init_from: str | None, floor: int) -> StagePlan | None:
        result, _ = plan_or_shortfall(spec, init_from, budget, step_factory, caps.get(spec.name),
                                      min_filters=floor)
        return result if isinstance(result, StagePlan) else None

    return keep_filters([r for r in results if isinstance(r, StagePlan)], replan)
