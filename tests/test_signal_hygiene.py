"""A stage run in a process that lives on leaves its signals as it found them, and the
planner's workers end on `Pool.terminate()` whatever their parent handles.

Found as a hang: a stage run by the debug executor left its stop flag on SIGTERM in the
test process; a later plan's forked workers inherited it, swallowed the SIGTERM of
`Pool.terminate()` and waited on their task queue for ever, and `plan` with them.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from cli_runner import invoke
from tiny_plans import quick_tiny_plan

from orchestrator.launch.submit import submit_plan
from orchestrator.planning import pool as planning_pool
from orchestrator.runs.state import read_state
from orchestrator.training.interrupt import StopFlag

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def _handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in STOP_SIGNALS}


def test_a_stage_run_in_this_process_puts_the_handlers_back(tmp_path: Path, tiny_data: Path) -> None:
    before = _handlers()
    plan, path = quick_tiny_plan(tmp_path / "runs", tiny_data, run="inproc",
                                 stage_updates={"max_epochs": 1, "iterations_per_epoch": 2})
    first = plan.stages[0].name
    submit_plan(plan, path, "debug", only=[first])  # the debug executor runs it in this process
    assert read_state(plan.run_dir)["stages"][first]["state"] == "COMPLETED"
    assert _handlers() == before
    res = invoke("run-stage", "--plan", str(path), "--stage", plan.stages[1].name)
    assert res.exit_code == 0, res.output
    assert _handlers() == before


def test_planning_workers_end_on_terminate_though_the_parent_swallows_sigterm() -> None:
    stop = StopFlag()
    stop.install(signal.SIGTERM)  # what a stage run in this process installs: it only records
    try:
        pool = planning_pool.worker_pool(2)
        assert pool.apply_async(time.sleep, (0,)).get(timeout=30) is None  # workers up
        pool.apply_async(time.sleep, (2,))  # a guess still being estimated at terminate()
        time.sleep(0.5)
        ended = threading.Thread(target=lambda: (pool.terminate(), pool.join()), daemon=True)
        t0 = time.monotonic()
        ended.start()
        ended.join(30)
        assert not ended.is_alive(), "Pool.terminate() still waits on a worker after 30 s"
        assert time.monotonic() - t0 < 2  # the busy worker was ended, not waited for
        assert stop.signum is None  # the parent was not signalled
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
