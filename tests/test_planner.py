"""The planner: the estimate counts what a real step allocates; the plan fits and is tight."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.config import load_curriculum
from orchestrator.errors import PlanError
from orchestrator.planning.memory import DEFAULT_OVERHEADS, LivePeak, estimate_step_peak
from orchestrator.planning.planner import Budget, build_stage_model, plan_stage
from orchestrator.training.step import estimation_step

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stage1():
    _cur, stages = load_curriculum(REPO / "tests" / "data" / "tiny.yaml")
    return stages[0][0]


def test_fake_estimate_equals_live_bytes_of_a_real_step(stage1) -> None:
    """Same tracker on real tensors: the fake run must see the same storages (±1 %)."""
    step = estimation_step(stage1, amp=False)
    fake = estimate_step_peak(lambda: build_stage_model(stage1, 4, False), (2, 1, 32, 32, 32),
                              (2, 32, 32, 32), step, cuda_target=False).tensor_bytes
    torch.manual_seed(0)
    with LivePeak() as tracker:
        model = build_stage_model(stage1, 4, False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 2, (2, 32, 32, 32))
        for _ in range(2):
            step(model, opt, x, y)
    assert fake == pytest.approx(tracker.peak, rel=0.01)


def test_estimate_grows_with_batch_and_shrinks_with_checkpointing(stage1) -> None:
    step = estimation_step(stage1, amp=True)
    est = lambda bs, ck: estimate_step_peak(  # noqa: E731
        lambda: build_stage_model(stage1, 8, ck), (bs, 1, 64, 64, 64), (bs, 64, 64, 64), step,
        cuda_target=False).tensor_bytes
    assert est(2, False) > est(1, False)
    assert est(2, True) < est(2, False)


def test_plan_fits_and_next_larger_batch_does_not(stage1) -> None:
    spec = stage1.model_copy(update={"planner": stage1.planner.model_copy(update={"max_batch_size": 64})})
    budget = Budget(1.0, DEFAULT_OVERHEADS["cpu"], cuda_target=False)
    sp = plan_stage(spec, None, budget, estimation_step)
    assert sp.predicted_gb <= budget.target_gb
    bigger = plan_stage(spec.model_copy(update={"planner": spec.planner.model_copy(
        update={"min_batch_size": sp.batch_size + 1, "max_batch_size": sp.batch_size + 1})}),
        None, Budget(100.0, budget.overheads, False), estimation_step)
    assert bigger.predicted_gb > budget.target_gb, "a batch one larger would also have fitted"


def test_tight_budget_turns_on_checkpointing_then_shrinks(stage1) -> None:
    spec = stage1.model_copy(update={"input_size_vox": (96, 96, 96), "base_filters": 8})
    roomy = plan_stage(spec, None, Budget(50.0, DEFAULT_OVERHEADS["cpu"], False), estimation_step)
    assert not roomy.checkpointing and roomy.input_size_vox == (96, 96, 96)
    no_ckpt_gb = roomy.predicted_gb if roomy.batch_size == 2 else None
    tight_gb = 0.6 + 0.5 * ((no_ckpt_gb or 1.0) - 0.6)
    tight = plan_stage(spec, None, Budget(tight_gb, DEFAULT_OVERHEADS["cpu"], False), estimation_step)
    assert tight.checkpointing or tuple(tight.input_size_vox) != (96, 96, 96)
    assert tight.predicted_gb <= tight_gb
    assert any("checkpointing" in r for r in tight.reasons)


def test_nothing_fits_names_smallest_budget(stage1) -> None:
    want = r"nothing fits in 0\.05 GB; .* needs [0-9.]+ GB: use --target-mem [0-9.]+"
    with pytest.raises(PlanError, match=want):
        plan_stage(stage1, None, Budget(0.05, DEFAULT_OVERHEADS["cpu"], False), estimation_step)
