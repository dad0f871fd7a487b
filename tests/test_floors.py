"""Hand-offs that never restart a stage silently (planning/floors.py)."""
from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest
from cli_runner import invoke
from conftest import TINY_CURRICULUM
from tiny_plans import quick_tiny_plan

from orchestrator.atomic import atomic_write_text
from orchestrator.config import StagePlan, load_curriculum, plan_to_yaml
from orchestrator.errors import PlanError
from orchestrator.planning.estimator import Candidate
from orchestrator.planning.floors import check_fresh_starts, fresh_tensors
from orchestrator.planning.planner import Shortfall, candidate_ladder
from orchestrator.planning.schedule_floors import FloorSchedule


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


def _made_up_planner(specs, budget: float):
    """plan(k, floor): the first rung of stage k's real ladder under `budget` in a made-up
    memory model (monotone along the ladder, as the estimates are; later stages heavier
    per filter, so their floors bind), batch 2."""
    def need(k: int, c: Candidate) -> float:
        ckpt = 0.4 if c.checkpointing else 1.0
        return 3**k * c.base_filters * math.prod(c.input_size_vox) * ckpt / 1e6

    def plan(k: int, floor: int):
        spec = specs[k]
        ladder = candidate_ladder(spec, 16, floor)
        fits = [c for c in ladder if need(k, c) <= budget]
        if not fits:
            return Shortfall(spec.name, ladder[-1], 2, need(k, ladder[-1]))
        c = fits[0]
        return _plan_of(spec.model_copy(update={}), c.base_filters, None).model_copy(
            update={"input_size_vox": c.input_size_vox, "checkpointing": c.checkpointing})
    return plan


def _serial_reference(specs, plan):
    """What planning in curriculum order gives: each 3D stage planned with its floor, the
    narrower plan where nothing at the floor fits."""
    out = []
    for k, spec in enumerate(specs):
        p = plan(k, 0)
        if k and isinstance(out[-1], StagePlan) and isinstance(p, StagePlan):
            floor = min(out[-1].base_filters, spec.base_filters)
            if p.base_filters < floor and isinstance(again := plan(k, floor), StagePlan):
                p = again
        out.append(p)
    return [(p.input_size_vox, p.base_filters, p.checkpointing) if isinstance(p, StagePlan)
            else None for p in out]


def _run_schedule(specs, plan, workers: int, rng: random.Random):
    """The schedule driven as planning/pool.py drives it, jobs finishing in random order."""
    stages = [(s, specs[k - 1].name if k else None) for k, s in enumerate(specs)]
    sched = FloorSchedule(stages, lambda spec, f: candidate_ladder(spec, 16, f))
    running, ran = [], []
    while not sched.finished:
        while len(running) < workers and (job := sched.next_job(set(running))) is not None:
            running.append(job)
        job = running.pop(rng.randrange(len(running)))
        ran.append(job)
        sched.record(job, plan(*job))
    return [(p.input_size_vox, p.base_filters, p.checkpointing) if isinstance(p, StagePlan)
            else None for p in sched.plans()], ran


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 50.0])
def test_floor_schedule_plans_what_curriculum_order_plans(specs, budget: float) -> None:
    """In any order the workers finish, the schedule's plans are those of planning the
    stages one after another with their floors, and each stage is planned at most twice
    (a guess and its correction)."""
    wide = [s.model_copy(update={"base_filters": bf, "input_size_vox": (64, 64, 64)})
            for s, bf in zip(specs, (8, 16, 24))]
    plan = _made_up_planner(wide, budget)
    want = _serial_reference(wide, plan)
    rng = random.Random(budget)
    for workers in (1, 2, 3):
        for _ in range(5):
            got, ran = _run_schedule(wide, plan, workers, rng)
            assert got == want
            assert max(Counter(k for k, _ in ran).values()) <= 3
            if workers == 1:  # one process: every floor is exact; a stage is planned again
                # only without its floor, where nothing at the floor fits
                again = [(k, f) for i, (k, f) in enumerate(ran) if k in [j for j, _ in ran[:i]]]
                assert all(f == 0 for _, f in again)


