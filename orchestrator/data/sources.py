"""The layout chooser: which of the three data layouts a folder holds, and one subject's load.

A data folder is one of:

- a NIfTI tree, BIDS or flattened, as ATLAS R2.0 ships it (`orchestrator.data.nifti`);
- a folder of PNG slices, `images/<patient>/<NNN>.png` + `masks/<patient>/<NNN>.png`
  (`orchestrator.data.pngslices`): one record per patient whose `image` and `mask` are
  the two slice folders;
- a preprocessing cache (`orchestrator data cache`, `orchestrator.data.cache`), recognised
  by its manifest `orchestrator-cache.json` (`orchestrator.data.cachefile`): its records
  carry the HDF5 file in `cached`, and `load_subject` reads that instead of the NIfTI files.

Each layout module offers the same two functions, `find_records(root, require_masks)`
and `load(rec)`; `discover_subjects` and `load_subject` pick the one that applies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.data import cachefile, nifti, pngslices
from orchestrator.data.records import CACHE_MANIFEST_NAME, CheckResult, SubjectRecord, Volume
from orchestrator.errors import DataError


def discover_subjects(root: Path, require_masks: bool = True) -> list[SubjectRecord]:
    """List every subject under `root`, sorted by subject and session.

    Args:
        root: a NIfTI tree (BIDS or flattened) anywhere below it, a folder of PNG slices,
            or a preprocessing cache folder (one holding `orchestrator-cache.json`), whose
            records are returned with `cached` set.
        require_masks: training use: every subject needs a lesion mask (`Testing/`
            images of a NIfTI tree, which ATLAS ships without masks, are left out). With
            False, every image is listed and `mask` is None where there is none.

    Returns:
        The records, sorted by (subject, session, image path).

    Raises:
        DataError: `root` is missing or not a folder; as the layout's `find_records`
            (no image found, a missing mask, a subject twice, an unreadable or incomplete
            cache manifest, ...).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: dataset folder not found; expected a folder holding an ATLAS R2.0 tree"
            " (Training/R0NN/sub-*/ses-*/anat/ or Training/Images + Training/Masks)"
        )
    return _layout(root).find_records(root, require_masks)


def _layout(root: Path):
    """The layout module of an existing folder."""
    if (root / CACHE_MANIFEST_NAME).is_file():
        return cachefile
    if pngslices.is_png_tree(root):
        return pngslices
    return nifti


def load_subject(rec: SubjectRecord) -> Volume:
    """Read, validate and normalise one subject, from whichever layout its record names.

    A record from a cache folder (`rec.cached` set) is read from its HDF5 file: already
    RAS, cropped to the brain's bounding box and normalised the same way.

    Raises:
        DataError: a file is missing, unreadable or truncated; the image is not 3D; it holds
            NaN/Inf voxels or only zeros; the mask's shape or affine differs from the image's
            (tolerance 1e-3); the mask holds values other than 0 and 1; a cache file lacks
            a dataset or attribute.
    """
    if rec.cached is not None:
        return cachefile.load(rec)
    if rec.image.is_dir():
        return pngslices.load(rec)
    return nifti.load(rec)


def orientation(rec: SubjectRecord) -> str | None:
    """The voxel axes' directions as axis codes ("RAS", "LPS", ...) from the header only.

    A cached subject is RAS (the cache reorients); PNG slices have none (None).

    Raises:
        DataError: the image file is missing or its header unreadable.
    """
    if rec.cached is not None:
        return "RAS"
    if rec.image.is_dir():
        return None
    return nifti.orientation(rec.image)


def training_orientation(records: list[SubjectRecord]) -> str | None:
    """The orientation all `records` share, or None when they differ or have none."""
    found = {orientation(rec) for rec in records}
    return found.pop() if len(found) == 1 else None


def check_orientation(rec: SubjectRecord, expected: str | None, checkpoint: Path) -> None:
    """Refuse an image whose voxel axes differ from those the checkpoint was trained on.

    Raises:
        DataError: the orientations differ (the message names the image and both codes).
    """
    got = orientation(rec)
    if expected and got and got != expected:
        raise DataError(f"{rec.image}: orientation {got}, but {checkpoint} was trained on "
                        f"{expected} images; expected {expected} - reorient the image first "
                        "(e.g. fslreorient2std, or nibabel's as_closest_canonical for RAS)")


def check_subjects(records: list[SubjectRecord]) -> list[CheckResult]:
    """Validate every subject, without stopping at the first broken one.

    Args:
        records: the subjects to check (from `discover_subjects`).

    Returns:
        One CheckResult per record, in the same order.
    """
    results = []
    for rec in records:
        row = (rec.subject, rec.session, rec.image, rec.mask)
        try:
            vol = load_subject(rec)
        except DataError as exc:
            results.append(CheckResult(*row, ok=False, problem=str(exc)))
            continue
        lesion_vox = None if vol.label is None else int(np.count_nonzero(vol.label))
        nx, ny, nz = (int(s) for s in vol.image.shape)
        results.append(CheckResult(*row, ok=True, shape_vox=(nx, ny, nz), lesion_vox=lesion_vox))
    return results
