"""Out of memory, a full disk, a dead data loader worker: each ends in a completed stage or
one clear error, never a hang, a lost checkpoint or a state file that lies."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import reliability_kit as kit
import torch
from tiny_plans import quick_tiny_plan, start_stage_with_workers

from orchestrator import atomic
from orchestrator.errors import CheckpointError
from orchestrator.runs.state import read_state
from orchestrator.training import memory_guard
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.step import Objective
from orchestrator.training.trainer import run_stage

S1 = "stage1_basic_cnn"

one_thread = kit.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_oom_in_the_first_steps_falls_back_and_completes(tmp_path: Path, tiny_data: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard is armed as on a GPU; the first two steps run out of memory: the stage
    turns gradient checkpointing on, then splits the batch in two accumulated halves, as
    the planner's fallback order says, records both in state.json, and completes."""
    plan, path = quick_tiny_plan(tmp_path, tiny_data, "oom")
    real_init, real_call = memory_guard.OomFallback.__init__, Objective.__call__
    ooms = [2]

    def armed_init(self, runner) -> None:  # noqa: ANN001
        real_init(self, runner)
        self.steps_left = memory_guard.FIRST_STEPS  # as on a GPU

    def call(self, model, x, *args, **kwargs):  # noqa: ANN001, ANN202
        if ooms[0]:
            ooms[0] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, model, x, *args, **kwargs)

    monkeypatch.setattr(memory_guard.OomFallback, "__init__", armed_init)
    monkeypatch.setattr(Objective, "__call__", call)
    res = run_stage(path, S1)
    assert res["final"] and Path(res["final"]).exists() and ooms == [0]
    entry = read_state(plan.run_dir)["stages"][S1]
    assert entry["state"] == "COMPLETED"
    fallback = entry["memory_fallback"]
    assert len(fallback) == 2 and "gradient checkpointing on" in fallback[0], fallback
    assert "batch 2 as 2 backward passes of 1 (accumulated)" in fallback[1], fallback


def test_full_disk_while_writing_a_checkpoint(tmp_path: Path, tiny_data: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up half-way through the 4th write of last.pt: the previous last.pt
    stays as it was, no temporary file is left, the stage stops with one CheckpointError
    naming the file and what to do, and state.json says FAILED with that reason."""
    plan, path = quick_tiny_plan(tmp_path, tiny_data, "full", stage_updates={"max_epochs": 2})
    last = plan.run_dir / S1 / "checkpoints" / "last.pt"
    real = atomic.atomic_write
    writes, kept = [0], {}

    def atomic_write(target, writer) -> None:  # noqa: ANN001
        if Path(target).name == "last.pt":
            writes[0] += 1
            if writes[0] == 4:
                kept["bytes"] = last.read_bytes()

                def full(fh) -> None:  # noqa: ANN001
                    fh.write(b"\0" * 4096)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(target, full)
        return real(target, writer)

    monkeypatch.setattr(atomic, "atomic_write", atomic_write)
    with pytest.raises(CheckpointError, match=r"last\.pt: could not write the checkpoint \(No space "
                                              r"left on device\); the previous last\.pt is unchanged - "
                                              r"free space in .*checkpoints"):
        run_stage(path, S1)
    assert last.read_bytes() == kept["bytes"]
    assert load_checkpoint(last)["progress"]["global_step"] == 2  # the 3rd write: epoch 1's end
    assert not list(last.parent.glob(".tmp-*"))
    entry = read_state(plan.run_dir)["stages"][S1]
    assert entry["state"] == "FAILED" and "No space left on device" in entry["error"], entry
    monkeypatch.setattr(atomic, "atomic_write", real)  # space freed: the stage resumes and ends
    assert run_stage(path, S1)["start"].startswith("resumed from")


def test_a_killed_loader_worker_is_a_clear_error_not_a_hang(tmp_path: Path, tiny_data: Path) -> None:
    """kill -9 of the DataLoader worker in the middle of an epoch (the kernel's OOM killer
    does this): `run-stage` ends within seconds with one line saying what to change,
    exit 2; last.pt is intact and state.json says FAILED."""
    plan, path = quick_tiny_plan(tmp_path, tiny_data, "w", stage_updates={
        "num_workers": 1, "iterations_per_epoch": 400})
    proc, workers = start_stage_with_workers(plan, path, S1, env=kit.ONE_THREAD)
    last = plan.run_dir / S1 / "checkpoints" / "last.pt"
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the stage hung after its worker died") from None
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert re_search(r"stage stage1_basic_cnn: DataLoader worker \(pid.*\) (is killed by signal|"
                     r"exited unexpectedly).*set num_workers: 0", errors[0])
    assert 0 < load_checkpoint(last)["progress"]["step_in_epoch"] < 400
    entry = json.loads((plan.run_dir / "state.json").read_text())["stages"][S1]
    assert entry["state"] == "FAILED" and "DataLoader worker" in entry["error"], entry


def re_search(pattern: str, text: str) -> bool:
    import re

    assert re.search(pattern, text), f"{pattern!r} not in {text!r}"
    return True
