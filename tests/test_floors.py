"""Hand-offs that never restart a stage silently (planning/floors.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_CURRICULUM
from tiny_plans import quick_tiny_plan

from orchestrator.config import StagePlan, load_curriculum, plan_to_yaml
from orchestrator.errors import PlanError
from orchestrator.planning.floors import check_fresh_starts, fresh_tensors, keep_filters
from orchestrator.planning.planner import candidate_ladder
from orchestrator.runs.atomic import atomic_write_text


@pytest.fixture(scope="module")
def specs():
    _cur, stages = load_curriculum(TINY_CURRICULUM)
    return [s for s, _ in stages]


def _plan_of(spec, filters: int, init_from: str | None = None) -> StagePlan:
    return StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=init_from,
                     input_size_vox=spec.input_size_vox, base_filters=filters,
                     batch_size=spec.batch_size, checkpointing=False, amp=False, params=0,
                     predicted_gb=1.0, reasons=["test"])


def test_ladder_floor_keeps_filters_and_shrinks_the_input_at_it(specs) -> None:
    spec = specs[1].model_copy(update={"base_filters": 16, "input_size_vox": (64, 64, 64)})
    free = candidate_ladder(spec, 16)
    floored = candidate_ladder(spec, 16, min_filters=12)
    assert min(c.base_filters for c in free) == 4
    assert min(c.base_filters for c in floored) == 12
    assert floored[-1].input_size_vox == (32, 32, 32) and floored[-1].base_filters == 12
    assert candidate_ladder(spec, 16, min_filters=99)[-1].base_filters == 16  # its own YAML's


def test_fresh_tensors_of_a_narrower_stage(specs) -> None:
    s1, s2 = _plan_of(specs[0], 8), _plan_of(specs[1], 4, specs[0].name)
    fresh = fresh_tensors(s1, s2)
    assert fresh["from"] == specs[0].name and fresh["tensors"]
    assert 0.5 < fresh["fraction"] <= 1.0  # every conv of the shared encoder/decoder narrowed
    assert fresh_tensors(s1, _plan_of(specs[1], 8, specs[0].name))["tensors"] == []


def test_keep_filters_replans_narrower_stages_in_order(specs) -> None:
    wide = [s.model_copy(update={"base_filters": 16}) for s in specs]  # the YAMLs allow 16
    s1 = _plan_of(wide[0], 8)
    s2 = _plan_of(wide[1], 4, specs[0].name)
    s3 = _plan_of(wide[2], 4, specs[1].name)
    asked = []

    def replan(spec, init_from, floor):
        asked.append((spec.name, floor))
        return _plan_of(spec, floor, init_from)

    out = keep_filters([s1, s2, s3], replan)
    assert [s.base_filters for s in out] == [8, 8, 8]  # stage 3's floor is stage 2's new 8
    assert asked == [(specs[1].name, 8), (specs[2].name, 8)]
    assert "kept >= 8" in out[1].reasons[-1] and out[1].fresh_tensors is None
    # nothing fits at the floor: the narrow plan stays and says what starts fresh
    out = keep_filters([s1, s2], lambda *_: None)
    assert out[1].base_filters == 4 and out[1].fresh_tensors["tensors"]
    assert out[1].reasons[-1].startswith("FRESH START of")


def _narrow_plan(tmp_path: Path):
    plan, path = quick_tiny_plan(tmp_path / "runs", tmp_path)
    wide = plan.stages[0].model_copy(update={"base_filters": 8})
    plan = plan.model_copy(update={"stages": [wide, *plan.stages[1:]]})
    atomic_write_text(path, plan_to_yaml(plan))
    return plan, path


def test_check_fresh_starts_refuses_unless_allowed(tmp_path: Path) -> None:
    plan, _ = _narrow_plan(tmp_path)
    with pytest.raises(PlanError, match="stage2_cnn_attention: the hand-off from stage1_basic_cnn "
                                        "re-initialises .* --allow-fresh-start"):
        check_fresh_starts(plan, allow=False)
    (line,) = check_fresh_starts(plan, allow=True)
    assert "base filters 4 < 8" in line


def test_submit_refuses_a_fresh_start_in_one_line(tmp_path: Path) -> None:
    _, path = _narrow_plan(tmp_path)
    cmd = [sys.executable, "-m", "orchestrator", "submit", "--plan", str(path), "--dry-run",
           "--executor", "local", "--no-lcnn"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--allow-fresh-start" in p.stderr
    p = subprocess.run([*cmd, "--allow-fresh-start"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "re-initialises" in p.stderr
