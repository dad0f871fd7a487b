"""The Python API: `plan`, `submit` and `status` for notebooks and scripts.

The command line calls these same functions (`orchestrator plan/submit/status`), so a
script and the CLI get the same plan, the same jobs and the same rows:

    from orchestrator import plan, submit, status

    p = plan(target_mem_gb=20, data="/data/ATLAS_2/.cache", run="atlas-a")
    jobs = submit(p, executor="slurm")
    for row in status("atlas-a"):
        print(row["run"], row["state"], [s["state"] for s in row["stages"]])

`import orchestrator` stays light: this module is imported on first use of one of the
three names, and torch only when a plan is made.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from orchestrator.config import (
    DEFAULT_CURRICULUM,
    DeviceName,
    ExecutorName,
    Plan,
    check_choice,
    load_plan,
    resolve_cluster,
)
from orchestrator.errors import ConfigError
from orchestrator.launch.sacct import rate_limited_sacct
from orchestrator.planning.floors import check_fresh_starts
from orchestrator.runs.status import collect_status


class StageRow(TypedDict, total=False):
    """One stage of a run as `status` reports it (`status --json`'s `stages` rows)."""

    name: str
    job_id: str | None
    state: str
    slurm_state: str | None
    attempts: int
    requeues: int
    timeouts: int
    epoch: int
    max_epochs: int
    best_dice: float | None
    peak_mem_gb: float | None
    gpu: str | None  # a mixed-GPU plan: the stage's GPU type (or the one it got)
    nodes: list[str] | None
    elapsed_s: float | None
    eta_s: float | None
    error: str | None
    log: str | None
    final: str | None
    fold: int


class RunRow(TypedDict, total=False):
    """One run as `status` reports it (`status --json`'s `runs` rows)."""

    run: str
    state: str
    executor: str | None
    stages: list[StageRow]
    folds: int
    cv: dict[str, Any]  # K-fold run: per stage {"best_dice": {mean, std, n}, "completed", "folds"}


def plan(target_mem_gb: float | None = None, *, device: DeviceName = "auto",
         curriculum: str | Path = DEFAULT_CURRICULUM, cluster: str | None = None,
         data: str | Path | None = None, run: str | None = None, runs_dir: str | Path = "runs",
         write: bool = True, dataset: Any = None, placement: str | None = None,
         progress: Callable[[str], None] | None = None,
         notice: Callable[[str], None] | None = None) -> Plan:
    """Fit every stage of the curriculum to the memory budget (what `orchestrator plan` does).

    Args:
        target_mem_gb: budget per stage in GB; None: the probed GPU, the cluster profile's
            GPU on a machine without one, or host RAM.
        device: auto (a GPU here, else the profile's GPU, else the CPU), cuda or cpu.
        curriculum: the curriculum YAML.
        cluster: a profile name under envs/clusters/ or a YAML file; None: the default.
        data: a data tree (or its cache): caps batches, sets epochs and iterations.
        run: the run's name (default run-<time>).
        runs_dir: the folder holding the runs.
        write: write runs/<run>/plan.yaml (as the CLI does); False plans only.
        dataset: a `planning.schedule.DatasetSize` to plan for instead of measuring `data`
            (`auto_config` passes one of N ATLAS-size subjects).
        placement: for a cluster with GPU types of different memory (`sinfo`, else the
            profile): None (the default) plans each stage for each type and places it on
            the smallest that keeps its curriculum values where the profile names its
            types (`gpu_types:`) or pins a stage, there is more than one type, no
            `target_mem_gb` and no SLURM job around the call (an allocation plans for the
            GPU it holds); "auto" does so for any profile with GPUs; a type's name pins
            every stage to it; "none" plans for one budget as without types.
        progress: called with each stage's name as it is planned.
        notice: called with what the CLI prints as a note (e.g. planning for a CPU where
            SLURM answers).

    Returns:
        The plan (`config.Plan`): per stage input size, base filters, batch size,
        checkpointing, AMP, predicted memory and the reasons.

    Raises:
        ConfigError: a bad flag, curriculum, stage or cluster file.
        DataError: `data` holds no usable subject.
        PlanError: a stage cannot fit the budget, or the run was submitted already.
    """
    # deferred: torch (CLI start-up); plan_file and step build the models
    from orchestrator.planning.plan_file import PlanRequest, make_plan, write_plan
    from orchestrator.training.step import estimation_step

    check_choice("--device", device, DeviceName)
    options, pins = gpu_placement(placement, cluster, device, target_mem_gb)
    req = PlanRequest(curriculum=Path(curriculum), target_mem_gb=target_mem_gb, device=device,
                      cluster=cluster, data_dir=Path(data) if data is not None else None, run=run,
                      runs_dir=Path(runs_dir), dataset=dataset, gpu_options=options, pins=pins)
    p = make_plan(req, estimation_step, progress=progress, notice=notice)
    if write:
        write_plan(p)
    return p


def gpu_placement(placement: str | None, cluster: str | None, device: str,
                  target_mem_gb: float | None) -> tuple[tuple[Any, ...], tuple[tuple[str, str], ...]]:
    """The GPU types to place the stages on (`plan_facts.GpuOption`s) and the
    stages' pins, for `plan`'s `placement` (see there); ((), ()) for a one-budget plan.

    Raises:
        ConfigError: `placement` names no type of the inventory, a type's memory is
            unknown, or --device cpu with a type named.
    """
    from orchestrator.launch.inventory import gpu_inventory, wants_gpus  # deferred: torch (placement)

    if placement == "none":
        return (), ()
    profile, path = resolve_cluster(cluster)
    pins = tuple((stage, r.gpu_type) for stage, r in profile.stages.items() if r.gpu_type)
    # inside an allocation (slurm/progressive.sh), a plan is for the GPU the job holds
    in_job = bool(os.environ.get("SLURM_JOB_ID"))
    if placement in (None, "auto") and (device == "cpu" or target_mem_gb is not None or in_job
                                        or not wants_gpus(profile)):
        return (), ()
    if placement is None and not (profile.gpu_types or pins):
        return (), ()  # by default only a profile that names its GPU types places stages
    if device == "cpu":
        raise ConfigError(f"--placement {placement}: places stages on GPU types; expected "
                          "--device auto or cuda with it")
    inv = gpu_inventory(profile)
    if placement not in (None, "auto") and placement not in inv.types:
        raise ConfigError(f"--placement: {placement!r} is not a GPU type of the cluster "
                          f"({inv.source}); expected auto, none or one of: "
                          f"{', '.join(inv.types) or 'no type found'}")
    if placement in (None, "auto") and len(inv.types) < 2 and not pins:
        return (), ()
    inv.require_memory(path)
    options = inv.options(profile)
    if placement not in (None, "auto"):
        options = [o for o in options if o.gpu_type == placement]
        pins = ()
    return tuple(options), pins


def plan_path(p: Plan) -> Path:
    """Where `plan` wrote the plan: runs/<run>/plan.yaml."""
    return p.run_dir / "plan.yaml"


def submit(plan_or_path: Plan | str | Path, *, executor: ExecutorName = "slurm", lcnn: bool = True,
           dry_run: bool = False, folds: int | None = None,
           allow_fresh_start: bool = False,
           notice: Callable[[str], None] | None = None) -> list[Any]:
    """Submit a plan's stages (what `orchestrator submit` does).

    Args:
        plan_or_path: a plan from `plan` (written) or a plan.yaml path.
        executor: slurm (one job per stage, chained afterok), local or debug (in order,
            waiting for each).
        lcnn: submit the LCNN runs too.
        dry_run: return the jobs that would be submitted; submit nothing.
        folds: K-fold cross-validation by subject (each stage a job array of K).
        allow_fresh_start: submit even when a hand-off re-initialises most of a network.
        notice: called with each note about a narrower stage's hand-off.

    Returns:
        The submitted jobs (`launch.submit.Submitted`: stage, job_id, depends_on, parameters).

    Raises:
        ConfigError: a bad plan file or executor.
        PlanError: a hand-off would start a stage afresh (without `allow_fresh_start`).
        SubmissionError: the run was submitted already, or sbatch refused a job.
    """
    from orchestrator.launch.submit import submit_plan  # deferred: submitit (CLI start-up)

    check_choice("--executor", executor, ExecutorName)
    path = plan_path(plan_or_path) if isinstance(plan_or_path, Plan) else Path(plan_or_path)
    p = load_plan(path)
    for line in check_fresh_starts(p, allow_fresh_start):
        if notice is not None:
            notice(line)
    if folds is not None:
        # deferred: nibabel and scipy (only --folds reads the subjects)
        from orchestrator.launch.folds import submit_folds

        _doc, jobs = submit_folds(p, path, executor, folds, include_lcnn=lcnn, dry_run=dry_run)
        return list(jobs)
    return list(submit_plan(p, path, executor, include_lcnn=lcnn, dry_run=dry_run))


def status(run: str | None = None, *, runs_dir: str | Path = "runs",
           slurm: bool = True) -> list[RunRow]:
    """Every run under `runs_dir`, or one run (what `orchestrator status` shows).

    Args:
        run: the run's name; None: every run.
        runs_dir: the folder holding the runs.
        slurm: ask SLURM (one batched sacct call, rate-limited per runs folder); False
            reads the on-disk state only.

    Returns:
        One row per run: run, state, executor, stages (name, job_id, state, attempts,
        epoch, max_epochs, best_dice, peak_mem_gb, ...), folds for a cross-validation run.

    Raises:
        ConfigError: no such run.
    """
    doc = status_document(run, runs_dir=runs_dir, slurm=slurm)
    return list(doc["runs"])


def status_document(run: str | None = None, *, runs_dir: str | Path = "runs",
                    slurm: bool = True) -> dict[str, Any]:
    """The whole `status --json` document: {"runs": [...], "slurm": "ok" | why not}."""
    query = rate_limited_sacct(Path(runs_dir)) if slurm else None
    return collect_status(Path(runs_dir), run, query)
