"""The GPU inventory: each type's memory (profile, name, built-in table), its pools from the
two-node cluster's `sinfo` or from the profile, and a type with no known memory."""
from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import invoke

from orchestrator.config import ClusterProfile, resolve_cluster
from orchestrator.config_io import parse_model
from orchestrator.errors import ConfigError
from orchestrator.launch.inventory import (
    from_profile,
    gpu_inventory,
    parse_gres,
    type_memory,
)


def _profile(**fields: object) -> ClusterProfile:
    return parse_model(ClusterProfile, {"name": "site", **fields}, "site.yaml")


def test_a_type_s_memory_comes_from_the_profile_then_its_name_then_the_built_in_table() -> None:
    site = _profile(gpu_types={"a100": 80, "v100_big": {"mem_gb": 32, "partition": "gpu"}})
    assert (type_memory("A100", site).gb, type_memory("A100", site).source) == (80, "profile")
    assert type_memory("v100_big", site).gb == 32
    plain = _profile()
    assert type_memory("a100_80g", plain).gb == 80 == type_memory("nvidia_a100-sxm4-80gb", plain).gb
    assert type_memory("1g.10gb", plain).gb == 10  # a MIG slice
    assert type_memory("l40s", plain).gb == 48 and type_memory("h100nvl", plain).gb == 94
    a100 = type_memory("a100_sxm4", plain)
    assert a100.gb == 40 and "40 or 80 GB, taken as the smaller" in a100.source
    assert type_memory("tesla_v100", plain).gb == 16
    assert type_memory("mi250x", plain) is None


def test_gres_items_with_and_without_a_type() -> None:
    assert parse_gres("gpu:a100:2(S:0-1),gpu:1,shard:4,gpu:v100:1") == [("a100", 2), (None, 1), ("v100", 1)]
    assert parse_gres("(null)") == []


def test_the_profile_gives_the_inventory_where_sinfo_does_not_answer() -> None:
    profile, _ = resolve_cluster("local-mixed")
    inv = from_profile(profile)
    assert inv.source == "profile"
    assert [(p.gpu_type, p.partition, p.gpus_per_node) for p in inv.pools] == [
        ("a100", "a100", 2), ("v100", "v100", 1)]
    assert inv.types == ["v100", "a100"]  # smallest memory first
    assert inv.memory("v100") == 1.2 and inv.memory("a100") == 2.0
    asks = from_profile(_profile(partition="gpu", gres="gpu:a100:1",
                                 stages={"stage4": {"gres": "gpu:h100:4", "partition": "big"}}))
    assert [(p.gpu_type, p.partition, p.gpus_per_node, p.memory.gb) for p in asks.pools] == [
        ("a100", "gpu", 1, 40), ("h100", "big", 4, 80)]


def test_a_type_with_no_known_memory_is_one_line_asking_for_it() -> None:
    inv = from_profile(_profile(partition="acc", gres="gpu:mi250x:4"))
    assert inv.unknown() == ["mi250x"]
    with pytest.raises(ConfigError) as info:
        inv.require_memory("envs/clusters/site.yaml")
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("envs/clusters/site.yaml: gpu_types: no known memory for GPU type(s) "
                           "mi250x (partition acc)")
    assert "`gpu_types: {mi250x: GB}`" in line
    from_profile(_profile(gres="gpu:mi250x:4", gpu_types={"mi250x": 64})).require_memory("x")


@pytest.mark.slurm
def test_the_two_node_cluster_s_pools_from_sinfo() -> None:
    profile, _ = resolve_cluster("local-mixed")
    inv = gpu_inventory(profile)
    assert inv.source == "sinfo"
    pools = {(p.gpu_type, p.partition): p for p in inv.pools}
    assert set(pools) == {("a100", "a100"), ("a100", "debug"), ("v100", "v100"), ("v100", "debug")}
    assert pools["a100", "a100"].nodes == ("n1",) and pools["a100", "a100"].gpus_per_node == 2
    assert pools["v100", "v100"].nodes == ("n2",) and pools["v100", "v100"].gpus_per_node == 1
    assert all(p.usable_nodes == 1 and p.time_limit for p in inv.pools)
    assert inv.types == ["v100", "a100"] and inv.memory("a100") == 2.0


@pytest.mark.slurm
def test_doctor_prints_the_inventory_a_line_per_type() -> None:
    p = invoke("doctor", "--cluster", "local-mixed")
    assert p.exit_code == 0, p.stdout + p.stderr
    lines = {line.split(":")[0]: line for line in p.stdout.splitlines()}
    assert lines["ok   gpu v100"].startswith("ok   gpu v100: 1.2 GB, profile (sinfo): partition debug")
    assert "partition v100, 1 a node on 1 node(s) (n2)" in lines["ok   gpu v100"]
    assert "partition a100, 2 a node on 1 node(s) (n1)" in lines["ok   gpu a100"]
    # the built-in table's a100 comes in two sizes: a note saying how to give the real one
    p = invoke("doctor", "--cluster", "local-2node")
    (a100,) = [line for line in p.stdout.splitlines() if line.startswith("note gpu a100: 40 GB")]
    assert "fix: if yours have more, say so in" in a100 and "`gpu_types: {a100: GB}`" in a100


def test_doctor_without_sinfo_answering_lists_the_profile_s_types(tmp_path: Path) -> None:
    profile = tmp_path / "site.yaml"
    profile.write_text("name: site\nexecutor: local\ngpu_types:\n  mi250x: {partition: acc}\n")
    p = invoke("doctor", "--cluster", str(profile))
    assert p.exit_code == 2
    assert "site.yaml: gpu_types.mi250x.mem_gb: Field required" in p.stdout + p.stderr
