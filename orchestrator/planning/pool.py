"""Plan the stages of a curriculum, several at once.

A stage's plan depends on nothing but its own spec, the budget and the step factory, and
its estimates are single-threaded Python (fake tensors dispatch op by op), so on a
machine with several cores the stages are planned in worker processes, one stage each:
about half the wall time on 2 cores for the 4 stages + LCNN (docs/benchmarks.md). Which
stage and with which base-filter floor comes next is planning/schedule_floors.py's
choice; guesses that turn out wrong are stopped when every plan is final. The
workers are forked where the platform can (nothing to import again, and the parent's
estimate cache comes with them) and never where CUDA is initialised in this process (a
forked CUDA context is unusable); each sends the estimates it ran back to the parent's
cache, so a second plan in one process (tests, `plan` then `submit`) reuses them.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
from collections.abc import Callable

import torch

from orchestrator.config import StagePlan, StageSpec
from orchestrator.errors import PlanError
from orchestrator.planning.estimator import (
    Budget,
    Candidate,
    StepFactory,
    add_estimates,
    build_stage_model_meta,
    known_estimates,
)
from orchestrator.planning.planner import (
    Shortfall,
    candidate_ladder,
    plan_or_shortfall,
    shortfall_message,
)
from orchestrator.planning.probe import usable_cpus
from orchestrator.planning.schedule_floors import FloorSchedule, Job

logger = logging.getLogger(__name__)
MAX_WORKERS = 4
ENV_WORKERS = "ORCHESTRATOR_PLAN_WORKERS"  # 1: plan the stages one after another


def default_workers(n_stages: int) -> int:
    """Processes to plan with: the usable cores (capped), at most one per stage."""
    env = os.environ.get(ENV_WORKERS, "").strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), n_stages)
    return max(1, min(usable_cpus(), n_stages, MAX_WORKERS))


def _context() -> mp.context.BaseContext:
    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _default_signals() -> None:
    """A worker's initializer: SIGTERM and SIGINT as the system's default.

    A forked worker inherits its parent's handlers, e.g. the stop flag a stage installs
    (training/interrupt.py), which only records a signal. Such a worker swallows the
    SIGTERM of `Pool.terminate()` and waits on the task queue for ever; `terminate()`
    then waits on it."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def worker_pool(n: int) -> mp.pool.Pool:
    """n planning workers, forked where the platform can, with the default stop signals."""
    return _context().Pool(n, initializer=_default_signals)


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
    """`plan_curriculum_results`, every stage fitted or a PlanError naming those that did not.

    Raises:
        PlanError: some stages fit nothing; one message names them and the smallest budget
            that fits every stage. An estimate that fails raises its own PlanError.
    """
    results = plan_curriculum_results(stages, budget, step_factory, batch_caps, progress, workers)
    short = [r for r in results if isinstance(r, Shortfall)]
    if short:
        raise PlanError(shortfall_message(budget, short))
    return [r for r in results if isinstance(r, StagePlan)]


def plan_curriculum_results(stages: list[tuple[StageSpec, str | None]], budget: Budget,
                            step_factory: StepFactory,
                            batch_caps: dict[str, tuple[int, str]] | None = None,
                            progress: Callable[[str], None] | None = None,
                            workers: int | None = None) -> list[StagePlan | Shortfall]:
    """Plan every stage (see `planner.plan_stage`), each 3D stage with at least the base
    filters of the stage it starts from (planning/schedule_floors.py); the plans in the
    stages' order.

    Args:
        progress: called with a stage's name when its plan is final.
        workers: processes; default `default_workers` (env ORCHESTRATOR_PLAN_WORKERS).

    Returns:
        Each stage's plan, or its Shortfall where nothing fits, in the stages' order.

    Raises:
        PlanError: an estimate failed.
    """
    caps = batch_caps or {}
    sched = FloorSchedule(stages, _ladders(), on_final=progress)

    def job_args(job: Job) -> tuple:
        spec, init = stages[job[0]]
        return (spec, init, budget, step_factory, caps.get(spec.name), job[1])

    n = workers if workers is not None else default_workers(len(stages))
    if n > 1 and not _picklable(job_args((0, 0))):  # e.g. a step factory defined in a function
        logger.debug("the stages' jobs cannot be sent to workers: planning in this process")
        n = 1
    if n <= 1:
        while not sched.finished:
            job = sched.next_job()
            assert job is not None, "the floor schedule stalled"
            sched.record(job, _run(*job_args(job))[0])
    else:
        _run_in_pool(sched, job_args, n)
    return sched.plans()


def _run(*args: object) -> tuple[StagePlan | Shortfall | BaseException, dict[tuple, int]]:
    """One job, its exception returned rather than raised (a guess's failure may not matter)."""
    try:
        return plan_or_shortfall(*args)  # type: ignore[arg-type]
    except PlanError as err:
        return err, {}


def _run_knowing(known: dict[tuple, int], *args: object
                 ) -> tuple[StagePlan | Shortfall | BaseException, dict[tuple, int]]:
    """`_run` in a worker, first taking in the estimates the parent knows (those other
    workers ran since this one was forked: a stage planned again with another floor
    reuses its first plan's)."""
    add_estimates(known)
    return _run(*args)


def _deliver(done: queue.SimpleQueue, job: Job, out: object) -> None:
    done.put((job, out))


def _deliver_error(done: queue.SimpleQueue, job: Job, err: BaseException) -> None:
    done.put((job, (err, {})))


def _run_in_pool(sched: FloorSchedule, job_args: Callable[[Job], tuple], n: int) -> None:
    """Keep n jobs running, the schedule's best next, until every plan is final; jobs
    still running then (guesses that turned out wrong) are stopped."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    running: set[Job] = set()
    pool = worker_pool(n)
    try:
        while not sched.finished:
            while len(running) < n and (job := sched.next_job(running)) is not None:
                running.add(job)
                pool.apply_async(_run_knowing, (known_estimates(), *job_args(job)),
                                 callback=functools.partial(_deliver, done, job),
                                 error_callback=functools.partial(_deliver_error, done, job))
            if not running:
                raise PlanError("planning stalled: no stage left to plan (a bug: please report)")
            job, (result, ran) = done.get()
            running.discard(job)
            add_estimates(ran)  # a later plan in this process reuses them
            logger.debug("planned %s with floor %d", job[0], job[1])
            sched.record(job, result)
    finally:
        pool.terminate()
        pool.join()


@functools.cache
def _multiple(spec_json: str) -> int:
    spec = StageSpec.model_validate_json(spec_json)
    return int(getattr(build_stage_model_meta(spec), "required_multiple", 1))


def _ladders() -> Callable[[StageSpec, int], list[Candidate]]:
    def ladder(spec: StageSpec, floor: int) -> list[Candidate]:
        return candidate_ladder(spec, _multiple(spec.model_dump_json()), floor)
    return ladder
