"""kill -9 a training stage at seeded random moments; every time, what is on disk is
trustworthy and the resumed stage ends exactly where an uninterrupted one does."""
from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import pytest
import reliability_kit as kit
import torch
from tiny_plans import quick_tiny_plan

from orchestrator.training.checkpoints import load_checkpoint

S1 = "stage1_basic_cnn"
SHORT = {"max_epochs": 3, "iterations_per_epoch": 4, "checkpoint_every_steps": 1}
# the files a child writes, and how many times at least (the kill points are drawn among them)
WRITES = {"last.pt": 6, "state.json": 3, "metrics.csv": 2, "memory_usage.json": 2,
          "best.pt": 1, "final.pt": 1}

one_thread = kit.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / S1 / "checkpoints" / "final.pt")["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path):
    """The stage run once without interruption, in a child like the killed ones."""
    plan, path = quick_tiny_plan(tmp_path_factory.mktemp("ref"), tiny_data, "ref", stage_updates=SHORT)
    kit.run_child(kit.noop, ())  # the fork server's imports are not part of a run's time
    t0 = time.monotonic()
    assert kit.run_stage_child(path, S1) == 0
    return _final_weights(plan.run_dir), time.monotonic() - t0, plan.run_dir


@pytest.mark.slow
def test_stage_survives_kills_at_random_moments(tmp_path: Path, tiny_data: Path, reference) -> None:
    """RELIABILITY_KILLS kills (default 20): a third from outside at a random moment, the rest
    inside a random atomic write (checkpoints, state.json, metrics.csv, ...), half-way
    through the temporary file or just before its rename. After each: every checkpoint
    loads, state.json parses and claims nothing that is not on disk, metrics.csv has each
    epoch once, and progress never goes back; the run is then resumed, killed again, and
    each chain that reaches the end must equal the uninterrupted run bit for bit."""
    want, run_s, _ = reference
    rng = random.Random(kit.SEED)
    chains = kills = children = 0
    plan, path = quick_tiny_plan(tmp_path / "c0", tiny_data, "k", stage_updates=SHORT)
    seen: dict = {}
    while kills < kit.KILLS:
        spec = kit.next_kill(rng, children, run_s, WRITES)
        children += 1
        assert children <= 3 * kit.KILLS, f"only {kills} of {children} children were killed"
        timed = not isinstance(spec, kit.KillPoint)
        code = kit.run_stage_child(path, S1, None if timed else spec, spec if timed else None)
        if code == -9:
            kills += 1
            kit.TALLY["kills"] += 1
            seen = kit.check_stage_after_kill(plan.run_dir, S1, seen)
            continue
        assert code == 0, f"after {spec}: the child exited {code}"
        _check_complete(plan.run_dir, want)  # the kill point came after the stage's end
        chains += 1
        plan, path = quick_tiny_plan(tmp_path / f"c{chains}", tiny_data, "k", stage_updates=SHORT)
        seen = {}
    assert kit.run_stage_child(path, S1) == 0  # the last chain, to its end
    _check_complete(plan.run_dir, want)


def _check_complete(run_dir: Path, want: dict[str, torch.Tensor]) -> None:
    import json

    got = _final_weights(run_dir)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    if differ:
        kit.TALLY["lost"] += 1
    assert not differ, f"resumed run differs from the uninterrupted one in {differ[:3]}"
    entry = json.loads((run_dir / "state.json").read_text())["stages"][S1]
    assert entry["state"] == "COMPLETED" and entry["epoch"] == SHORT["max_epochs"], entry
    rows = (run_dir / S1 / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]
    assert not list((run_dir / S1).rglob(".tmp-*")), "temporary files of killed writes were left"


def test_kill_between_final_pt_and_its_state_record(tmp_path: Path, tiny_data: Path, reference) -> None:
    """Killed after final.pt was written, inside the write of state.json that records the
    stage COMPLETED (the last of a fresh run of SHORT): run again, the stage is complete
    and state.json says so (it said RUNNING)."""
    plan, path = quick_tiny_plan(tmp_path, tiny_data, "end", stage_updates=SHORT)
    # state.json's writes: the run's model at the start, RUNNING, the first last.pt, each
    # epoch, each epoch that became the run's model (as in the uninterrupted run), COMPLETED
    with open(reference[2] / S1 / "metrics.csv", newline="") as fh:
        dices = [float(r["val_dice"]) for r in csv.DictReader(fh)]
    improved = sum(d > max([-1.0, *dices[:i]]) for i, d in enumerate(dices))
    last = 3 + SHORT["max_epochs"] + improved + 1
    assert kit.run_stage_child(path, S1, kit.KillPoint("state.json", last, "before_rename")) == -9
    kit.TALLY["kills"] += 1
    assert (plan.run_dir / S1 / "checkpoints" / "final.pt").exists()
    assert kit.check_stage_after_kill(plan.run_dir, S1, {})["epoch"] == 3
    assert kit.run_stage_child(path, S1) == 0
    _check_complete(plan.run_dir, reference[0])
