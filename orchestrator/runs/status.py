"""What `orchestrator status` shows: state.json, the stage folders, and SLURM's view.

A stage is COMPLETED only when its final.pt and metrics.csv exist: a job that ended
COMPLETED in SLURM without them is shown FAILED, with its log.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError
from orchestrator.runs import state as run_state
from orchestrator.runs.cv_summary import stage_summary

SlurmQuery = Callable[[list[str]], "dict[str, str] | None"]
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"}


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders (those holding a plan.yaml), oldest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted((p.parent for p in runs_dir.glob("*/plan.yaml")), key=lambda p: p.stat().st_mtime)


def run_plan_path(runs_dir: Path, run: str) -> Path:
    """runs_dir/run/plan.yaml of an existing run.

    Raises:
        ConfigError: there is no such run; the message lists the runs there are.
    """
    path = Path(runs_dir) / run / "plan.yaml"
    if not path.is_file():
        raise ConfigError(f"{path.parent}: no such run (no plan.yaml); expected one of the runs "
                          f"in {runs_dir}: {[p.name for p in list_runs(runs_dir)]}")
    return path


def _plan_stages(run_dir: Path) -> list[dict[str, Any]]:
    # status must be fast over many runs: read only the keys it needs, no validation
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load((run_dir / "plan.yaml").read_text(), Loader=loader)
    return [{"name": s["name"], "max_epochs": s["spec"]["max_epochs"],
             "gpu": (s.get("placement") or {}).get("gpu_type")} for s in data.get("stages", [])]


def _stage_row(run_dir: Path, plan_stage: dict[str, Any], entry: dict[str, Any],
               slurm: dict[str, str] | None) -> dict[str, Any]:
    name = plan_stage["name"]
    final = run_dir / name / "checkpoints" / "final.pt"
    complete = final.exists() and (run_dir / name / "metrics.csv").exists()
    recorded = entry.get("state", "NOT_SUBMITTED")
    job = entry.get("slurm_job_id")
    slurm_state = (slurm or {}).get(str(job)) if job else None
    st = recorded
    if complete:
        st = run_state.COMPLETED
    elif slurm_state in ACTIVE:
        st = run_state.RUNNING if slurm_state == "RUNNING" else slurm_state
    elif slurm_state and slurm_state != "COMPLETED":
        st = slurm_state if slurm_state.startswith("CANCEL") else run_state.FAILED
    elif slurm_state == "COMPLETED" or recorded == run_state.COMPLETED:
        st = run_state.FAILED  # the job ended but left no final weights
    gone = recorded == run_state.RUNNING and not slurm_state and _process_gone(entry)
    if gone and st == run_state.RUNNING:  # killed without a word (kill -9, OOM killer, reboot)
        st = run_state.INTERRUPTED
    elapsed_s, eta_s = _timing(entry, st, plan_stage["max_epochs"])
    before = entry.get("run_model_before") or {}
    best = entry.get("best_dice")
    below = (st == run_state.COMPLETED and isinstance(best, (int, float))
             and isinstance(before.get("dice"), (int, float)) and best < before["dice"])
    return {"name": name, "job_id": entry.get("job_id"), "state": st, "slurm_state": slurm_state,
            "elapsed_s": elapsed_s, "eta_s": eta_s,
            "attempts": entry.get("attempts", 0), "requeues": entry.get("requeues", 0),
            "timeouts": entry.get("timeouts", 0),
            "epoch": entry.get("epoch", 0), "max_epochs": plan_stage["max_epochs"],
            "nodes": entry.get("nodes"),  # where its ranks ran (the last attempt)
            # a mixed-GPU plan's type for the stage, or the one it was planned again for
            "gpu": entry.get("gpu") or plan_stage.get("gpu"),
            "best_dice": entry.get("best_dice"), "peak_mem_gb": entry.get("peak_mem_gb"),
            "handoff": entry.get("handoff"),  # epoch-0 Dice vs the previous stage's final
            "error": entry.get("error") or (f"process {entry.get('pid')} on {entry.get('host')} "
                                            "ended without a word; resume continues from last.pt"
                                            if gone and st == run_state.INTERRUPTED else None),
            "log": entry.get("stderr"),
            # the run's model when the stage started; below: it ended with a lower best Dice
            "run_model_before": before or None, "below_run_model": below,
            "final": str(final) if complete else None}


def _process_gone(entry: dict[str, Any]) -> bool:
    """True when the stage's process ran on this host, outside SLURM, and no longer exists.
    A SLURM job's liveness is SLURM's to say (its ranks may run on other nodes, and a pid
    on this host may be anyone's)."""
    pid, host = entry.get("pid"), entry.get("host")
    if entry.get("slurm_job_id") or not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, as another user's
        return False
    return False


def _timing(entry: dict[str, Any], state: str, max_epochs: int) -> tuple[float | None, float | None]:
    """(seconds since the current attempt started, or that it ran; seconds to the stage's
    end at the last epoch's pace, while it runs)."""
    started = _when(entry.get("started"))
    if started is None:
        return None, None
    ended = _when(entry.get("ended")) if state != run_state.RUNNING else None
    elapsed = max(0.0, (ended or time.time()) - started)
    epoch_s = entry.get("epoch_s")
    eta = None
    if state == run_state.RUNNING and isinstance(epoch_s, (int, float)):
        eta = max(0, max_epochs - int(entry.get("epoch", 0))) * float(epoch_s)
    return round(elapsed, 1), None if eta is None else round(eta, 1)


def _when(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def _run_state(stages: list[dict[str, Any]]) -> str:
    """A run's state over the stages that were submitted (`submit --no-lcnn` can complete)."""
    states = [s["state"] for s in stages if s["state"] != "NOT_SUBMITTED"]
    if not states:
        return "NOT_SUBMITTED"
    if all(s == run_state.COMPLETED for s in states):
        return run_state.COMPLETED
    for bad in (run_state.FAILED, "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
        if bad in states:
            return run_state.FAILED
    if any(s in ("RUNNING", "REQUEUED") for s in states):
        return run_state.RUNNING
    if run_state.INTERRUPTED in states:
        return run_state.INTERRUPTED
    if any(s in (run_state.SUBMITTED, run_state.PENDING) for s in states):  # SLURM's too
        return run_state.PENDING
    return run_state.CANCELLED  # what is left: CANCELLED (by the user or a failed dependency)


def collect_status(runs_dir: Path, run: str | None = None,
                   slurm_query: SlurmQuery | None = None) -> dict[str, Any]:
    """The `status --json` document for one run or all runs under `runs_dir`.

    `slurm_query` is called once with every job id of every run shown (one sacct call);
    when it returns None, the on-disk state is shown and `slurm` says so.
    """
    run_dirs = [run_plan_path(runs_dir, run).parent] if run else list_runs(runs_dir)
    loaded: list[tuple[Path, list[dict[str, Any]], list[tuple[int | None, Path, dict[str, Any]]]]] = []
    for rd in run_dirs:
        # a cross-validation run: its folds train the same stages, each in its own sub-run
        dirs: list[tuple[int | None, Path]] = [(None, rd)]
        dirs += [(int(fd.name[4:]), fd) for fd in run_state.fold_run_dirs(rd)]
        loaded.append((rd, _plan_stages(rd), [(f, d, run_state.read_state(d)) for f, d in dirs]))
    ids = [str(e["slurm_job_id"]) for _, _, parts in loaded for _, _, st in parts
           for e in st["stages"].values() if e.get("slurm_job_id")]
    slurm = slurm_query(ids) if (slurm_query and ids) else ({} if not ids else None)
    runs = []
    for rd, stages, parts in loaded:
        rows = []
        for fold, d, st in parts:
            part = [_stage_row(d, ps, st["stages"].get(ps["name"], {}), slurm) for ps in stages]
            if fold is not None:
                part = [{**r, "name": f"fold{fold}/{r['name']}", "fold": fold} for r in part]
            elif len(parts) > 1:  # the run's own stages were not submitted: only its folds
                part = [r for r in part if r["state"] != "NOT_SUBMITTED"]
            rows += part
        main = parts[0][2]
        doc = {"run": rd.name, "state": _run_state(rows), "executor": main.get("executor"),
               "stages": rows, "model": main.get("model")}  # runs/<run>/best.pt
        if len(parts) > 1:
            doc["folds"] = len(parts) - 1
            doc["fold_models"] = {f: st.get("model") for f, _, st in parts if f is not None}
            doc["cv"] = stage_summary(rows)  # per stage: best Dice mean ± std over the folds
        runs.append(doc)
    return {"runs": runs, "slurm": "unavailable: showing the on-disk state" if slurm is None else "ok"}
