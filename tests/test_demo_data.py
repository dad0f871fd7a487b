"""The demo's data step (orchestrator/cli/demo.py): what `orchestrator demo` starts with."""
from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import pytest
from rich.console import Console

from orchestrator.cli.demo import DEMO_SHAPE_VOX, synthetic_data
from orchestrator.errors import ConfigError


def test_phantoms_into_an_empty_folder_then_reused(tmp_path: Path) -> None:
    err = Console(file=io.StringIO())
    said = synthetic_data(tmp_path / "data", 2, err, anatomy="phantom")
    assert said == f"phantoms {'x'.join(map(str, DEMO_SHAPE_VOX))}"
    images = sorted((tmp_path / "data").glob("Training/*/sub-*/ses-1/anat/*_T1w.nii.gz"))
    assert len(images) == 2 and tuple(nib.load(str(images[0])).shape) == tuple(DEMO_SHAPE_VOX)
    before = [p.stat().st_mtime_ns for p in images]
    assert synthetic_data(tmp_path / "data", 2, err, anatomy="phantom") == said  # found, not redone
    assert [p.stat().st_mtime_ns for p in images] == before


def test_an_unknown_anatomy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--anatomy 'brain'; expected auto, mni152 or phantom"):
        synthetic_data(tmp_path, 2, Console(file=io.StringIO()), anatomy="brain")
