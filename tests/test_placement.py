"""How a stage's GPU type is chosen among the types' plans (planning/placement.py):
the smallest that keeps the curriculum values, else the one that gives up least; ties to
the earlier expected start, then to more idle GPUs; nothing fits: one line."""
from __future__ import annotations

import pytest
from conftest import TINY_CURRICULUM

from orchestrator.config import StagePlan, load_curriculum
from orchestrator.errors import PlanError
from orchestrator.plan_facts import GpuOption
from orchestrator.planning.estimator import Candidate
from orchestrator.planning.placement import _choose
from orchestrator.planning.planner import Shortfall


@pytest.fixture(scope="module")
def spec():
    _cur, stages = load_curriculum(TINY_CURRICULUM)
    return stages[0][0].model_copy(update={"base_filters": 16, "input_size_vox": (64, 64, 64)})


def _plan(spec, filters: int = 16, size: tuple[int, ...] = (64, 64, 64), batch: int = 2,
          gb: float = 1.0) -> StagePlan:
    return StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=None,
                     input_size_vox=size, base_filters=filters, batch_size=batch,
                     checkpointing=False, amp=False, params=0, predicted_gb=gb, reasons=["test"])


def test_the_smallest_type_that_keeps_the_curriculum_values(spec) -> None:
    small, mid, big = GpuOption("t4", 16), GpuOption("a100", 40), GpuOption("h100", 80)
    got = _choose(spec, [small, mid, big], {
        "t4": _plan(spec, filters=12), "a100": _plan(spec, batch=3, gb=30),
        "h100": _plan(spec, batch=8, gb=70)})
    assert got.placement.gpu_type == "a100" and got.batch_size == 3
    assert got.placement.reason == ("a100 (40 GB): 64x64x64, 16 filters, batch 3 fit; on t4 "
                                    "(16 GB) it would shrink to 64x64x64, 12 filters; no larger "
                                    "card needed (on h100 (80 GB): batch 8)")
    assert got.placement.considered == {"t4": 1.0, "a100": 30, "h100": 70}
    assert got.reasons[0] == f"placed on {got.placement.reason}"


def test_ties_go_to_the_earlier_start_then_to_more_idle_gpus(spec) -> None:
    results = {"a": _plan(spec), "b": _plan(spec)}
    late, soon = GpuOption("a", 40, start_s=3600), GpuOption("b", 40, start_s=0)
    got = _choose(spec, [late, soon], results)
    assert got.placement.gpu_type == "b" and "before a of the same memory: the earlier " \
        "expected start" in got.placement.reason
    busy, idle = GpuOption("a", 40, idle_gpus=0), GpuOption("b", 40, idle_gpus=4)
    got = _choose(spec, [busy, idle], results)
    assert got.placement.gpu_type == "b" and "more idle GPUs" in got.placement.reason


def test_where_every_type_shrinks_the_stage_the_one_that_gives_up_least(spec) -> None:
    results = {"t4": _plan(spec, filters=8, size=(48, 48, 48)),
               "v100": _plan(spec, filters=12, size=(64, 64, 64))}
    got = _choose(spec, [GpuOption("t4", 16), GpuOption("v100", 32)], results)
    assert got.placement.gpu_type == "v100" and got.base_filters == 12
    assert got.placement.reason.startswith("v100 (32 GB): gives up least of the types: 64x64x64, "
                                           "12 filters, batch 2 (the curriculum asks 64x64x64, "
                                           "16 filters)")


def test_a_stage_that_fits_no_type_names_the_largest_and_its_need(spec) -> None:
    short = Shortfall(spec.name, Candidate((32, 32, 32), 4, True), 2, 17.25)
    with pytest.raises(PlanError) as info:
        _choose(spec, [GpuOption("t4", 16), GpuOption("v100", 16.5)],
                {"t4": short, "v100": short})
    assert str(info.value) == (
        f"{spec.name} fits no GPU type: on the largest, v100 (16.5 GB), its smallest "
        "configuration (32x32x32, base filters 4, checkpointing, batch 2) needs 17.25 GB; "
        "expected a type with at least 17.25 GB (gpu_types in the profile) or smaller ranges "
        "in the stage's planner: block")
