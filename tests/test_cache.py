"""orchestrator.data.cache: the HDF5 preprocessing cache, and reading it as `--data`.

Real NIfTI trees from `synthesize_atlas` (32^3-48^3) and real HDF5 files in tmp_path.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from orchestrator.data import cache as cache_mod
from orchestrator.data.cache import MANIFEST_NAME, build_cache
from orchestrator.data.cachefile import CachedVolume, load_sdm
from orchestrator.data.dataset import PatchDataset, _prepare
from orchestrator.data.distance import signed_distance_map
from orchestrator.data.records import SubjectRecord
from orchestrator.data.sources import discover_subjects, load_subject
from orchestrator.data.synth import SPACE, synthesize_atlas, synthesize_subject
from orchestrator.errors import ConfigError, DataError

N_SUBJECTS = 3


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("atlas")
    synthesize_atlas(root, subjects=N_SUBJECTS, shape_vox=(32, 36, 32), seed=0)
    return root


@pytest.fixture
def tree(source, tmp_path) -> Path:
    """A private copy of the source tree (tests change files in it)."""
    return Path(shutil.copytree(source, tmp_path / "atlas"))


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> Path:
    """One subject stored LAS (x flipped) with a zero margin around the head, as ATLAS
    scans have: the cache must reorient it to RAS and crop to the brain."""
    root = tmp_path_factory.mktemp("padded")
    ph = synthesize_subject((32, 32, 32), seed=3)
    widths = ((9, 7), (5, 11), (6, 4))
    image, mask = np.pad(ph.image, widths)[::-1], np.pad(ph.mask, widths)[::-1]
    affine = ph.affine.copy()
    affine[:, 0] *= -1
    affine[0, 3] = 40.0
    anat = root / "Training" / "R001" / "sub-p01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    stem = f"sub-p01_ses-1_{SPACE}"
    nib.save(nib.Nifti1Image(image, affine), anat / f"{stem}_T1w.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz")
    return root


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def _arrays(cache_dir: Path) -> dict[str, tuple]:
    out = {}
    for rec in discover_subjects(cache_dir):
        vol = load_subject(rec)
        out[rec.subject] = (vol.image, vol.label, vol.affine, load_sdm(rec.cached))
    return out


# --- what the cache holds -------------------------------------------------------------------

def test_cache_equals_nifti_on_the_brain_box_in_ras(padded):
    report = build_cache(padded)
    assert (report.built, report.reused, report.removed) == (1, 0, 0)
    assert report.out == padded / ".cache" and (report.out / MANIFEST_NAME).is_file()
    (nifti_rec,) = discover_subjects(padded)  # the hidden .cache folder is not scanned
    assert nifti_rec.cached is None
    (rec,) = discover_subjects(report.out)
    assert rec.cached == report.out / "sub-p01_ses-1.h5" and rec.image == nifti_rec.image
    src, vol = load_subject(nifti_rec), load_subject(rec)
    assert vol.path == nifti_rec.image and vol.background == 0.0 and vol.subject == "sub-p01"

    canon = nib.as_closest_canonical(nib.Nifti1Image(src.image, src.affine))
    canon_label = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(src.label, src.affine)).dataobj)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    with h5py.File(rec.cached) as f:
        lo = np.asarray(f.attrs["crop_start_vox"])
        chunks = f["image"].chunks
    box = tuple(slice(a, a + s) for a, s in zip(lo, vol.image.shape))
    np.testing.assert_allclose(vol.image, np.asarray(canon.dataobj)[box], atol=1e-6)
    np.testing.assert_array_equal(vol.label, canon_label[box])
    # cropped to the head + 4 voxels: smaller than the source, and nothing nonzero lost
    assert all(s < t for s, t in zip(vol.image.shape, src.image.shape))
    assert np.count_nonzero(vol.image) == np.count_nonzero(src.image)
    assert vol.label.sum() == src.label.sum() > 0
    assert chunks is None  # contiguous: patches are read through a memmap
    # the same voxel sits at the same world position in both
    voxel = np.argwhere(vol.label)[0]
    world = vol.affine @ np.r_[voxel, 1.0]
    src_voxel = np.round(np.linalg.solve(src.affine, world)[:3]).astype(int)
    assert src.label[tuple(src_voxel)] == 1
    assert src.image[tuple(src_voxel)] == pytest.approx(vol.image[tuple(voxel)], abs=1e-6)


def test_signed_distance_is_negative_inside_positive_outside(source, tmp_path):
    np.testing.assert_array_equal(signed_distance_map(np.array([0, 0, 1, 1, 0])), [1.5, 0.5, -0.5, -0.5, 0.5])
    assert not signed_distance_map(np.zeros((4, 5, 6))).any()  # no boundary: no boundary signal
    out = build_cache(source, tmp_path / "c").out
    rec = discover_subjects(out)[0]
    label, sdm = load_subject(rec).label, load_sdm(rec.cached)
    assert sdm.shape == label.shape and sdm.dtype == np.float32
    assert np.all(sdm[label == 1] < 0) and np.all(sdm[label == 0] > 0)
    assert sdm[label == 1].max() == -0.5 and sdm[label == 0].min() == 0.5


def test_resample_mm_changes_the_grid_not_the_world(padded, tmp_path):
    out = build_cache(padded, tmp_path / "c2", resample_mm=2.0).out
    (rec,) = discover_subjects(out)
    vol, src = load_subject(rec), load_subject(discover_subjects(padded)[0])
    np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), 2.0, atol=0.1)
    centroid = [(a @ np.r_[np.argwhere(lab).mean(0), 1.0])[:3] for a, lab in
                ((vol.affine, vol.label), (src.affine, src.label))]
    assert np.linalg.norm(centroid[0] - centroid[1]) < 2.0
    with pytest.raises(ConfigError, match="resample_mm -1"):
        build_cache(padded, tmp_path / "c3", resample_mm=-1)


# --- rebuilding only what changed -------------------------------------------------------------

def test_second_build_reuses_and_only_changed_sources_rebuild(tree):
    first = build_cache(tree)
    assert (first.built, first.reused) == (N_SUBJECTS, 0)
    again = build_cache(tree)
    assert (again.built, again.reused, again.removed) == (0, N_SUBJECTS, 0)

    recs = discover_subjects(tree)
    os.utime(recs[0].image)  # touched, same bytes: the sha256 says reuse
    touched = build_cache(tree)
    assert (touched.built, touched.reused) == (0, N_SUBJECTS)
    entry = json.loads((first.out / MANIFEST_NAME).read_text())["subjects"][0]
    assert entry["image"]["mtime_ns"] == recs[0].image.stat().st_mtime_ns

    mask = nib.load(recs[1].mask)
    data = np.asarray(mask.dataobj).copy()
    data[np.nonzero(data)[0][0]] = 0  # drop one slab of the lesion
    nib.save(nib.Nifti1Image(data, mask.affine), recs[1].mask)
    changed = build_cache(tree)
    assert (changed.built, changed.reused) == (1, N_SUBJECTS - 1)
    cached = {r.subject: r for r in discover_subjects(changed.out)}
    assert load_subject(cached[recs[1].subject]).label.sum() == data.sum()

    shutil.rmtree(recs[2].image.parents[2])  # the subject is gone from the source
    gone = build_cache(tree)
    assert (gone.built, gone.reused, gone.removed) == (0, N_SUBJECTS - 1, 1)
    assert not (gone.out / f"{recs[2].subject}_ses-1.h5").exists()
    assert len(discover_subjects(gone.out)) == N_SUBJECTS - 1


def test_interrupted_build_resumes_to_a_complete_cache(tree, source, tmp_path, monkeypatch):
    reference = _arrays(build_cache(source, tmp_path / "reference").out)
    real, calls = cache_mod._build_one, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_build_one", failing)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tree)
    monkeypatch.setattr(cache_mod, "_build_one", real)
    out = tree / ".cache"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and len(manifest["subjects"]) == 1
    with pytest.raises(DataError, match="interrupted"):
        discover_subjects(out)
    # what a killed writer leaves: a temp file, and a truncated .h5 the manifest does not list
    (out / ".tmp-sub-r001s002_ses-1.h5.x1y2.h5").write_bytes(b"\x89HDF\r\n")
    (out / "sub-r001s003_ses-1.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)

    resumed = build_cache(tree)
    assert (resumed.built, resumed.reused) == (N_SUBJECTS - 1, 1)
    assert _temp_files(out) == []
    got = _arrays(out)
    assert got.keys() == reference.keys()
    for subject, arrays in reference.items():
        for a, b in zip(arrays, got[subject]):
            np.testing.assert_array_equal(a, b)


def test_truncated_listed_h5_is_refused_then_rebuilt(tree):
    out = build_cache(tree).out
    path = sorted(out.glob("*.h5"))[0]
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(DataError, match=rf"{path.name}: \d+ bytes, the manifest says \d+ \(truncated"):
        discover_subjects(out)
    with pytest.raises(DataError, match="unreadable or truncated HDF5"):
        load_subject(SubjectRecord("sub-x", "ses-1", Path("x_T1w.nii.gz"), None, cached=path))
    report = build_cache(tree)
    assert (report.built, report.reused) == (1, N_SUBJECTS - 1)
    assert all(load_subject(r).label.sum() > 0 for r in discover_subjects(out))


# --- bad input ---------------------------------------------------------------------------------

def test_bad_cache_input_gives_one_line_errors(tree, tmp_path):
    out = build_cache(tree).out
    manifest = out / MANIFEST_NAME
    good = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(DataError, match=rf"{MANIFEST_NAME}: unreadable cache manifest \(JSONDecodeError"):
        discover_subjects(out)
    assert build_cache(tree).built == N_SUBJECTS  # the builder recovers: it rebuilds
    manifest.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a cache manifest; expected \"format\""):
        discover_subjects(out)
    manifest.write_text(good)

    path = sorted(out.glob("*.h5"))[0]
    with h5py.File(path, "a") as f:
        del f["sdm"]
    with pytest.raises(DataError, match=rf"{path.name}: no 'sdm' dataset; expected image, label, sdm"):
        load_sdm(path)
    with pytest.raises(DataError, match="cache file not found"):
        CachedVolume(out / "missing.h5", (8, 8, 8))

    with pytest.raises(DataError, match="is a cache folder"):
        build_cache(out)
    with pytest.raises(DataError, match="is or contains the source folder"):
        build_cache(tree, tree)
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a cache folder, it holds notes.txt") as excinfo:
        build_cache(tree, foreign)
    assert "\n" not in str(excinfo.value)


# --- patches straight from the cache -----------------------------------------------------------

@pytest.fixture(scope="module")
def cached(source, tmp_path_factory) -> list[SubjectRecord]:
    return discover_subjects(build_cache(source, tmp_path_factory.mktemp("cache")).out)


def test_patch_dataset_on_cache_shapes_and_determinism(cached):
    ds = PatchDataset(cached, (16, 20, 12), samples_per_epoch=6, seed=3, augment=True)
    item = ds[0]
    assert item["image"].shape == (1, 16, 20, 12) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 20, 12) and item["label"].dtype == torch.int64
    twin = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    for i in range(6):
        a, b = ds[i], twin[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], twin[0]["image"])
    big = PatchDataset(cached, (48, 40, 36), samples_per_epoch=3)  # larger than the volumes: padded
    assert big[0]["image"].shape == (1, 48, 40, 36)
    sure = PatchDataset(cached, (12, 12, 12), samples_per_epoch=12, lesion_fraction=1.0, seed=1)
    assert all(sure[i]["label"].sum() > 0 for i in range(12))


@pytest.mark.parametrize("patch", [(16, 16, 16), (40, 24, 48)])
def test_cached_patches_equal_in_memory_patches(cached, patch):
    """Reading patches from the file is the same function of the draws as slicing the
    loaded (and padded) volume, padding included."""
    from_file = PatchDataset(cached, patch, samples_per_epoch=10, lesion_fraction=0.5, augment=True)
    in_memory = PatchDataset(cached, patch, samples_per_epoch=10, lesion_fraction=0.5, augment=True)
    in_memory._prepare_record = lambda rec: _prepare(load_subject(rec), patch)
    for i in range(10):
        assert from_file.patch_draw(i) == in_memory.patch_draw(i)
        a, b = from_file[i], in_memory[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_lesion_share_of_patches_matches_lesion_fraction(cached):
    ds = PatchDataset(cached, (8, 8, 8), samples_per_epoch=400, lesion_fraction=0.5, seed=7)
    draws = [ds.patch_draw(i) for i in range(400)]
    centre_on_lesion = [bool(ds[i]["label"][4, 4, 4]) for i in range(400)]
    assert abs(np.mean([d.lesion_centred for d in draws]) - 0.5) < 0.1
    assert abs(np.mean(centre_on_lesion) - 0.5) < 0.1  # measured on the patches themselves


def test_dataloader_workers_read_the_cache_after_the_parent_did(cached):
    ds = PatchDataset(cached, (16, 16, 16), samples_per_epoch=8, seed=2)
    expected = torch.stack([ds[i]["image"] for i in range(8)])  # the parent holds open files
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    got = torch.cat([batch["image"] for batch in loader])
    assert torch.equal(got, expected)


def test_crops_come_from_a_memmap_and_a_chunked_cache_still_reads(cached, tmp_path):
    """Issue 27: the volumes are contiguous and a crop is read through a memmap of the file;
    a cache built with 32^3 chunks before it reads the same voxels through h5py."""
    from orchestrator.data import cachefile

    rec = cached[0]
    vol = CachedVolume(rec.cached, (8, 8, 8))
    start, size = np.array([3, 2, 5]), (10, 12, 9)
    image, label = vol.crop(start, size)
    with h5py.File(rec.cached) as f:
        box = tuple(slice(a, a + s) for a, s in zip(start - vol.pad_lo, size))
        want_image, want_label = f["image"][box], f["label"][box]
        assert f["image"].chunks is None and f["sdm"].chunks is None
    assert isinstance(cachefile._mapped(cachefile._handle(rec.cached), rec.cached, "image"), np.memmap)
    np.testing.assert_array_equal(image, want_image)
    np.testing.assert_array_equal(label, want_label)
    assert image.flags.writeable and not isinstance(image, np.memmap)  # a copy, not a view
    old = tmp_path / "chunked.h5"  # the layout of caches built before
    with h5py.File(rec.cached) as src, h5py.File(old, "w") as dst:
        for name in ("image", "label", "sdm"):
            dst.create_dataset(name, data=src[name][()], chunks=(4, 4, 4))
        dst.create_dataset("lesion_flat", data=src["lesion_flat"][()])
        dst.attrs.update(dict(src.attrs))
    chunked = CachedVolume(old, (8, 8, 8))
    assert cachefile._mapped(cachefile._handle(old), old, "image") is None
    for a, b in zip(chunked.crop(start, size, names=("image", "label", "sdm")),
                    vol.crop(start, size, names=("image", "label", "sdm"))):
        np.testing.assert_array_equal(a, b)

