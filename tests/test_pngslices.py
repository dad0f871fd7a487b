"""PNG slice folders (data/images/<patient>/<NNN>.png + data/masks/...) as LCNN data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.data.slices import SliceStackDataset, slice_stack
from orchestrator.data.sources import discover_subjects, load_subject
from orchestrator.data.synth import synthesize_atlas
from orchestrator.errors import DataError


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _export(root: Path, patient: str, image: np.ndarray, label: np.ndarray) -> None:
    """Write an (X, Y, Z) volume as one PNG per axial slice, (H=Y, W=X), 8-bit."""
    scaled = np.round(255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)
    for z in range(image.shape[2]):
        # numbers not zero-padded past 9, so that name order != numeric order
        _write_png(root / "images" / patient / f"{z}.png", scaled[:, :, z].T)
        _write_png(root / "masks" / patient / f"{z}.png", (255 * label[:, :, z].T).astype(np.uint8))


@pytest.fixture(scope="module")
def png_tree(tmp_path_factory) -> tuple[Path, list]:
    src = synthesize_atlas(tmp_path_factory.mktemp("atlas"), subjects=2, shape_vox=(32, 40, 16), seed=3)
    root = tmp_path_factory.mktemp("png") / "data"
    vols = [load_subject(r) for r in src]
    for k, vol in enumerate(vols):
        _export(root, f"patient{k}", vol.image, vol.label)
    return root, vols


def test_png_tree_reads_back_as_the_volumes_it_was_written_from(png_tree):
    root, vols = png_tree
    recs = discover_subjects(root)
    assert [r.subject for r in recs] == ["patient0", "patient1"]
    for rec, src in zip(recs, vols):
        vol = load_subject(rec)
        assert vol.image.shape == src.image.shape
        np.testing.assert_array_equal(vol.label, src.label)  # slice order is numeric: 2 < 10
        # 8-bit quantisation, then z-scored again: the same image up to ~1/255 of its range
        corr = np.corrcoef(vol.image.ravel(), src.image.ravel())[0, 1]
        assert corr > 0.999


def test_slice_stacks_from_png_equal_those_from_the_loaded_volume(png_tree):
    root, _ = png_tree
    recs = discover_subjects(root)
    ds = SliceStackDataset(recs, in_slices=3, size_hw=(40, 32), samples_per_epoch=4,
                           lesion_fraction=1.0, seed=0)
    item = ds[0]
    vol = load_subject(recs[ds.subject_index(0)])
    # size_hw equals (Y, X): no crop or pad, so the item is one of the volume's stacks
    matches = [z for z in range(vol.image.shape[2])
               if np.allclose(slice_stack(vol.image, z, 1), item["image"].numpy())]
    assert matches, "the item is not a stack of adjacent slices of its volume"
    z = matches[0]
    np.testing.assert_array_equal(vol.label[:, :, z].T, item["label"].numpy())
    assert item["label"].sum() > 0  # lesion_fraction 1: centred on a lesion slice


def test_png_problems_name_the_file(png_tree, tmp_path):
    root, vols = png_tree
    bad = tmp_path / "data"
    _export(bad, "p", vols[0].image, vols[0].label)
    (bad / "masks" / "p" / "3.png").unlink()
    with pytest.raises(DataError, match=r"images/p/3\.png: mask slice not found"):
        discover_subjects(bad)

    three_values = (7 * (np.arange(32) % 3)).astype(np.uint8)  # 0, 7, 14 along each row
    _write_png(bad / "masks" / "p" / "3.png", np.tile(three_values, (40, 1)))
    with pytest.raises(DataError, match=r"masks/p/3\.png: mask values \[0, 7, 14\]"):
        load_subject(discover_subjects(bad)[0])

    _write_png(bad / "masks" / "p" / "3.png", np.zeros((40, 32), np.uint8))
    _write_png(bad / "images" / "p" / "5.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"images/p/5\.png: slice of 8x8 pixels; expected 40x32"):
        load_subject(discover_subjects(bad)[0])

    (bad / "images" / "p" / "5.png").write_bytes(b"\x89PNG truncated")
    result = CliRunner().invoke(app, ["data", "check", str(bad)])
    assert result.exit_code == 2 and "5.png: unreadable PNG" in result.output


def test_data_check_passes_a_png_tree(png_tree):
    result = CliRunner().invoke(app, ["data", "check", str(png_tree[0])])
    assert result.exit_code == 0, result.output
    assert "all 2 subjects passed" in result.output
