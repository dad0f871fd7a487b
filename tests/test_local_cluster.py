"""The local SLURM cluster, used through submitit the way the orchestrator uses it.

Job functions are stdlib callables: a function defined in a test module fails to
unpickle on the node (the tests folder is not importable there).
"""

from __future__ import annotations

import operator
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import submitit
from waiting import wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(60)]


def make_executor(folder: Path) -> submitit.AutoExecutor:
    # cluster= explicitly: AutoExecutor picks slurm whenever srun is on PATH.
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1, mem_gb=1)
    return executor


def sacct_rows(job_ids: list[str], timeout_s: float = 15) -> dict[str, dict[str, str]]:
    """State, Start and End per job once every job has an End in sacct (it lags ~1 s)."""
    def finished() -> dict[str, dict[str, str]] | None:
        out = subprocess.run(
            ["sacct", "-j", ",".join(job_ids), "-n", "-X", "-o", "JobID,State,Start,End", "-P"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        rows = {}
        for line in out.splitlines():
            job_id, state, start, end = line.split("|")
            rows[job_id] = {"State": state, "Start": start, "End": end}
        done = set(job_ids) <= set(rows) and all(rows[j]["End"] not in ("", "Unknown") for j in job_ids)
        return rows if done else None

    return wait_for(finished, timeout_s, f"sacct to show {job_ids} finished")


def test_submit_returns_result(slurm_folder: Path) -> None:
    job = make_executor(slurm_folder).submit(operator.add, 2, 3)

    assert job.result() == 5
    # Not job.state: it is cached (UNKNOWN) right after result(), and sacct lags ~1 s.
    assert sacct_rows([job.job_id])[job.job_id]["State"] == "COMPLETED"


def test_afterok_dependency_runs_after_parent(slurm_folder: Path) -> None:
    executor = make_executor(slurm_folder)
    first = executor.submit(time.sleep, 2)
    after_first = {"dependency": f"afterok:{first.job_id}"}
    executor.update_parameters(slurm_additional_parameters=after_first)
    second = executor.submit(operator.mul, 6, 7)

    # The parent sleeps, so the child is still pending on it here.
    shown = subprocess.run(
        ["scontrol", "show", "job", second.job_id],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    assert f"Dependency=afterok:{first.job_id}" in shown
    assert f"--dependency=afterok:{first.job_id}" in second.paths.submission_file.read_text()

    assert second.result() == 42
    assert first.result() is None
    rows = sacct_rows([first.job_id, second.job_id])
    assert rows[first.job_id]["State"] == "COMPLETED"
    assert rows[second.job_id]["State"] == "COMPLETED"
    first_end = datetime.fromisoformat(rows[first.job_id]["End"])
    second_start = datetime.fromisoformat(rows[second.job_id]["Start"])
    assert second_start >= first_end, rows
