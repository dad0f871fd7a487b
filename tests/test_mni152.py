"""Brain-anatomy subjects on the MNI152 template (data/mni152.py), offline: a stand-in
template of the real files' names and format in ORCHESTRATOR_TEMPLATE_DIR, and pip with
no index for the error path."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_runner import invoke

from orchestrator.data import mni152
from orchestrator.data.sources import discover_subjects, load_subject


def _fake_template(folder: Path, shape=(41, 49, 39)) -> None:
    """uint8 0-255 like nilearn's files: an ellipsoid brain, WM core, GM rim."""
    folder.mkdir(parents=True, exist_ok=True)
    idx = np.indices(shape).astype(np.float32)
    c = (np.array(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    r = np.sqrt((((idx - c) / (0.45 * np.array(shape))[:, None, None, None]) ** 2).sum(0))
    wm, gm = (r < 0.7), (r >= 0.7) & (r < 1.0)
    t1 = np.where(wm, 220, np.where(gm, 140, 0))
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-20.0, -24.0, -19.0)
    for key, data in (("t1", t1), ("gm", gm * 255), ("wm", wm * 255)):
        name = Path(mni152.TEMPLATE_FILES[key]).name
        nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(folder / name))


def test_subjects_on_the_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_TEMPLATE_DIR", str(tmp_path / "template"))
    _fake_template(tmp_path / "template")
    recs = mni152.synthesize_mni152(tmp_path / "data", subjects=3, seed=1)
    assert [r.subject for r in discover_subjects(tmp_path / "data")] == [r.subject for r in recs]
    template = mni152.load_template(mni152.cached_template() or {})
    assert template["t1"].shape == (20, 24, 19)  # 2x2x2 blocks of the 1 mm template
    images = []
    for rec in recs:
        img, mask = nib.load(str(rec.image)), np.asarray(nib.load(str(rec.mask)).dataobj)
        assert img.shape == (20, 24, 19) and np.allclose(np.diag(img.affine)[:3], 2.0)
        assert np.allclose(img.affine[:3, 3], (-19.5, -23.5, -18.5))  # centre of the first block
        data = np.asarray(img.dataobj)
        assert mask.any() and np.all(data[mask > 0] > 0)  # lesions lie inside the brain
        assert mask.sum() * 8e-3 <= mni152.LESION_RANGE_CM3[1] * 3  # at most 3 lesions of <= 60 cm^3
        wm = data[template["wm"] > 0.9 * template["wm"].max()]
        assert np.median(data[mask > 0]) < 0.7 * np.median(wm)  # hypo-intense, as stroke on T1
        images.append(data)
        load_subject(rec)  # passes the loader's checks
    assert not np.array_equal(images[0], images[1])  # each subject is deformed differently
    again = mni152.synthesize_mni152(tmp_path / "again", subjects=1, seed=1)
    assert np.array_equal(np.asarray(nib.load(str(again[0].image)).dataobj), images[0])


def test_explicit_mni152_without_template_or_network_is_one_line_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "ORCHESTRATOR_TEMPLATE_DIR": str(tmp_path / "none"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path), "PIP_CONFIG_FILE": os.devnull}
    res = invoke("data", "synth", "--out", str(tmp_path / "data"), "--anatomy", "mni152", env=env)
    assert res.exit_code == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "MNI152 template" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()
