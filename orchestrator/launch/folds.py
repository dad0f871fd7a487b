"""`submit --folds K`: K-fold cross-validation, each stage one SLURM job array of K tasks.

The subjects are dealt into K folds (`data/folds.py`), stored in `runs/<run>/folds.json`;
fold i trains the plan with fold i's subjects as its validation set, in its own sub-run
`runs/<run>/folds/fold<i>/` (plan.yaml with `fold` and `val_subjects`, state.json, stage
folders). On SLURM every stage is one array job (task i = fold i), and the array of a
stage depends on the array it starts from with `aftercorr`: task i starts when task i of
the previous stage succeeded, so a failed fold stops only its own chain. The local and
debug executors run the folds one after another.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import submitit

from orchestrator.atomic import atomic_write_text
from orchestrator.config import ExecutorName, Plan, load_plan, plan_to_yaml
from orchestrator.data.folds import folds_document, make_folds
from orchestrator.data.sources import discover_subjects
from orchestrator.errors import ConfigError, SubmissionError
from orchestrator.launch.job import StageJob
from orchestrator.launch.snapshot import snapshot_code
from orchestrator.launch.submit import Submitted, job_parameters, logs_dir, submit_plan
from orchestrator.runs import state as run_state

logger = logging.getLogger(__name__)
FOLDS_FILE = "folds.json"
FOLDS_DIR = run_state.FOLDS_DIR


def fold_plans(plan: Plan, k: int) -> tuple[dict[str, Any], list[Plan]]:
    """The folds document and one plan per fold (nothing is written).

    Raises:
        ConfigError: the plan has no data directory, or k does not fit the subjects.
    """
    if plan.data_dir is None:
        raise ConfigError(f"plan {plan.run}: --folds needs the data (plan with --data DIR)")
    if plan.fold is not None:
        raise ConfigError(f"plan {plan.run} is fold {plan.fold} of a cross-validation; "
                          "expected the run's own plan.yaml")
    subjects = [r.subject for r in discover_subjects(Path(plan.data_dir))]
    seed = plan.stages[0].spec.seed
    doc = folds_document(make_folds(subjects, k, seed), seed)
    runs_dir = str(plan.run_dir.resolve() / FOLDS_DIR)
    plans = [plan.model_copy(update={"run": f"fold{f['fold']}", "runs_dir": runs_dir,
                                     "fold": f["fold"], "val_subjects": f["val_subjects"]})
             for f in doc["folds"]]
    return doc, plans


def submit_folds(plan: Plan, plan_path: Path, kind: ExecutorName, k: int, *,
                 include_lcnn: bool = True, only: list[str] | None = None,
                 dry_run: bool = False) -> tuple[dict[str, Any], list[Submitted]]:
    """Submit K-fold cross-validation of the plan's stages.

    Returns:
        The folds document (folds.json) and the submitted rows: on SLURM one per stage
        array, else one per fold and stage.

    Raises:
        ConfigError: bad K or no data (see `fold_plans`).
        SubmissionError: the run was already submitted as cross-validation, or sbatch
            refused an array (the message names the stage).
    """
    doc, plans = fold_plans(plan, k)
    run_dir = plan.run_dir
    if not dry_run and (run_dir / FOLDS_FILE).exists():
        raise SubmissionError(f"{run_dir / FOLDS_FILE}: this run's folds were submitted "
                              "already; plan a new --run")
    paths = [Path(p.runs_dir) / p.run / "plan.yaml" for p in plans]
    if not dry_run:
        for p, path in zip(plans, paths):
            atomic_write_text(path, plan_to_yaml(p))
        atomic_write_text(run_dir / FOLDS_FILE, json.dumps(doc, indent=2))
        code = snapshot_code(plan) if kind == "slurm" else {}  # every fold imports from it
        run_state.update_run(run_dir, executor=kind, plan=str(plan_path), folds=k,
                             submitted=run_state.now_iso(), **code)
    if kind != "slurm":  # no arrays: fold after fold
        rows: list[Submitted] = []
        for p, path in zip(plans, paths):
            rows += submit_plan(p, path, kind, include_lcnn=include_lcnn, only=only, dry_run=dry_run)
        return doc, rows
    return doc, _submit_arrays(plan, plans, paths, kind, include_lcnn, only, dry_run)


def _submit_arrays(plan: Plan, plans: list[Plan], paths: list[Path], kind: ExecutorName,
                   include_lcnn: bool, only: list[str] | None, dry_run: bool) -> list[Submitted]:
    stages = [s for s in plan.stages if (include_lcnn or s.kind != "lcnn")
              and (only is None or s.name in only)]
    k = len(plans)
    array_of: dict[str, str] = {}
    rows: list[Submitted] = []
    for sp in stages:
        dep = array_of.get(sp.init_from) if sp.init_from else None
        params = job_parameters(plan, sp, kind, None)
        if dep and kind == "slurm":
            params["slurm_additional_parameters"] = {"dependency": f"aftercorr:{dep}"}
        params["name"] = f"{plan.run}.{sp.name}.folds"
        if dry_run:
            array_of[sp.name] = f"<{sp.name}>"
            rows.append(Submitted(sp.name, f"array 0-{k - 1}", f"aftercorr:{dep}" if dep else None,
                                  {**params, "array": f"0-{k - 1}"}))
            continue
        ex = submitit.AutoExecutor(folder=logs_dir(plan) / FOLDS_DIR / "%j", cluster=kind,
                                   slurm_max_num_timeout=plan.cluster.max_requeues)
        ex.update_parameters(**params)
        try:
            with ex.batch():
                jobs = [ex.submit(StageJob(str(path.resolve()), sp.name)) for path in paths]
        except Exception as err:  # submitit wraps sbatch's stderr in its message
            raise SubmissionError(f"stage {sp.name}: array submission failed: {err}") from None
        array_id = jobs[0].job_id.split("_")[0]
        array_of[sp.name] = array_id
        for p, job in zip(plans, jobs):
            run_state.update_stage(p.run_dir, sp.name, state=run_state.SUBMITTED, job_id=job.job_id,
                                   slurm_job_id=job.job_id, executor=kind, error=None,
                                   depends_on=f"{dep}_{p.fold}" if dep else None,
                                   stdout=str(job.paths.stdout), stderr=str(job.paths.stderr),
                                   submitted=run_state.now_iso())
        rows.append(Submitted(sp.name, f"{array_id}_[0-{k - 1}]",
                              f"aftercorr:{dep}" if dep else None, {**params, "array": f"0-{k - 1}"}))
        logger.info("%s: array job %s (%d folds)%s", sp.name, array_id, k,
                    f" aftercorr:{dep}" if dep else "")
    return rows


def resume_folds(plan: Plan, kind: ExecutorName, todo: list[str]) -> list[Submitted]:
    """Resubmit the unfinished stages of a cross-validation run, fold by fold.

    Args:
        plan: the run's own plan.
        todo: stage rows as `status` names them ("fold1/stage2_cnn_attention").

    Returns:
        The submitted rows, stage names prefixed with their fold. On SLURM each fold's
        stages are single jobs chained with afterok (a resumed fold is no longer an array
        task); every stage resumes from its own last.pt.
    """
    rows: list[Submitted] = []
    for fold_dir in run_state.fold_run_dirs(plan.run_dir):
        names = [t.split("/", 1)[1] for t in todo if t.startswith(f"{fold_dir.name}/")]
        if names:
            path = fold_dir / "plan.yaml"
            done = submit_plan(load_plan(path), path, kind, only=names, resubmit=True)
            rows += [dataclasses.replace(r, stage=f"{fold_dir.name}/{r.stage}") for r in done]
    return rows
