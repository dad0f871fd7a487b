"""Preprocessing cache: each subject as an uncompressed HDF5 file, its volumes contiguous.

Re-reading a 197x233x189 .nii.gz costs ~90 ms per random patch (the whole file is
decompressed); an uncompressed HDF5 file gives the same patch in about 1 ms, its datasets
stored contiguous and read through a memmap (`cachefile.CachedVolume`; docs/benchmarks.md).
`build_cache(root)` writes, by default into `<root>/.cache/` (a hidden folder, which
discovery of the NIfTI tree skips), per subject:

- `<subject>_<session>.h5`: `image` float32 (RAS, cropped to the brain's bounding box +
  `MARGIN_VOX`, z-scored over the brain exactly as `load_subject`), `label` uint8,
  `sdm` float16 (signed distance to the lesion boundary, for the boundary loss),
  `lesion_flat` (flat indices of the lesion voxels, so patch sampling needs no full
  read); attributes `affine` (of the cropped grid), `background`, `crop_start_vox`,
  `source_shape_vox`, `resample_mm` (NaN: none), `format_version`.
- `orchestrator-cache.json`, the manifest: per subject its sources (path relative to
  the source root, size, mtime_ns, sha256) and its .h5 file (name, size, mtime_ns).

A rerun rebuilds only what changed: sources whose size and mtime match the manifest are
not even hashed; otherwise the sha256 decides (a touched but unchanged file is reused).
Each .h5 is written to a hidden temporary name, fsynced and renamed; the manifest is
written atomically after them, and on an interruption with `"complete": false`. A later
run trusts an .h5 only if the manifest lists it with its exact size and mtime, and
discovery refuses an incomplete manifest, so no half-built cache is ever trained on.

Point `--data` at the cache folder: `discover_subjects` recognises the manifest and
`load_subject` / `PatchDataset` read the HDF5 files (`orchestrator.data.cachefile`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from orchestrator.atomic import atomic_path, atomic_write_text
from orchestrator.data.cachefile import (
    CACHE_FORMAT,
    CACHE_VERSION,
    MANIFEST_NAME,
    read_manifest,
)
from orchestrator.data.distance import signed_distance_map
from orchestrator.data.records import SubjectRecord
from orchestrator.data.sources import discover_subjects, load_subject
from orchestrator.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIRNAME = ".cache"
# The volumes' HDF5 layout: contiguous, read through a memmap (cachefile.py). A cache
# built with 32^3 chunks (before issue 27) is still read, through h5py, and rebuilt by
# the next `data cache` (the manifest's params differ).
LAYOUT = "contiguous"
MARGIN_VOX = 4
CHECKPOINT_EVERY_S = 30.0  # a long build saves its progress (complete: false) this often


@dataclass(frozen=True)
class CacheReport:
    """What `build_cache` did.

    Attributes:
        built: subjects (re)built.
        reused: subjects whose cache file was kept.
        removed: cache files deleted because their source is gone.
        out: the cache folder.
        seconds: wall time of the build.
    """

    built: int
    reused: int
    removed: int
    out: Path
    seconds: float


def default_cache_dir(root: Path) -> Path:
    """Where `build_cache(root)` writes when no `out` is given: `<root>/.cache`."""
    return Path(root) / DEFAULT_CACHE_DIRNAME


def build_cache(
    root: Path,
    out: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    resample_mm: float | None = None,
) -> CacheReport:
    """Preprocess every subject of an ATLAS tree into an HDF5 cache (see the module doc).

    Args:
        root: the NIfTI tree (as `discover_subjects`; subjects need lesion masks).
        out: the cache folder (default `<root>/.cache`). It belongs to the cache: stray
            `.h5` and temporary files in it are deleted.
        progress: called with (subjects done, subjects) after each subject.
        resample_mm: resample to this isotropic voxel size (linear; the mask linearly and
            thresholded at 0.5) after cropping; None keeps the source grid.

    Returns:
        The CacheReport.

    Raises:
        ConfigError: `resample_mm` is not positive.
        DataError: as `discover_subjects` and `load_subject` (every subject to build is
            validated before anything is written: a broken one leaves the cache folder as it
            was); `root` is itself a cache;
            `out` is `root`, contains `root`, or is a folder with files that are not ours.
    """
    start_s = time.perf_counter()
    root = Path(root)
    out = default_cache_dir(root) if out is None else Path(out)
    if resample_mm is not None and not (math.isfinite(resample_mm) and resample_mm > 0):
        raise ConfigError(f"resample_mm {resample_mm}; expected a positive voxel size in mm")
    _check_folders(root, out)
    records = discover_subjects(root)
    names = {_file_name(rec): rec for rec in records}
    if len(names) != len(records):
        raise DataError(f"{root}: two subjects map to one cache file name; expected distinct ids")
    params = {"resample_mm": resample_mm, "margin_vox": MARGIN_VOX, "layout": LAYOUT}
    old = _trusted_entries(out, params)
    todo = _sources_to_build(records, root, old)
    out.mkdir(parents=True, exist_ok=True)
    entries = dict(old)
    built = reused = 0
    saved_s = time.monotonic()
    try:
        for k, rec in enumerate(records):
            key = f"{rec.subject}/{rec.session}"
            sources, rebuild = todo[key]
            if not rebuild:
                entries[key] = {**old[key], **sources}
                reused += 1
            else:
                entries[key] = _build_one(rec, out / _file_name(rec), sources, resample_mm)
                built += 1
            if progress is not None:
                progress(k + 1, len(records))
            if time.monotonic() - saved_s > CHECKPOINT_EVERY_S:
                _write_manifest(out, root, params, entries, complete=False)
                saved_s = time.monotonic()
    except BaseException:
        _write_manifest(out, root, params, entries, complete=False)  # keep what is done
        raise
    current = {f"{rec.subject}/{rec.session}" for rec in records}
    removed = sum(1 for key in entries if key not in current)
    entries = {key: e for key, e in entries.items() if key in current}
    _write_manifest(out, root, params, entries, complete=True)
    _remove_strays(out, {e["file"] for e in entries.values()})
    seconds = time.perf_counter() - start_s
    logger.debug("cache %s: %d built, %d reused, %d removed in %.1f s",
                out, built, reused, removed, seconds)
    return CacheReport(built, reused, removed, out, round(seconds, 3))


# --- building ------------------------------------------------------------------------------

def _build_one(rec: SubjectRecord, path: Path, sources: dict, resample_mm: float | None) -> dict:
    """Preprocess one subject into `path` (atomically); its manifest entry."""
    import h5py  # deferred: only building a cache needs h5py

    vol = load_subject(rec)
    assert vol.label is not None
    image_ras = nib.as_closest_canonical(nib.Nifti1Image(vol.image, vol.affine))
    label_ras = nib.as_closest_canonical(nib.Nifti1Image(vol.label, vol.affine))
    image, label = np.asarray(image_ras.dataobj), np.asarray(label_ras.dataobj)
    affine = np.asarray(image_ras.affine, dtype=np.float64)
    lo, hi = _bounding_box((image != vol.background) | (label != 0), MARGIN_VOX)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    image, label = np.ascontiguousarray(image[box]), np.ascontiguousarray(label[box])
    affine = affine @ _translation(lo)
    if resample_mm is not None:
        image, label, affine = _resample(image, label, affine, resample_mm, vol.background)
    lesion_flat = np.flatnonzero(label).astype(np.uint32 if label.size < 2**32 else np.int64)
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32))  # contiguous: memmapped reads
        f.create_dataset("label", data=label.astype(np.uint8))
        f.create_dataset("sdm", data=signed_distance_map(label).astype(np.float16))
        f.create_dataset("lesion_flat", data=lesion_flat)
        f.attrs.update({"affine": affine, "background": float(vol.background),
                        "crop_start_vox": np.asarray(lo),
                        "source_shape_vox": np.asarray(image_ras.shape),
                        "resample_mm": np.nan if resample_mm is None else float(resample_mm),
                        "format_version": CACHE_VERSION, "subject": rec.subject, "session": rec.session})
    stat = path.stat()
    logger.debug("cached %s as %s (%s voxels)", rec.image, path.name, "x".join(map(str, image.shape)))
    return {"subject": rec.subject, "session": rec.session, "file": path.name,
            "file_size": stat.st_size, "file_mtime_ns": stat.st_mtime_ns,
            "shape_vox": [int(s) for s in image.shape], "lesion_vox": int(lesion_flat.size), **sources}


def _bounding_box(brain: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of the nonzero voxels, widened by `margin` and clipped to the volume."""
    lo, hi = [], []
    for axis in range(brain.ndim):
        other = tuple(a for a in range(brain.ndim) if a != axis)
        idx = np.flatnonzero(brain.any(axis=other))
        lo.append(max(0, int(idx[0]) - margin))
        hi.append(min(brain.shape[axis], int(idx[-1]) + 1 + margin))
    return np.array(lo), np.array(hi)


