"""Configs: every YAML of the repo loads; bad input is one line naming file and field."""
from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import invoke

from orchestrator.config import (
    ClusterProfile,
    load_curriculum,
    load_stage,
    parse_model,
    resolve_cluster,
)
from orchestrator.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_progressive_curriculum_loads_in_order_with_handoffs() -> None:
    _cur, stages = load_curriculum(REPO / "stages" / "progressive.yaml")
    names = [s.name for s, _ in stages]
    assert names == ["stage1_basic_cnn", "stage2_cnn_attention", "stage3_hybrid_small",
                     "stage4_hybrid_full", "lcnn"]
    inits = [i for _, i in stages]
    assert inits == [None, "stage1_basic_cnn", "stage2_cnn_attention", "stage3_hybrid_small", None]
    assert [tuple(s.input_size_vox) for s, _ in stages[:4]] == [(96,) * 3, (112,) * 3, (128,) * 3, (144,) * 3]


def test_overrides_apply_to_every_stage_and_merge_model_keys() -> None:
    _cur, stages = load_curriculum(REPO / "stages" / "demo.yaml")
    assert [s.max_epochs for s, _ in stages] == [10, 4, 4, 4]  # stage entry beats curriculum
    assert [s.base_filters for s, _ in stages] == [8, 8, 8, 8]  # curriculum beats stage file
    assert {tuple(s.input_size_vox) for s, _ in stages} == {(32, 32, 32)}
    s3 = stages[2][0]
    assert s3.model.transformer_dim == 32 and s3.model.se is True  # merged, not replaced


@pytest.mark.parametrize("name", ["local", "generic-slurm"])
def test_cluster_profiles_load(name: str) -> None:
    prof, path = resolve_cluster(name)
    assert prof.name == name and path.is_file() and path.name == f"{name}.yaml"


def test_unknown_stage_key_names_file_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"bad_stage\.yaml: unknown key 'lr_rate' \(did you mean 'lr'\?\)"):
        load_stage(REPO / "tests" / "data" / "bad_stage.yaml")


def test_unknown_model_option_is_rejected_before_any_job(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nmodel: {arch: resunet3d, base_filterz: 8}\ninput_size_vox: [32, 32, 32]\n")
    want = r"s\.yaml: unknown key 'model\.base_filterz' \(did you mean 'base_filters'\?\)"
    with pytest.raises(ConfigError, match=want):
        load_stage(p)


def test_bad_value_names_field_and_value(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nmodel: {arch: resunet3d}\ninput_size_vox: [32, 32, 32]\nmax_epochs: -3\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: max_epochs: Input should be greater than 0 \(got -3\)"):
        load_stage(p)


def test_wrong_number_of_sides_and_unknown_arch(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nmodel: {arch: resunet3d}\ninput_size_vox: [32, 32]\n")
    with pytest.raises(ConfigError, match="input_size_vox needs 3 sides"):
        load_stage(p)
    p.write_text("name: s\nmodel: {arch: unet9000}\ninput_size_vox: [32, 32, 32]\n")
    with pytest.raises(ConfigError, match=r"model\.arch: unknown model arch 'unet9000'"):
        load_stage(p)


def test_missing_file_and_broken_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_stage(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+ invalid YAML"):
        load_stage(p)


def test_cluster_profile_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown key 'partiton' \(did you mean 'partition'\?\)"):
        parse_model(ClusterProfile, {"name": "x", "partiton": "gpu"}, "x.yaml")


def test_cli_target_mem_abc_is_one_line_exit_2() -> None:
    res = invoke("plan", "--target-mem", "abc")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert lines == ["error: --target-mem: expected a number of GB (e.g. 20), got 'abc'"]
    assert res.stdout == ""


def test_cli_unknown_stage_key_is_one_line_exit_2(tmp_path: Path) -> None:
    cur = tmp_path / "cur.yaml"
    cur.write_text(f"name: c\nstages:\n  - file: {REPO / 'tests' / 'data' / 'bad_stage.yaml'}\n")
    res = invoke("plan", "--curriculum", str(cur), "--device", "cpu", "--runs-dir", str(tmp_path / "runs"))
    assert res.exit_code == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad_stage.yaml: unknown key 'lr_rate'" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written
