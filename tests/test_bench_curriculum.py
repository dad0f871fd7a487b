"""`orchestrator bench curriculum --quick --json` end to end: the document's structure, and
the three arms got the same budget (who wins is the benchmark's business, not the test's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from orchestrator.cli.bench.curriculum import ARMS, EVAL_FRACTIONS


def _quick(tmp_path: Path, *flags: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "orchestrator", "bench", "curriculum", "--quick",
                          "--json", *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.mark.timeout(900)  # about 30 s on 2 idle cores; minutes when four agents share them
def test_bench_curriculum_quick_json(tmp_path: Path) -> None:
    doc = _quick(tmp_path, "--jobs", "2", "--threads", "1")
    # the arms in two processes give what they give one after the other in one
    alone = _quick(tmp_path, "--jobs", "1", "--threads", "1")
    assert doc["machine"]["jobs"] == 2 and alone["machine"]["jobs"] == 1
    measured = ("train_cpu_s", "seconds_per_step")  # timed, so not equal run to run
    for name in ARMS:
        for key in ("curve", "handoffs", "phases"):
            got = [{k: v for k, v in p.items() if k not in measured} for p in doc["arms"][name][key]]
            want = [{k: v for k, v in p.items() if k not in measured} for p in alone["arms"][name][key]]
            assert got == want, (name, key)
    assert doc["bench"] == "curriculum" and doc["quick"] is True
    assert doc["data"]["test_subjects"] >= 1 and doc["data"]["train_subjects"] >= 1
    assert set(doc["arms"]) == set(ARMS)
    budget = doc["budget_gflop"]
    for name, arm in doc["arms"].items():
        biggest_step = max(p["gflop_per_step"] for p in arm["phases"])
        assert abs(arm["budget_gflop"] - budget) <= biggest_step / 2 + 1e-3, name  # equal budgets
        fractions = [p["fraction"] for p in arm["curve"]]
        assert len(fractions) == len(EVAL_FRACTIONS) and fractions == sorted(fractions), name
        assert abs(fractions[-1] - 1.0) <= biggest_step / budget, name
        assert 0.0 <= arm["test_dice"] <= 1.0 and arm["test_dice"] == arm["curve"][-1]["test_dice"]
        assert set(arm["reached_others_final_at"]) == set(ARMS) - {name}
        cpu = [p["train_cpu_s"] for p in arm["curve"]]
        assert cpu == sorted(cpu) and cpu[-1] == arm["train_cpu_s"] <= arm["cpu_s"], name
    lr = {name: arm["lr"] for name, arm in doc["arms"].items()}
    # from scratch at the curriculum's from-scratch rate (stage 1's), not stage 4's
    assert lr["scratch"] == lr["scratch_growing_patch"] == lr["progressive"][:1] != lr["progressive"][-1:]
    stages = [p["stage"] for p in doc["arms"]["progressive"]["phases"]]
    assert len(stages) == 4 and len(set(stages)) == 4  # the chain: four models
    assert {p["stage"] for p in doc["arms"]["scratch"]["phases"]} == {stages[-1]}
    growing = doc["arms"]["scratch_growing_patch"]["phases"]
    assert {p["stage"] for p in growing} == {stages[-1]}
    assert [p["patch"] for p in growing] == [p["patch"] for p in doc["arms"]["progressive"]["phases"]]
    assert len(doc["arms"]["progressive"]["handoffs"]) == 3
    _check_equal_time_and_inference(doc)


def _check_equal_time_and_inference(doc: dict) -> None:
    """Issue 26: the arms at equal training time, and the chain's model mirrored and
    post-processed."""
    eq = doc["equal_time"]
    assert set(eq["arms"]) == set(ARMS) and len(eq["chain_lead"]) == len(EVAL_FRACTIONS)
    for name, arm in eq["arms"].items():
        fractions = [p["fraction"] for p in arm["curve"]]
        assert len(fractions) == len(EVAL_FRACTIONS) and fractions == sorted(fractions), name
        assert all("planned_s" in p for p in arm["curve"]), name
        assert arm["test_dice"] == arm["curve"][-1]["test_dice"], name
    for name in ARMS[1:]:  # trained for the chain's seconds, within half a step of them
        arm = eq["arms"][name]
        longest = max(p["seconds_per_step"] for p in arm["phases"])
        assert abs(arm["budget_s"] - eq["budget_s"]) <= longest / 2 + 0.1, name
        assert {p["stage"] for p in arm["phases"]} == {doc["arms"]["progressive"]["phases"][-1]["stage"]}
    lead = [round(c[0] - max(c[1:]), 4) for c in zip(*[[p["test_dice"] for p in eq["arms"][a]["curve"]]
                                                       for a in ARMS])]
    assert eq["chain_lead"] == lead
    inf = doc["chain_inference"]
    assert inf["mirror_axes"] == [0, 1, 2] and inf["overlap"] == 0.5
    for step in ("single_pass", "mirrored", "mirrored_postprocessed"):
        assert 0.0 <= inf[step]["dice"] <= 1.0 and 0.0 <= inf[step]["lesion_f1"] <= 1.0
    assert inf["seconds_per_volume"]["mirrored"] > inf["seconds_per_volume"]["single_pass"]
    choice = inf["postprocessing"]
    assert choice["dice_after"] >= choice["dice_before"]
    assert (choice["dice_after"] > choice["dice_before"]) == (choice["choice"] != {"method": "none"})
    assert doc["figures"]["chain_lead_equal_time"] == eq["chain_lead"][-1]
