"""runs/<run>/state.json: per stage job id, state, attempts, timestamps, checkpoints.

Several processes write it (the submitter records job ids, each stage job its progress),
so every update is a read-modify-write under an exclusive file lock, written atomically.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any, TypedDict

from orchestrator.atomic import atomic_write_text
from orchestrator.errors import ConfigError, SubmissionError

STATE_FILE = "state.json"
FOLDS_DIR = "folds"  # runs/<run>/folds/fold<i>/: the sub-runs of a cross-validation



class StageState(str, Enum):
    """A stage's state as the orchestrator records it in state.json (SLURM's own states,
    such as TIMEOUT, are shown beside). Members are the JSON strings themselves, so a
    state.json written before the enum loads unchanged and a member equals its string.
    (`enum.StrEnum` needs Python 3.11; pyproject supports 3.10.)"""

    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"  # stopped by a signal with last.pt written; a requeue resumes it

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:  # f"{state:10}" pads the string
        return format(self.value, format_spec)


PENDING, SUBMITTED, RUNNING, COMPLETED, FAILED, CANCELLED, INTERRUPTED = (
    StageState.PENDING, StageState.SUBMITTED, StageState.RUNNING, StageState.COMPLETED,
    StageState.FAILED, StageState.CANCELLED, StageState.INTERRUPTED)


class StageEntry(TypedDict, total=False):
    """One stage's entry of state.json (`stages: {NAME: entry}`); every key is optional."""

    state: StageState | str  # a StageState's string; `recorded_state` parses it
    job_id: str
    slurm_job_id: str
    attempts: int
    requeues: int
    epoch: int
    best_dice: float | None
    peak_mem_gb: float | None
    last_checkpoint: str | None
    final: str | None
    fresh_requested: bool
    error: str
    started: str
    ended: str
    updated: str


def recorded_state(entry: StageEntry | dict[str, Any]) -> StageState | None:
    """The entry's state as a StageState; None when it has none (or one not recorded here)."""
    try:
        return StageState(entry["state"])
    except (KeyError, ValueError):
        return None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def fold_run_dirs(run_dir: Path) -> list[Path]:
    """The fold sub-runs of a cross-validation run, in fold order ([] for a plain run)."""
    folds = Path(run_dir) / FOLDS_DIR
    if not folds.is_dir():
        return []
    found = [p.parent for p in folds.glob("fold*/plan.yaml") if p.parent.name[4:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[4:]))


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run's state; an empty skeleton when the file does not exist yet."""
    path = Path(run_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"run": Path(run_dir).name, "stages": {}}
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    data.setdefault("stages", {})
    return data


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".state.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def under_lock(run_dir: Path, fn: Callable[[], None]) -> None:
    """Run `fn` (a read-modify-write of a run's file, e.g. plan.yaml) under the run's lock."""
    with _locked(Path(run_dir)):
        fn()


def _mutate(run_dir: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    run_dir = Path(run_dir)
    with _locked(run_dir):
        state = read_state(run_dir)
        change(state)
        atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
        return state


def update_stage(run_dir: Path, stage: str, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the stage's entry; returns the stage's new entry."""
    def change(state: dict[str, Any]) -> None:
        state["stages"].setdefault(stage, {}).update(fields, updated=now_iso())
    return dict(_mutate(run_dir, change)["stages"][stage])


def bump_stage(run_dir: Path, stage: str, counter: str, **fields: Any) -> dict[str, Any]:
    """Increment an integer counter of a stage (attempts, requeues) and merge `fields`."""
    def change(state: dict[str, Any]) -> None:
        entry = state["stages"].setdefault(stage, {})
        entry.update(fields, updated=now_iso())
        entry[counter] = int(entry.get(counter, 0)) + 1
    return dict(_mutate(run_dir, change)["stages"][stage])


def update_run(run_dir: Path, **fields: Any) -> None:
    """Merge run-level fields (executor, submitted time, ...)."""
    _mutate(run_dir, lambda state: state.update(fields))


def offer_run_model(run_dir: Path, record: dict[str, Any], write: Callable[[], None]) -> bool:
    """Make `record` ({"stage", "epoch", "dice", ...}) the run's model if its Dice beats the
    one in state.json's "model": under the lock, `write()` (the checkpoint) first, then the
    record, so two writers cannot interleave and the record never names a file not written.

    Returns:
        Whether it was better (and written).
    """
    taken = []

    def change(state: dict[str, Any]) -> None:
        held = state.get("model") or {}
        if not record["dice"] > held.get("dice", float("-inf")):
            return
        write()
        state["model"] = {**record, "updated": now_iso()}
        taken.append(True)
    _mutate(Path(run_dir), change)
    return bool(taken)


def claim_run(run_dir: Path, **fields: Any) -> None:
    """Record a run's submission (`fields`: executor, submitted, ...), once: under the lock,
    so of two `submit`s of one run, started at the same moment or not, the second is refused.

    Raises:
        SubmissionError: the run was submitted before; nothing is written.
    """
    run_dir = Path(run_dir)

    def change(state: dict[str, Any]) -> None:
        if state.get("submitted"):
            raise SubmissionError(
                f"{run_dir / STATE_FILE}: run {run_dir.name} was submitted already "
                f"({state.get('executor')}, {state['submitted']}); expected a new run - "
                f"`orchestrator resume {run_dir.name}` continues it, or plan another --run")
        state.update(fields)
    _mutate(run_dir, change)


def request_fresh_start(run_dir: Path, stage: str, stages: list[str]) -> None:
    """Mark a stage to start over from its beginning at its next run (`resume --fresh`):
    its epoch and last checkpoint are cleared, so the trainer neither resumes nor refuses.

    Raises:
        ConfigError: `stage` is not one of the plan's `stages`.
    """
    if stage not in stages:
        raise ConfigError(f"--fresh {stage}: no such stage in {Path(run_dir) / 'plan.yaml'};"
                          f" expected one of {', '.join(stages)}")
    update_stage(run_dir, stage, fresh_requested=True, epoch=0, last_checkpoint=None,
                 state=PENDING, final=None)
