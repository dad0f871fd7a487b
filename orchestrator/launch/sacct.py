"""SLURM's own view of jobs, in one batched `sacct` call."""
from __future__ import annotations

import shutil
import subprocess


def sacct_states(job_ids: list[str], timeout_s: float = 10) -> dict[str, str] | None:
    """{job_id: SLURM state} for the given ids; None when sacct is missing or fails.

    A requeued job appears several times: the last row is its current attempt.
    """
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    if shutil.which("sacct") is None:
        return None
    try:
        out = subprocess.run(["sacct", "-j", ",".join(ids), "-X", "-n", "-P", "-o", "JobID,State"],
                             capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    states: dict[str, str] = {}
    for line in out.splitlines():
        if "|" in line:
            job, st = line.split("|", 1)
            states[job.strip()] = st.split()[0] if st.strip() else "UNKNOWN"  # "CANCELLED by 0"
    return states


def scancel(job_ids: list[str]) -> None:
    ids = [str(j) for j in job_ids if j]
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)
