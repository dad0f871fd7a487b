"""End to end: plan -> submit (local executor, real subprocess jobs) -> hand-offs -> status."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, make_tiny_plan, replaced

from orchestrator.launch.submit import submit_plan
from orchestrator.runs.status import collect_status

STAGES = ["stage1_basic_cnn", "stage2_cnn_attention", "stage3_hybrid_small", "stage4_hybrid_full"]


def test_local_executor_runs_the_chain_with_handoffs(tmp_path: Path, tiny_data: Path) -> None:
    plan, plan_path = make_tiny_plan(tmp_path / "runs", tiny_data)
    jobs = submit_plan(plan, plan_path, "local", include_lcnn=False)
    assert [j.stage for j in jobs] == STAGES
    for i, name in enumerate(STAGES):
        sd = plan.run_dir / name
        assert (sd / "checkpoints" / "final.pt").exists() and (sd / "metrics.csv").exists()
        if i:
            report = json.loads((sd / "handoff.json").read_text())
            assert report["from"] == STAGES[i - 1]
            # function-preserving growth (3->4 resizes the position embedding: close, not exact)
            assert report["max_output_diff"] <= 2e-2 * max(report["output_scale"], 1e-6), name
    doc = collect_status(plan.run_dir.parent, plan.run)
    run = doc["runs"][0]
    assert run["state"] == "COMPLETED"
    assert [s["state"] for s in run["stages"]] == ["COMPLETED"] * 4 + ["NOT_SUBMITTED"]  # --no-lcnn
    assert all(s["attempts"] == 1 and s["epoch"] == 1 for s in run["stages"][:4])
    # `tensorboard --logdir runs/`: the 4 stages (4 processes) in sequence on one step axis
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(plan.run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("stage/index")] == [(2, 1), (4, 2), (6, 3), (8, 4)]
    assert [e.step for e in acc.Scalars("val/dice")] == [2, 4, 6, 8]


def test_failed_stage_cancels_the_rest_and_status_names_it(tmp_path: Path, tiny_data: Path) -> None:
    plan, plan_path = make_tiny_plan(tmp_path / "runs", tiny_data)
    # break stage 1's data after planning: the job fails on the node, not at submission
    plan_path.write_text(replaced(plan_path.read_text(), str(tiny_data), str(tmp_path / "gone")))
    (tmp_path / "gone").mkdir()
    import pytest

    from orchestrator.config import load_plan
    from orchestrator.errors import SubmissionError

    want = r"stage stage1_basic_cnn failed: DataError: .*gone.*\(log: .*log\.err\)"
    with pytest.raises(SubmissionError, match=want):
        submit_plan(load_plan(plan_path), plan_path, "local", include_lcnn=False)
    run = collect_status(plan.run_dir.parent, plan.run)["runs"][0]
    states = {s["name"]: s["state"] for s in run["stages"]}
    assert states == {"stage1_basic_cnn": "FAILED", "stage2_cnn_attention": "CANCELLED",
                      "stage3_hybrid_small": "CANCELLED", "stage4_hybrid_full": "CANCELLED",
                      "lcnn": "NOT_SUBMITTED"}
    assert run["state"] == "FAILED"


def test_status_json_cli_over_all_runs(tmp_path: Path, tiny_data: Path) -> None:
    make_tiny_plan(tmp_path / "runs", tiny_data, run="a")
    make_tiny_plan(tmp_path / "runs", tiny_data, run="b")
    res = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--runs-dir",
                          str(tmp_path / "runs"), "--json"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [r["run"] for r in doc["runs"]] == ["a", "b"]
    assert all(r["state"] == "NOT_SUBMITTED" for r in doc["runs"])
    assert [s["name"] for s in doc["runs"][0]["stages"]] == STAGES + ["lcnn"]
