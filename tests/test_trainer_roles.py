"""The rank's role, passed to the runner: the writer writes a stage's files, a follower
(a DDP rank other than 0) trains the same steps and writes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_plans import quick_tiny_plan

from orchestrator.runs.state import read_state
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.parts import build_runner
from orchestrator.training.rank import Follower, Solo, Writer
from orchestrator.training.trainer import train_stage

S1 = "stage1_basic_cnn"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_follower_writes_nothing_and_the_writer_writes_the_stage(tmp_path: Path,
                                                                 tiny_data: Path) -> None:
    plan, _ = quick_tiny_plan(tmp_path, tiny_data)
    final = plan.run_dir / S1 / "checkpoints" / "final.pt"
    before = _files(plan.run_dir)
    assert before == {"plan.yaml"}

    follower = build_runner(plan, S1, role=Follower())
    res = train_stage(follower, final)
    assert res["epochs"] == plan.stage(S1).spec.max_epochs and not res["interrupted"]
    assert _files(plan.run_dir) == before  # no checkpoint, state.json, metrics or split file
    assert follower.log.rows  # its rows are kept in memory (early stopping agrees)

    writer = build_runner(plan, S1, role=Writer())
    train_stage(writer, final)
    written = _files(plan.run_dir) - before
    for name in (f"{S1}/checkpoints/last.pt", f"{S1}/checkpoints/best.pt",
                 f"{S1}/checkpoints/final.pt", f"{S1}/metrics.csv", f"{S1}/split.json",
                 "state.json"):
        assert name in written, (name, written)
    assert read_state(plan.run_dir)["stages"][S1]["state"] == "COMPLETED"
    # the follower trained the very steps the writer did (same seed, same samples)
    for name, tensor in load_checkpoint(final)["model"].items():
        torch.testing.assert_close(follower.model.state_dict()[name], tensor, msg=name)


class _FourRanks(Solo):
    """Peers as a rank of four would see them (the learning rate is all that is asked)."""

    world = 4


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)])
def test_ddp_lr_scaling_sets_the_rate_for_the_number_of_ranks(tmp_path: Path, tiny_data: Path,
                                                              rule: str, factor: float) -> None:
    plan, _ = quick_tiny_plan(tmp_path, tiny_data, ddp_lr_scaling=rule)
    runner = build_runner(plan, S1, role=Follower(), peers=_FourRanks())
    want = plan.stage(S1).spec.lr * factor
    assert runner.opt.param_groups[0]["initial_lr"] == pytest.approx(want)
    # each rank's dataset holds the whole step's samples, of which it draws its share
    assert len(runner.dataset) == 4 * runner.step_batch * plan.stage(S1).spec.iterations_per_epoch