def test_floor_schedule_explains_a_floor_and_a_fresh_start(specs) -> None:
    wide = [s.model_copy(update={"base_filters": bf, "input_size_vox": (64, 64, 64)})
            for s, bf in zip(specs, (8, 16, 16))]
    stages = [(s, wide[k - 1].name if k else None) for k, s in enumerate(wide)]
    sched = FloorSchedule(stages, lambda spec, f: candidate_ladder(spec, 16, f))
    assert sched.next_job() == (0, 0)
    sched.record((0, 0), _plan_of(wide[0], 8))
    # stage 2 fits only with 4 filters; nothing at its floor of 8 fits
    sched.record((1, 8), Shortfall(wide[1].name, candidate_ladder(wide[1], 16, 8)[-1], 2, 9.0))
    assert sched.next_job() == (1, 0)  # the narrower plan, to start partly fresh
    sched.record((1, 0), _plan_of(wide[1], 4, wide[0].name))
    narrow = sched.stages[1].final
    assert narrow.base_filters == 4 and narrow.fresh_tensors["tensors"]
    assert narrow.reasons[-1].startswith("FRESH START of")
    # stage 3's floor is stage 2's 4 filters: planned at 8 without it, its plan stands
    assert sched.next_job() == (2, 4)
    sched.record((2, 4), _plan_of(wide[2], 8, wide[1].name).model_copy(update={"checkpointing": True}))
    assert sched.finished and "kept >=" not in sched.plans()[2].reasons[-1]
    # a floor that bound says so
    sched = FloorSchedule(stages, lambda spec, f: candidate_ladder(spec, 16, f))
    sched.record((0, 0), _plan_of(wide[0], 8))
    sched.record((1, 8), _plan_of(wide[1], 8, wide[0].name).model_copy(
        update={"input_size_vox": (48, 64, 64), "checkpointing": True}))
    assert "base filters kept >= 8, those of" in sched.stages[1].final.reasons[-1]


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
    cmd = ["submit", "--plan", str(path), "--dry-run", "--executor", "local", "--no-lcnn"]
    p = invoke(*cmd)
    assert p.exit_code == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--allow-fresh-start" in p.stderr
    p = invoke(*cmd, "--allow-fresh-start")
    assert p.exit_code == 0, p.stderr
    assert "re-initialises" in p.stderr


def test_a_stage_being_planned_is_not_planned_again_while_others_wait(specs) -> None:
    """Stage 2 runs with a guessed floor when stage 1's plan makes its floor 8: a free
    worker plans the LCNN first, and plans stage 2 again only when nothing else is left;
    stage 3's guess waits while stage 2 is being planned and other work is left."""
    s1, s2, lcnn = specs[0], specs[1].model_copy(update={"base_filters": 16}), specs[4]
    sched = FloorSchedule([(s1, None), (s2, s1.name), (lcnn, None)],
                          lambda spec, f: candidate_ladder(spec, 16, f))
    assert sched.next_job() == (0, 0)
    assert sched.next_job({(0, 0)}) == (1, 0)  # after the chain's head, guess at once
    sched.record((0, 0), _plan_of(s1, 8))
    assert sched.floor(1) == (8, 0)  # now exact
    assert sched.next_job({(1, 0)}) == (2, 0)
    assert sched.next_job({(1, 0), (2, 0)}) == (1, 8)
    s3 = specs[2].model_copy(update={"base_filters": 16})
    sched = FloorSchedule([(s1, None), (s2, s1.name), (s3, s2.name), (lcnn, None)],
                          lambda spec, f: candidate_ladder(spec, 16, f))
    sched.record((0, 0), _plan_of(s1, 8))
    assert sched.next_job() == (1, 8)
    assert sched.next_job({(1, 8)}) == (3, 0)  # stage 3's guess waits for stage 2's result...
    assert sched.next_job({(1, 8), (3, 0)}) == (2, 8)  # ...unless nothing else is left


def test_a_guess_waits_while_any_stage_it_descends_from_is_planned(specs) -> None:
    """With stage 2 being planned, stage 4's floor is still a guess made from stage 1's
    plan (too low wherever stage 2 keeps more filters): a free worker plans the LCNN
    rather than stage 3 or stage 4, and plans stage 4 first once stage 2's plan is final
    and stage 3 is being planned (its guess is then stage 3's exact floor)."""
    s1 = specs[0]
    s2, s3, s4 = (specs[k].model_copy(update={"base_filters": bf}) for k, bf in
                  ((1, 16), (2, 24), (3, 32)))
    lcnn = specs[4]
    sched = FloorSchedule([(s1, None), (s2, s1.name), (s3, s2.name), (s4, s3.name), (lcnn, None)],
                          lambda spec, f: candidate_ladder(spec, 16, f))
    assert sched.next_job() == (0, 0)
    assert sched.next_job({(0, 0)}) == (1, 0)  # right after the head: guess at once
    sched.record((0, 0), _plan_of(s1, 8))
    assert sched.next_job({(1, 8)}) == (4, 0)  # not stage 3 or 4 with a floor of 8
    sched.record((1, 8), _plan_of(s2, 16))
    assert sched.next_job({(4, 0)}) == (2, 16)
    assert sched.next_job({(4, 0), (2, 16)}) == (3, 16)
