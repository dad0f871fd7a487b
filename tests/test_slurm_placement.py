"""Mixed GPU fleets on the two-node SLURM (issue 25): n1 has two `a100`, n2 one `v100`.

envs/clusters/local-mixed.yaml gives the types memories a CPU can train for (1.2 GB and
2 GB); tests/data/mixed.yaml's stages 1 and 2 fit the v100, stage 4 only the a100. `plan`
plans every stage for both types and places each; `submit` asks for each stage's type on
its partition, so the chain runs across the nodes, handing weights over from n2 to n1.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_runner import invoke
from conftest import REPO
from waiting import wait_for

from orchestrator import api
from orchestrator.config import load_plan
from orchestrator.errors import ConfigError
from orchestrator.launch.sacct import sacct_states
from orchestrator.launch.submit import job_parameters, submit_plan
from orchestrator.runs.state import read_state

pytestmark = pytest.mark.slurm
MIXED = REPO / "tests" / "data" / "mixed.yaml"
S1, S2, S4 = "stage1_basic_cnn", "stage2_cnn_attention", "stage4_hybrid_full"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _nodes(job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "NodeList"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return out.strip()


def test_small_stages_go_to_the_small_type_the_large_one_to_the_large_and_the_chain_runs(
        tmp_path: Path, tiny_data: Path) -> None:
    """Stages 1 and 2 are placed on v100, stage 4 on a100. Stage 2's profile entry asks for
    any GPU on the a100 partition (an untyped request): its job finds an a100 in its
    allocation and plans the stage again for 2 GB, saying so in plan.yaml, state.json and
    its log; stage 4 then starts from its weights."""
    profile = tmp_path / "site.yaml"
    profile.write_text((REPO / "envs" / "clusters" / "local-mixed.yaml").read_text()
                       + f"stages:\n  {S2}: {{gres: 'gpu:1', partition: a100}}\n")
    plan = api.plan(cluster=str(profile), curriculum=MIXED, data=tiny_data, run="mixed",
                    runs_dir=tmp_path / "runs")
    placed = {s.name: s.placement for s in plan.stages}
    assert {name: pl.gpu_type for name, pl in placed.items()} == {S1: "v100", S2: "v100", S4: "a100"}
    assert placed[S1].reason.startswith("v100 (1.2 GB): 32x32x32, 4 filters, batch 2 fit")
    assert placed[S1].reason.endswith("no larger card needed")
    assert placed[S4].considered["v100"] is None and placed[S4].considered["a100"] > 1.2
    assert placed[S4].reason.startswith("a100 (2 GB): 32x32x32, 16 filters, batch 2 fit; "
                                        "nothing fits a smaller card")
    assert plan.device == "cuda" and plan.stage(S4).base_filters == 16  # nothing shrunk
    recorded = load_plan(api.plan_path(plan))  # plan.yaml holds the types considered
    assert recorded.stage(S2).placement == placed[S2]
    params = {s.name: job_parameters(plan, s, "slurm", None) for s in plan.stages}
    assert (params[S1]["slurm_gres"], params[S1]["slurm_partition"]) == ("gpu:v100:1", "v100")
    assert (params[S4]["slurm_gres"], params[S4]["slurm_partition"]) == ("gpu:a100:1", "a100")
    assert "gpus_per_node" not in params[S4]

    assert (params[S2]["slurm_gres"], params[S2]["slurm_partition"]) == ("gpu:1", "a100")

    jobs = {j.stage: j.job_id for j in submit_plan(plan, api.plan_path(plan), "slurm")}
    ended = wait_for(lambda: (s if (s := (sacct_states([jobs[S4]]) or {}).get(jobs[S4]))
                              in TERMINAL else None), 600, "the chain's last stage to end",
                     every_s=2)
    stages = read_state(plan.run_dir)["stages"]
    assert ended == "COMPLETED", stages
    assert [stages[s]["state"] for s in (S1, S2, S4)] == ["COMPLETED"] * 3
    assert (_nodes(jobs[S1]), _nodes(jobs[S2]), _nodes(jobs[S4])) == ("n2", "n1", "n1")
    assert (plan.run_dir / S4 / "checkpoints" / "final.pt").exists()
    # stage 2 got an a100: planned again for it (the same numbers: its batch range is 2..2)
    line = (f"{S2}: started on a100 (2 GB) instead of the planned v100 (1.2 GB): planned again "
            "for it: 32x32x32, 4 filters, batch 2 (was 32x32x32, 4 filters, batch 2)")
    assert stages[S2]["replanned"] == line and stages[S2]["gpu"] == "a100"
    again = load_plan(api.plan_path(plan)).stage(S2)
    assert (again.placement.gpu_type, again.placement.mem_gb, again.placement.replanned) == (
        "a100", 2.0, line)
    assert line in Path(stages[S2]["stdout"]).read_text()
    assert "replanned" not in stages[S1] and "replanned" not in stages[S4]
    # stage 4 started from stage 2's weights, written on the other node, widened 4 -> 16
    handoff = json.loads((plan.run_dir / S4 / "handoff.json").read_text())
    assert handoff["from"] == S2 and handoff["counts"]["widened"] > 0, handoff["counts"]
    res = invoke("status", "mixed", "--runs-dir", str(tmp_path / "runs"), "--json")
    rows = {r["name"]: r for r in json.loads(res.stdout)["runs"][0]["stages"]}
    assert [rows[s]["gpu"] for s in (S1, S2, S4)] == ["v100", "a100", "a100"]


def test_a_stage_that_fits_no_type_exits_2_naming_the_largest_type_and_its_need(
        tmp_path: Path, tiny_data: Path) -> None:
    profile = tmp_path / "small.yaml"
    profile.write_text((REPO / "envs" / "clusters" / "local-mixed.yaml").read_text()
                       .replace("mem_gb: 2.0, partition: a100", "mem_gb: 1.25, partition: a100"))
    res = invoke("plan", "--cluster", str(profile), "--curriculum", str(MIXED), "--data",
                 str(tiny_data), "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: stage4_hybrid_full fits no GPU type: on the largest, a100 "
                           "(1.25 GB), its smallest configuration (32x32x32, base filters 16, "
                           "checkpointing, batch 2) needs "), line
    assert "expected a type with at least" in line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("plan.yaml"))


def test_placement_pins_every_stage_or_one_stage(tmp_path: Path, tiny_data: Path) -> None:
    plan = api.plan(cluster="local-mixed", curriculum=MIXED, data=tiny_data, write=False,
                    placement="a100", runs_dir=tmp_path / "runs")
    assert {s.placement.gpu_type for s in plan.stages} == {"a100"}
    assert list(plan.stage(S1).placement.considered) == ["a100"]
    with pytest.raises(ConfigError, match=r"--placement: 'h100' is not a GPU type of the "
                       r"cluster \(sinfo\); expected auto, none or one of: v100, a100"):
        api.plan(cluster="local-mixed", curriculum=MIXED, data=tiny_data, write=False,
                 placement="h100", runs_dir=tmp_path / "runs")
    one = tmp_path / "pin.yaml"
    one.write_text((REPO / "envs" / "clusters" / "local-mixed.yaml").read_text()
                   + f"stages:\n  {S2}: {{gpu_type: a100}}\n")
    plan = api.plan(cluster=str(one), curriculum=MIXED, data=tiny_data, write=False,
                    runs_dir=tmp_path / "runs")
    assert [s.placement.gpu_type for s in plan.stages] == ["v100", "a100", "a100"]
    none = api.plan(cluster="local-mixed", curriculum=MIXED, data=tiny_data, write=False,
                    placement="none", target_mem_gb=4, device="cuda", runs_dir=tmp_path / "runs")
    assert all(s.placement is None for s in none.stages)


def test_by_default_only_a_profile_that_names_its_types_places_stages(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"  # GPUs, one size declared, no types named: one budget
    site.write_text("name: site\nexecutor: slurm\ngpus_per_node: 1\ngpu_mem_gb: 40\n")
    assert api.gpu_placement(None, str(site), "auto", None) == ((), ())
    options, pins = api.gpu_placement("auto", str(site), "auto", None)  # sinfo's types
    assert [(o.gpu_type, o.mem_gb, o.partition) for o in options] == [
        ("v100", 16, "v100"), ("a100", 40, "a100")]  # built-in sizes; each on its own partition
    assert pins == ()
    options, _ = api.gpu_placement(None, "local-mixed", "auto", None)
    assert [(o.gpu_type, o.mem_gb) for o in options] == [("v100", 1.2), ("a100", 2.0)]
    assert all(o.start_s is not None and o.start_s >= 0 for o in options)  # sbatch --test-only
    assert api.gpu_placement(None, "local-mixed", "auto", 4.0) == ((), ())  # --target-mem
    assert api.gpu_placement(None, "local-mixed", "cpu", None) == ((), ())
