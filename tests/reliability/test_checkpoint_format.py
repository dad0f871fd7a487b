"""Checkpoints hold plain data: what today's trainer writes loads with weights_only=True,
and a last.pt in the format before it (numpy RNG arrays) still resumes."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import reliability_kit as kit
import torch
from tiny_plans import quick_tiny_plan

from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.trainer import run_stage

S1 = "stage1_basic_cnn"

one_thread = kit.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_written_checkpoints_need_no_pickled_object(tmp_path: Path, tiny_data: Path) -> None:
    plan, path = quick_tiny_plan(tmp_path, tiny_data, "plain")
    run_stage(path, S1, max_steps=1)
    last = plan.run_dir / S1 / "checkpoints" / "last.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []
    torch.load(last, weights_only=True)  # plain torch, no allow-list


def test_a_format_1_last_pt_still_resumes(tmp_path: Path, tiny_data: Path) -> None:
    """Written before checkpoints held plain data only: numpy's RNG array and tuples,
    a numpy float. numpy's array reconstruction is allow-listed; nothing else is."""
    plan, path = quick_tiny_plan(tmp_path, tiny_data, "old", stage_updates={"max_epochs": 2})
    run_stage(path, S1, max_steps=3)
    last = plan.run_dir / S1 / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt.update(format=1, best_dice=np.float64(ckpt["best_dice"]),
                rng={"python": random.getstate(), "numpy": np.random.get_state(),
                     "torch": torch.get_rng_state()})
    torch.save(ckpt, last)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(last)
    res = run_stage(path, S1)
    assert res["start"].startswith("resumed from") and res["final"], res
    assert load_checkpoint(last)["format"] == 2
