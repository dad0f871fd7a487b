"""`orchestrator bench plan`: each case planned in a fresh process, as a user's `plan` is."""
from __future__ import annotations

from pathlib import Path

import pytest
from tiny_plans import one_stage_curriculum

from orchestrator.cli.bench.plan import bench_plan, plan_case
from orchestrator.errors import OrchestratorError


def test_each_case_plans_in_a_fresh_process_and_reports_its_figures(tmp_path: Path) -> None:
    cur = one_stage_curriculum(tmp_path)
    doc = bench_plan(cur, cases=(("cpu", 2.0),), type_cases=())
    f = doc["figures"]
    assert doc["bench"] == "plan" and doc["machine"]["curriculum"] == str(cur)
    # the process's life holds its interpreter start and imports as well as the planning
    assert 0 < f["plan_cpu_2gb_s"] < f["plan_cpu_2gb_process_s"]
    assert f["slowest_case_s"] == f["plan_cpu_2gb_s"]
    assert f["slowest_process_s"] == f["plan_cpu_2gb_process_s"]
    # the same estimates as planning the case here, from a cold cache
    assert f["plan_cpu_2gb_estimates"] == plan_case(cur, "cpu", 2.0)["estimates"] >= 1
    assert f["workers"] >= 1


def test_a_case_that_fails_names_the_case_and_its_last_line(tmp_path: Path) -> None:
    with pytest.raises(OrchestratorError, match=r"bench plan: the cuda 4 GB case exited with 1: .*"
                                                r"missing\.yaml"):
        bench_plan(tmp_path / "missing.yaml", cases=(("cuda", 4.0),), type_cases=())


def test_the_mixed_gpu_case_places_every_stage_on_one_of_the_types(tmp_path: Path) -> None:
    cur = one_stage_curriculum(tmp_path)
    f = bench_plan(cur, cases=(), type_cases=((2.0, 3.0),))["figures"]
    assert 0 < f["plan_types_2_3gb_s"] < f["plan_types_2_3gb_process_s"] == f["slowest_process_s"]
    # one stage, two types: the second type reuses the first one's estimates where it can
    one = plan_case(cur, "cuda", 2.0)["estimates"]
    assert one <= f["plan_types_2_3gb_estimates"] <= 2 * one
