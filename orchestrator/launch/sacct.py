"""SLURM's own view of jobs, in one batched `sacct` call, rate-limited across processes."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.atomic import atomic_write_text

SACCT_MIN_INTERVAL_S = 5.0  # `status` (and every `--watch`) asks sacct at most this often
SACCT_CACHE = ".sacct-cache.json"  # in the runs folder: shared by every `status` reading it


def sacct_states(job_ids: list[str], timeout_s: float = 5) -> dict[str, str] | None:
    """{job_id: SLURM state} for the given ids; None when sacct is missing or fails.

    A requeued job appears several times: the last row is its current attempt.
    """
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    if shutil.which("sacct") is None:
        return None
    # `sacct -j 12_0` says nothing while the array waits; `sacct -j 12` shows 12_[0-3]
    asked = sorted(set(ids) | {j.split("_")[0] for j in ids if "_" in j})
    try:
        out = subprocess.run(["sacct", "-j", ",".join(asked), "-X", "-n", "-P", "-o", "JobID,State"],
                             capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    states: dict[str, str] = {}
    pending_tasks: dict[str, str] = {}
    for line in out.splitlines():
        if "|" in line:
            job, st = (part.strip() for part in line.split("|", 1))
            st = st.split()[0] if st else "UNKNOWN"  # "CANCELLED by 0"
            if job.endswith("]") and "_[" in job:  # array tasks not started: 12_[0-3%2]
                pending_tasks.update(dict.fromkeys(_array_tasks(job), st))
            else:
                states[job] = st
    return {**pending_tasks, **states}


def _array_tasks(job: str) -> list[str]:
    """'12_[0-2,5%2]' -> ['12_0', '12_1', '12_2', '12_5']."""
    base, spec = job[:-1].split("_[", 1)
    tasks: list[str] = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (hi.isdigit() or not hi):
            tasks += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return tasks


def scancel(job_ids: list[str]) -> None:
    ids = [str(j) for j in job_ids if j]
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)


def rate_limited_sacct(runs_dir: Path, min_interval_s: float = SACCT_MIN_INTERVAL_S
                       ) -> Callable[[list[str]], dict[str, str] | None]:
    """A `sacct_states` that calls sacct at most once per `min_interval_s` for a runs folder.

    The answer (or the fact that sacct failed) is kept in `runs_dir/.sacct-cache.json`;
    a call within `min_interval_s` whose job ids the cached answer covers reuses it, so
    many `status --watch` windows make one sacct call between them, and a cluster whose
    sacct hangs costs one timeout per interval, not one per refresh.
    """
    cache = Path(runs_dir) / SACCT_CACHE

    def query(job_ids: list[str]) -> dict[str, str] | None:
        ids = sorted({str(j) for j in job_ids if j})
        try:
            held = json.loads(cache.read_text())
            fresh = 0 <= time.time() - float(held["time"]) < min_interval_s
            if fresh and set(ids) <= set(held["ids"]):
                states = held["states"]
                return None if states is None else {j: states[j] for j in ids if j in states}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache yet, or a damaged one: ask sacct
        states = sacct_states(ids)
        with contextlib.suppress(OSError):  # a runs folder we may not write to: no cache, still an answer
            atomic_write_text(cache, json.dumps({"time": time.time(), "ids": ids, "states": states}))
        return states

    return query
