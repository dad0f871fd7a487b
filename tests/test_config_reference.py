"""docs/configuration.md is what the models say: regenerated here and compared."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from orchestrator import config, config_reference


def test_configuration_md_is_current() -> None:
    assert config_reference.DOC_PATH.read_text() == config_reference.render(), (
        "docs/configuration.md is out of date: run python -m orchestrator.config_reference")


def test_every_field_is_documented_with_its_section() -> None:
    assert config_reference.missing_descriptions() == []
    text = config_reference.render()
    for model in (config.StageSpec, config.PlannerLimits, config.Curriculum, config.CurriculumEntry,
                  config.ClusterProfile, config.StageResources):
        assert f"(`{model.__name__}`)" in text
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name}"


def test_units_types_and_defaults() -> None:
    text = config_reference.render()
    assert "| `gpu_mem_gb` | `float \\| None` | `None` | GB | > 0 |" in text
    assert "| `signal_grace_s` | `int` | `120` | seconds | >= 0 |" in text
    assert "| `kind` | `'seg3d' \\| 'lcnn'` | `'seg3d'` |" in text
    assert "| `stages` | `list[CurriculumEntry]` | required |  | len >= 1 |" in text


def test_check_flag_says_when_out_of_date(tmp_path, monkeypatch) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr(config_reference, "DOC_PATH", stale)
    assert config_reference.main(["--check"]) == 1
    assert config_reference.main([]) == 0 and config_reference.main(["--check"]) == 0
    res = subprocess.run([sys.executable, "-m", "orchestrator.config_reference", "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr  # the committed file is current
