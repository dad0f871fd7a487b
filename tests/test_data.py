"""orchestrator.data: discovery, NIfTI validation, synthetic phantoms, split and patches.

Real NIfTI files written with nibabel into tmp_path; volumes of 16^3-48^3 voxels.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from orchestrator.data.dataset import PatchDataset, load_validation_volumes
from orchestrator.data.folds import split_subjects
from orchestrator.data.records import SubjectRecord
from orchestrator.data.sources import check_subjects, discover_subjects, load_subject
from orchestrator.data.synth import BRAIN_TISSUES, WM, synthesize_atlas, synthesize_subject
from orchestrator.errors import ConfigError, DataError

SPACE = "space-MNI152NLin2009aSym"
MASK_SUFFIX = "_label-L_desc-T1lesion_mask.nii.gz"


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    synthesize_atlas(root, subjects=4, shape_vox=(32, 32, 32), seed=0)
    return root


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _phantom_arrays(shape=(16, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    image[2:-2, 2:-2, 2:-2] = rng.uniform(100, 200, size=[s - 4 for s in shape])
    mask = np.zeros(shape, np.uint8)
    mask[6:10, 6:10, 6:10] = 1
    return image, mask


def _bids_subject(root: Path, subject: str, image: np.ndarray, mask: np.ndarray | None,
                  mask_affine: np.ndarray | None = None) -> SubjectRecord:
    anat = root / "Training" / "R001" / subject / "ses-1" / "anat"
    image_path = _save(anat / f"{subject}_ses-1_{SPACE}_T1w.nii.gz", image)
    mask_path = None
    if mask is not None:
        mask_path = _save(anat / f"{subject}_ses-1_{SPACE}{MASK_SUFFIX}", mask, mask_affine)
    return SubjectRecord(subject, "ses-1", image_path, mask_path)


# --- synth + discovery -------------------------------------------------------------------

def test_synth_writes_bids_names_that_discover_pairs(synth_root):
    found = discover_subjects(synth_root)
    assert [r.subject for r in found] == [
        "sub-r001s001", "sub-r001s002", "sub-r001s003", "sub-r002s001"]
    first = found[0]
    anat = synth_root / "Training/R001/sub-r001s001/ses-1/anat"
    assert first.image == anat / f"sub-r001s001_ses-1_{SPACE}_T1w.nii.gz"
    assert first.mask == anat / f"sub-r001s001_ses-1_{SPACE}{MASK_SUFFIX}"
    assert all(r.session == "ses-1" and r.mask.parent == r.image.parent for r in found)
    assert not list(synth_root.rglob(".*")), "temporary files left behind"
    img, msk = nib.load(first.image), nib.load(first.mask)
    assert img.get_data_dtype() == np.float32 and msk.get_data_dtype() == np.uint8
    assert img.shape == (32, 32, 32)
    np.testing.assert_allclose(np.diag(img.affine)[:3], 1.0)
    np.testing.assert_array_equal(img.affine, msk.affine)
    assert set(np.unique(np.asarray(msk.dataobj))) == {0, 1}


def test_synth_is_deterministic_and_a_prefix_of_larger_runs(synth_root, tmp_path):
    records = synthesize_atlas(tmp_path / "a", subjects=2, shape_vox=(32, 32, 32), seed=0)
    reference = discover_subjects(synth_root)[:2]
    for new, ref in zip(records, reference):
        for a, b in ((new.image, ref.image), (new.mask, ref.mask)):
            np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj),
                                          np.asarray(nib.load(b).dataobj))
    other = synthesize_subject((32, 32, 32), seed=(1, 0))
    assert not np.array_equal(other.image, synthesize_subject((32, 32, 32), seed=(0, 0)).image)


@pytest.mark.parametrize("k", range(3))
def test_synth_lesions_inside_brain_and_hypointense(k):
    p = synthesize_subject((48, 40, 44), seed=(0, k))
    lesion = p.mask.astype(bool)
    assert p.image.dtype == np.float32 and p.mask.dtype == np.uint8
    assert lesion.sum() >= 40
    assert np.isin(p.tissue[lesion], BRAIN_TISSUES).all()
    healthy_wm = (p.tissue == WM) & ~lesion
    assert p.image[lesion].mean() < 0.7 * p.image[healthy_wm].mean()
    np.testing.assert_array_equal(p.tissue, p.tissue[::-1])  # bilateral symmetry
    assert (p.image[p.tissue == 0] == 0).all() and (p.image[p.tissue > 0] > 0).all()


def test_synth_rejects_tiny_shape(tmp_path):
    with pytest.raises(ConfigError, match="shape_vox"):
        synthesize_atlas(tmp_path, subjects=1, shape_vox=(8, 32, 32))


def test_discover_flattened_layout(tmp_path):
    image, mask = _phantom_arrays()
    for name in ("sub-r002s003_ses-1", "sub-r001s001_ses-1"):
        _save(tmp_path / "Training/Images" / f"{name}_{SPACE}_T1w.nii.gz", image)
        _save(tmp_path / "Training/Masks" / f"{name}_{SPACE}{MASK_SUFFIX}", mask)
    found = discover_subjects(tmp_path)
    assert [(r.subject, r.session) for r in found] == [
        ("sub-r001s001", "ses-1"), ("sub-r002s003", "ses-1")]
    assert all(r.mask.parent.name == "Masks" for r in found)
    assert found[0].mask.name.startswith("sub-r001s001_ses-1")


def test_discover_testing_images_have_no_masks(synth_root, tmp_path):
    image, mask = _phantom_arrays()
    _bids_subject(tmp_path, "sub-r001s001", image, mask)
    anat = tmp_path / "Testing/R009/sub-r009s001/ses-1/anat"
    _save(anat / f"sub-r009s001_ses-1_{SPACE}_T1w.nii.gz", image)
    assert [r.subject for r in discover_subjects(tmp_path)] == ["sub-r001s001"]
    every = discover_subjects(tmp_path, require_masks=False)
    assert [(r.subject, r.mask is None) for r in every] == [
        ("sub-r001s001", False), ("sub-r009s001", True)]


def test_discover_image_without_mask_names_it(tmp_path):
    image, mask = _phantom_arrays()
    _bids_subject(tmp_path, "sub-r001s001", image, mask)
    rec = _bids_subject(tmp_path, "sub-r001s002", image, None)
    pattern = re.escape(rec.image.name) + ".*lesion mask not found"
    with pytest.raises(DataError, match=pattern) as err:
        discover_subjects(tmp_path)
    assert f"sub-r001s002_ses-1_{SPACE}{MASK_SUFFIX}" in str(err.value)


def test_discover_missing_root_and_empty_tree(tmp_path):
    with pytest.raises(DataError, match="nowhere: dataset folder not found"):
        discover_subjects(tmp_path / "nowhere")
    (tmp_path / "Training").mkdir()
    with pytest.raises(DataError, match=r"no T1w images found; searched .*Training/Images"):
        discover_subjects(tmp_path)


# --- loading and validation --------------------------------------------------------------

def _truncate(rec: SubjectRecord) -> None:
    data = rec.image.read_bytes()
    rec.image.write_bytes(data[: len(data) // 2])


def _breakages(root: Path) -> dict[str, tuple[SubjectRecord, Path, str]]:
    """Subjects with one problem each: name -> (record, file to blame, property regex)."""
    image, mask = _phantom_arrays()
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    noise = np.random.default_rng(0).random((16,) * 3, np.float32)  # compresses badly
    nan_image = image.copy()
    nan_image[8, 8, 8] = np.nan
    cases = {
        "truncated": _bids_subject(root, "sub-r001s001", noise, mask),
        "shape": _bids_subject(root, "sub-r001s002", image, mask[:, :, :15]),
        "affine": _bids_subject(root, "sub-r001s003", image, mask, shifted),
        "nonbinary": _bids_subject(root, "sub-r001s004", image, mask * 2),
        "nan": _bids_subject(root, "sub-r001s005", nan_image, mask),
        "4d": _bids_subject(root, "sub-r001s006", np.stack([image, image], axis=-1), mask),
    }
    _truncate(cases["truncated"])
    blame = {"truncated": ("image", "truncated"), "shape": ("mask", "shape"),
             "affine": ("mask", "affine"), "nonbinary": ("mask", "non-binary"),
             "nan": ("image", "NaN"), "4d": ("image", "4D")}
    return {k: (rec, getattr(rec, blame[k][0]), blame[k][1]) for k, rec in cases.items()}


@pytest.mark.parametrize("kind", ["truncated", "shape", "affine", "nonbinary", "nan", "4d"])
def test_load_subject_names_file_and_property(tmp_path, kind):
    rec, path, prop = _breakages(tmp_path)[kind]
    with pytest.raises(DataError, match=re.escape(path.name) + f".*{prop}") as err:
        load_subject(rec)
    assert "\n" not in str(err.value) and "expected" in str(err.value)


def test_check_subjects_reports_every_broken_file(tmp_path):
    cases = _breakages(tmp_path)
    image, mask = _phantom_arrays()
    good = _bids_subject(tmp_path, "sub-r001s007", image, mask)
    records = discover_subjects(tmp_path)  # discovery does not read voxels
    assert len(records) == 7
    results = {r.subject: r for r in check_subjects(records)}
    assert results[good.subject].ok and results[good.subject].lesion_vox == 64
    assert results[good.subject].shape_vox == (16, 16, 16)
    for rec, path, prop in cases.values():
        res = results[rec.subject]
        assert not res.ok and re.search(re.escape(path.name) + f".*{prop}", res.problem)


def test_load_subject_normalises_and_tolerates_tiny_affine_drift(tmp_path):
    image, mask = _phantom_arrays()
    drift = np.eye(4)
    drift[1, 3] = 1e-4
    vol = load_subject(_bids_subject(tmp_path, "sub-r001s001", image, mask, drift))
    brain = image != 0
    assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    assert abs(vol.image[brain].mean()) < 1e-4 and abs(vol.image[brain].std() - 1) < 1e-4
    assert (vol.image[~brain] == 0).all() and vol.background == 0.0
    no_mask = SubjectRecord("sub-r001s001", "ses-1", vol.path, None)
    assert load_validation_volumes([no_mask])[0].label is None


# --- split and patches -------------------------------------------------------------------

def _records(n: int, sessions: int = 1) -> list[SubjectRecord]:
    return [SubjectRecord(f"sub-r001s{s:03d}", f"ses-{k + 1}", Path(f"/x/{s}_{k}_T1w.nii.gz"), None)
            for s in range(n) for k in range(sessions)]


def test_split_is_by_subject_deterministic_and_order_free():
    records = _records(10, sessions=2)
    train, val = split_subjects(records, val_fraction=0.2, seed=3)
    assert not {r.subject for r in train} & {r.subject for r in val}
    assert len({r.subject for r in val}) == 2 and len(train) + len(val) == 20
    assert split_subjects(records[::-1], 0.2, seed=3) == (train, val)
    assert split_subjects(records, 0.2, seed=4) != (train, val)
    assert [len(side) for side in split_subjects(_records(2), 0.0)] == [1, 1]
    assert [len(side) for side in split_subjects(_records(1), 0.5)] == [1, 0]
    with pytest.raises(ConfigError, match="val_fraction"):
        split_subjects(records, 1.0)


def test_patch_dataset_shapes_and_purity(synth_root):
    records = discover_subjects(synth_root)
    ds = PatchDataset(records, (16, 16, 16), samples_per_epoch=6, seed=1, augment=True)
    item = ds[0]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16, 16) and item["label"].dtype == torch.int64
    fresh = PatchDataset(records, (16, 16, 16), samples_per_epoch=6, seed=1, augment=True)
    fresh.set_epoch(2)
    later = [fresh[i] for i in reversed(range(6))][::-1]  # other order, other instance
    fresh.set_epoch(0)
    for i in range(6):
        for key in ("image", "label"):
            assert torch.equal(ds[i][key], fresh[i][key])
    ds.set_epoch(2)
    assert all(torch.equal(ds[i]["image"], later[i]["image"]) for i in range(6))
    assert not torch.equal(ds[0]["image"], fresh[0]["image"])  # epochs differ
    assert {ds.subject_index(i, epoch=0) for i in range(4)} == {0, 1, 2, 3}
    assert pickle.loads(pickle.dumps(ds))._cache == {}


def test_patch_dataset_lesion_fraction_one_always_hits_lesion(synth_root):
    ds = PatchDataset(discover_subjects(synth_root), (12, 12, 12), samples_per_epoch=16,
                      lesion_fraction=1.0, seed=5)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert all(ds[i]["label"].sum() > 0 for i in range(16))
    uniform = PatchDataset(discover_subjects(synth_root), (12, 12, 12), 16, lesion_fraction=0.0)
    hits = sum(int(uniform[i]["label"].sum() > 0) for i in range(16))
    assert hits < 16


def test_patch_dataset_pads_small_volumes(tmp_path):
    image, mask = _phantom_arrays((16, 14, 16))
    rec = _bids_subject(tmp_path, "sub-r001s001", image, mask)
    ds = PatchDataset([rec], (20, 20, 18), samples_per_epoch=3, lesion_fraction=0.5)
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (1, 20, 20, 18) and item["label"].shape == (20, 20, 18)
        assert item["label"].sum() == 64  # the whole lesion fits
        assert (item["image"][0, :2] == 0).all() and (item["image"][0, :, :3] == 0).all()
