"""Load one subject's T1w image and lesion mask, validated and z-score normalised.

Every problem with a file becomes a one-line `DataError` naming the file, the property
that is wrong and what was expected, so that `data check` can list all broken files of a
dataset and training stops with a clear message instead of a NumPy traceback.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from orchestrator.data.atlas import SubjectRecord
from orchestrator.errors import DataError

logger = logging.getLogger(__name__)

AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class Volume:
    """A loaded subject.

    Attributes:
        image: float32 (X, Y, Z), z-scored over the brain (originally nonzero) voxels;
            the voxels that were zero (background) are 0.
        label: uint8 (X, Y, Z) in {0, 1}, or None for a scan without mask.
        affine: 4x4 voxel-to-world (RAS mm) matrix of the image.
        path: the image file (for a cached subject the source NIfTI it was built from;
            the voxels come from the record's `cached` HDF5 file).
        background: the value of background voxels in `image` (0.0, or the image minimum
            when the scan had no zero voxels); patches are padded with it.
        subject: BIDS subject id.
    """

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    path: Path
    background: float = 0.0
    subject: str = ""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of validating one subject (one row of `data check`).

    Attributes:
        subject, session, image, mask: from the record.
        ok: True when the subject loads.
        problem: the one-line DataError message when it does not.
        shape_vox: the image shape when it loads.
        lesion_vox: lesion voxel count when it loads with a mask.
    """

    subject: str
    session: str
    image: Path
    mask: Path | None
    ok: bool
    problem: str | None = None
    shape_vox: tuple[int, int, int] | None = None
    lesion_vox: int | None = None


def load_subject(rec: SubjectRecord) -> Volume:
    """Read, validate and normalise one subject.

    A record from a cache folder (`rec.cached` set) is read from its HDF5 file instead:
    already RAS, cropped to the brain's bounding box and normalised the same way.

    Args:
        rec: the subject's image and (optional) mask files.

    Returns:
        The Volume (see its attributes).

    Raises:
        DataError: a file is missing, unreadable or truncated; the image is not 3D; it holds
            NaN/Inf voxels or only zeros; the mask's shape or affine differs from the image's
            (tolerance 1e-3); the mask holds values other than 0 and 1; a cache file lacks
            a dataset or attribute.
    """
    if rec.cached is not None:
        from orchestrator.data.cachefile import load_cached  # h5py only for cached data

        return load_cached(rec)
    if rec.image.is_dir():  # a folder of PNG slices (orchestrator.data.pngslices)
        from orchestrator.data.pngslices import read_png_volume

        data, label = read_png_volume(rec.image, rec.mask)
        image, background = _zscore(data, rec.image)
        return Volume(image, label, np.eye(4), rec.image, background, rec.subject)
    data, affine = _read_nifti(rec.image)
    data = _as_3d(data, rec.image, "image")
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise DataError(f"{rec.image}: {bad} NaN/Inf voxels; expected finite intensities")
    image, background = _zscore(data, rec.image)
    label = None if rec.mask is None else _read_mask(rec.mask, data.shape, affine, rec.image)
    return Volume(image, label, affine, rec.image, background, rec.subject)


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
    if not rec.image.is_file():
        raise DataError(f"{rec.image}: file not found; expected a NIfTI file (.nii or .nii.gz)")
    try:
        affine = nib.load(rec.image).affine
    except Exception as exc:  # nibabel raises many unrelated types for a broken header
        raise _unreadable(rec.image, exc) from None
    return "".join(nib.aff2axcodes(affine))


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


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array and affine of a NIfTI file, every failure as one DataError line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a NIfTI file (.nii or .nii.gz)")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except MemoryError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib raise many unrelated types
        raise _unreadable(path, exc) from None
    if not np.issubdtype(data.dtype, np.integer) and not np.issubdtype(data.dtype, np.floating):
        raise DataError(f"{path}: data type {data.dtype}; expected integer or float voxels")
    return data, affine


def _unreadable(path: Path, exc: Exception) -> DataError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataError(f"{path}: unreadable or truncated NIfTI ({type(exc).__name__}: {reason});"
                     " expected a complete .nii/.nii.gz file")


def _as_3d(data: np.ndarray, path: Path, what: str) -> np.ndarray:
    """`data` as (X, Y, Z); trailing singleton dimensions (X, Y, Z, 1) are dropped."""
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"{path}: {len(shape)}D {what} of shape {shape}; expected a 3D volume (X, Y, Z)"
        )
    return data


def _zscore(data: np.ndarray, path: Path) -> tuple[np.ndarray, float]:
    """Z-score over the nonzero (brain) voxels; background voxels become 0."""
    image = data.astype(np.float32, copy=True)
    brain = image != 0
    n_brain = int(np.count_nonzero(brain))
    if n_brain == 0:
        raise DataError(f"{path}: image is all zero; expected a T1w scan with nonzero brain voxels")
    values = image[brain]
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    if std == 0.0:
        raise DataError(
            f"{path}: constant intensity {mean:g} over the brain; expected tissue contrast"
        )
    image -= mean
    image /= std
    if n_brain == image.size:
        return image, float(image.min())
    image[~brain] = 0.0
    return image, 0.0


def _read_mask(path: Path, shape: tuple[int, ...], affine: np.ndarray, image: Path) -> np.ndarray:
    """The mask as uint8 {0, 1}, checked against the image's grid."""
    data, mask_affine = _read_nifti(path)
    data = _as_3d(data, path, "mask")
    if data.shape != shape:
        raise DataError(
            f"{path}: mask shape {data.shape} differs from image {image.name} shape {shape};"
            " expected the same voxel grid"
        )
    diff = float(np.abs(mask_affine - affine).max())
    if diff > AFFINE_TOLERANCE_MM:
        raise DataError(
            f"{path}: mask affine differs from image {image.name} affine by up to {diff:.4g}"
            f" (tolerance {AFFINE_TOLERANCE_MM:g}); expected the same voxel-to-world affine"
        )
    non_binary = (data != 0) & (data != 1)
    if non_binary.any():
        values = np.unique(data[non_binary])
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise DataError(
            f"{path}: non-binary mask, {int(np.count_nonzero(non_binary))} voxels hold values"
            f" {shown}; expected only 0 and 1"
        )
    return data.astype(np.uint8)
