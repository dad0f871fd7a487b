"""`status` over many runs on disk, and its rate-limited sacct (issue 7)."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.cli.bench.status import make_runs
from orchestrator.launch.sacct import SACCT_CACHE, rate_limited_sacct
from orchestrator.runs.status import collect_status


@pytest.fixture(scope="module")
def many_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    runs_dir = tmp_path_factory.mktemp("many") / "runs"
    return runs_dir, make_runs(runs_dir, n_runs=20)


def test_status_over_many_runs_reads_each_state(many_runs) -> None:
    runs_dir, ids = many_runs
    calls: list[list[str]] = []

    def unavailable(job_ids: list[str]) -> None:
        calls.append(job_ids)
        return

    doc = collect_status(runs_dir, None, unavailable)  # its speed: `orchestrator bench status`
    assert len(calls) == 1 and sorted(calls[0]) == sorted(ids)  # one batched query
    assert doc["slurm"].startswith("unavailable")
    assert Counter(r["state"] for r in doc["runs"]) == {"COMPLETED": 12, "RUNNING": 4,
                                                       "FAILED": 2, "PENDING": 2}
    failed = next(r for r in doc["runs"] if r["state"] == "FAILED")
    assert [s["state"] for s in failed["stages"][:2]] == ["COMPLETED", "FAILED"]


def test_elapsed_and_eta_from_the_attempt_and_the_last_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.runs import status
    from orchestrator.runs.status import _timing

    def iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))

    now = 1_800_000_000.0  # a fixed clock: elapsed is exact, not "about 100 s"
    monkeypatch.setattr(status, "time", SimpleNamespace(time=lambda: now))
    running = {"started": iso(now - 100), "epoch": 3, "epoch_s": 20.0}
    elapsed, eta = _timing(running, "RUNNING", 10)
    assert elapsed == 100.0 and eta == 7 * 20.0  # 7 epochs left at 20 s each
    done = {"started": iso(now - 500), "ended": iso(now - 200), "epoch": 10, "epoch_s": 20.0}
    assert _timing(done, "COMPLETED", 10) == (300.0, None)
    assert _timing({}, "PENDING", 10) == (None, None)


def test_status_cli_lists_runs_and_says_sacct_is_unavailable(many_runs, monkeypatch) -> None:
    runs_dir, _ = many_runs
    monkeypatch.setenv("PATH", "/nonexistent")  # no sacct: the on-disk state is shown
    res = CliRunner().invoke(app, ["status", "--runs-dir", str(runs_dir), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc["runs"]) == 20 and doc["slurm"].startswith("unavailable")
    res = CliRunner().invoke(app, ["status", "run-008", "--runs-dir", str(runs_dir)])
    assert res.exit_code == 0, res.output
    assert "run-008: FAILED" in res.output and "CUDA out of memory" in res.output


def test_sacct_is_asked_at_most_once_per_interval(tmp_path: Path) -> None:
    cache = tmp_path / SACCT_CACHE
    query = rate_limited_sacct(tmp_path, min_interval_s=60)
    first = query(["999991", "999992"])  # real sacct if installed (None if not)
    asked_at = json.loads(cache.read_text())["time"]
    assert query(["999992"]) == (None if first is None else {})  # from the cache
    assert json.loads(cache.read_text())["time"] == asked_at
    query(["999993"])  # an id the cached answer does not cover: asked again
    assert json.loads(cache.read_text())["time"] > asked_at
    again = json.loads(cache.read_text())["time"]
    rate_limited_sacct(tmp_path, min_interval_s=0)(["999993"])  # interval over: asked again
    assert json.loads(cache.read_text())["time"] > again


def test_damaged_sacct_cache_is_ignored(tmp_path: Path) -> None:
    (tmp_path / SACCT_CACHE).write_text("{not json")
    rate_limited_sacct(tmp_path)(["999994"])
    assert json.loads((tmp_path / SACCT_CACHE).read_text())["ids"] == ["999994"]