def _translation(offset_vox: np.ndarray) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset_vox
    return t


def _resample(image, label, affine, mm: float, background: float):
    """Linear resampling to `mm` isotropic voxels; grid edges stay where they were."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shape = np.array(image.shape)
    new_shape = np.maximum(1, np.round(shape * spacing / mm)).astype(int)
    zoom = new_shape / shape
    kw = {"order": 1, "grid_mode": True, "mode": "grid-constant"}
    image = ndimage.zoom(image, zoom, cval=background, **kw).astype(np.float32)
    label = (ndimage.zoom(label.astype(np.float32), zoom, cval=0.0, **kw) >= 0.5).astype(np.uint8)
    step = shape / new_shape  # old voxels per new voxel; new voxel j's centre at (j + .5) step - .5
    scale = np.diag([*step, 1.0])
    scale[:3, 3] = (step - 1.0) / 2.0
    return image, label, affine @ scale


def _sources_to_build(records: list[SubjectRecord], root: Path,
                      old: dict[str, dict]) -> dict[str, tuple[dict, bool]]:
    """Per subject its source entries and whether it must be (re)built; every subject to
    build is validated first, so a broken one stops the build before anything is written.

    Raises:
        DataError: as `load_subject`, for the first broken subject.
    """
    todo = {}
    for rec in records:
        key = f"{rec.subject}/{rec.session}"
        sources = _source_entries(rec, root, old.get(key))
        rebuild = not (key in old and _same_sources(old[key], sources))
        if rebuild:
            load_subject(rec)  # read twice (here and when built): the price of writing nothing
        todo[key] = (sources, rebuild)
    return todo


def _source_entries(rec: SubjectRecord, root: Path, previous: dict | None) -> dict:
    """{"image": {...}, "mask": {...}} with size, mtime_ns and sha256 (reused if unchanged)."""
    out = {}
    for name, path in (("image", rec.image), ("mask", rec.mask)):
        assert path is not None
        stat = path.stat()
        rel = os.path.relpath(path, root)
        prev = (previous or {}).get(name) or {}
        seen = (prev.get("path"), prev.get("size"), prev.get("mtime_ns"))
        if seen == (rel, stat.st_size, stat.st_mtime_ns):
            out[name] = dict(prev)
        else:
            out[name] = {"path": rel, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                         "sha256": _sha256(path)}
    return out


def _same_sources(entry: dict, sources: dict) -> bool:
    def ident(d: Any) -> tuple:
        return (d.get("path"), d.get("sha256")) if isinstance(d, dict) else (None, None)

    return all(ident(entry.get(name)) == ident(sources[name]) for name in ("image", "mask"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_name(rec: SubjectRecord) -> str:
    stem = f"{rec.subject}_{rec.session}" if rec.session else rec.subject
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".") + ".h5"


# --- the manifest and the folder ---------------------------------------------------------

def _check_folders(root: Path, out: Path) -> None:
    if (root / MANIFEST_NAME).is_file():
        raise DataError(f"{root}: is a cache folder ({MANIFEST_NAME}); expected the NIfTI tree"
                        " it was built from")
    r, o = root.resolve(), out.resolve()
    if o == r or o in r.parents:
        raise DataError(f"{out}: cache folder is or contains the source folder {root};"
                        " expected a separate folder (default <root>/.cache)")
    if out.is_dir() and not (out / MANIFEST_NAME).exists():
        foreign = [p.name for p in out.iterdir() if not _ours(p)]
        if foreign:
            raise DataError(f"{out}: not a cache folder, it holds {foreign[0]}; expected an empty"
                            " folder or a cache built by `orchestrator data cache`")


def _ours(path: Path) -> bool:
    return path.is_file() and (path.suffix == ".h5" or path.name.startswith(".tmp-"))


def _trusted_entries(out: Path, params: dict) -> dict[str, dict]:
    """The previous manifest's entries whose .h5 still has the recorded size and mtime."""
    where = out / MANIFEST_NAME
    if not where.exists():
        return {}
    try:
        manifest = read_manifest(where)
    except DataError as exc:
        logger.warning("%s; rebuilding the whole cache", exc)
        return {}
    if manifest.get("params") != params:
        logger.info("%s: built with %s, now %s; rebuilding everything", where, manifest.get("params"), params)
        return {}
    trusted = {}
    for entry in manifest.get("subjects", []):
        try:
            stat = (out / entry["file"]).stat()
            if (stat.st_size, stat.st_mtime_ns) == (entry["file_size"], entry["file_mtime_ns"]):
                trusted[f"{entry['subject']}/{entry['session']}"] = entry
                continue
        except (OSError, KeyError, TypeError):
            pass
        logger.info("%s: cache entry %s does not match its file; rebuilding it", where, entry.get("file"))
    return trusted


def _write_manifest(out: Path, root: Path, params: dict, entries: dict, complete: bool) -> None:
    doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "complete": complete,
           "source_root": str(root.resolve()), "params": params,
           "subjects": [entries[key] for key in sorted(entries)]}
    atomic_write_text(out / MANIFEST_NAME, json.dumps(doc, indent=1) + "\n")


def _remove_strays(out: Path, keep: set[str]) -> None:
    """Delete temporary files of interrupted runs and .h5 files the manifest does not list."""
    for path in out.iterdir():
        if _ours(path) and path.name not in keep:
            logger.debug("removing stray %s", path)
            path.unlink(missing_ok=True)
