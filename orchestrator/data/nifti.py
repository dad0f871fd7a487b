"""The NIfTI layout of an ATLAS R2.0 tree: T1w images paired with their lesion masks.

Two arrangements are recognised anywhere under the root folder:

- BIDS, as ATLAS R2.0 ships it::

    Training/R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz
    Training/R001/sub-r001s001/ses-1/anat/
        sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz
    Testing/R001/sub-.../ses-1/anat/..._T1w.nii.gz          (no masks)

- flattened, as several mirrors repackage it::

    Training/Images/<name>_T1w.nii.gz
    Training/Masks/<name>_label-L_desc-T1lesion_mask.nii.gz

Images and masks are paired by their BIDS `sub-` and `ses-` entities; where several masks
share them, the one closest to the image in the tree wins (same folder, then `../Masks`).

Like every layout module it offers `find_records(root, require_masks)` and `load(rec)`;
`orchestrator.data.sources` picks the layout of a folder. Every problem with a file
becomes a one-line `DataError` naming the file, the property that is wrong and what was
expected, so that `data check` can list all broken files of a dataset and training stops
with a clear message instead of a NumPy traceback.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from orchestrator.data.records import SubjectRecord, Volume
from orchestrator.data.zscore import zscore
from orchestrator.errors import DataError

logger = logging.getLogger(__name__)


def load_image(path: Path | str) -> SpatialImage:
    """`nib.load`, typed as what it opens here: a volume with a shape, an affine and a dataobj."""
    # cast: nib.load is annotated with FileBasedImage, the base of every format it reads;
    # the NIfTI (and MGH, Analyze) images it returns for a volume are SpatialImages
    return cast(SpatialImage, nib.load(str(path)))

IMAGE_SUFFIXES = ("_T1w.nii.gz", "_T1w.nii")
MASK_SUFFIXES = ("_label-L_desc-T1lesion_mask.nii.gz", "_label-L_desc-T1lesion_mask.nii")
AFFINE_TOLERANCE_MM = 1e-3
SEARCHED_PATTERNS = (
    "Training/R0NN/sub-*/ses-*/anat/*_T1w.nii[.gz]",
    "Training/Images/*_T1w.nii[.gz]",
    "any other */*_T1w.nii[.gz]",
)
_ENTITIES = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?")

def mask_name_for(image: Path) -> str:
    """The file name ATLAS gives the lesion mask of `image`."""
    for img_suffix, mask_suffix in zip(IMAGE_SUFFIXES, MASK_SUFFIXES):
        if image.name.endswith(img_suffix):
            return image.name[: -len(img_suffix)] + mask_suffix
    raise ValueError(f"{image}: not a T1w image name (expected a *_T1w.nii[.gz] suffix)")


def find_records(root: Path, require_masks: bool = True) -> list[SubjectRecord]:
    """Every T1w scan under `root` with its lesion mask, sorted by subject and session.

    Args:
        root: an existing folder holding an ATLAS R2.0 tree (BIDS or flattened) anywhere below it.
        require_masks: training use. Every image outside a `Testing/` folder must have a
            mask; `Testing/` images (which ATLAS ships without masks) are left out. With
            False, every image is listed and `mask` is None where there is none.

    Returns:
        The records, sorted by (subject, session, image path).

    Raises:
        DataError: no T1w image was found (the message lists the patterns searched); with
            `require_masks`, an image has no mask (the message names the image and the
            expected mask file); a subject and session appears twice; two masks are equally
            close to one image.
    """
    root = Path(root)
    images, masks = _scan(root)
    if not images:
        raise DataError(
            f"{root}: no T1w images found; searched {', '.join(SEARCHED_PATTERNS)}"
        )
    masks_by_key: dict[tuple[str, str], list[Path]] = {}
    for mask_path in masks:
        masks_by_key.setdefault(_entities(mask_path, MASK_SUFFIXES), []).append(mask_path)

    records: dict[tuple[str, str], SubjectRecord] = {}
    skipped_testing = 0
    for image in images:
        key = _entities(image, IMAGE_SUFFIXES)
        mask = _closest_mask(image, masks_by_key.get(key, []))
        if mask is None and require_masks:
            if _in_testing(image, root):
                skipped_testing += 1
                continue
            raise DataError(
                f"{image}: lesion mask not found; expected {mask_name_for(image)} in"
                f" {image.parent} (BIDS layout) or in a sibling Masks/ folder (flattened layout)"
            )
        if key in records:
            raise DataError(
                f"{image}: subject {key[0]} {key[1] or '(no session)'} found twice (also"
                f" {records[key].image}); expected one scan per subject and session - point"
                " the data folder at one copy of the dataset"
            )
        records[key] = SubjectRecord(key[0], key[1], image, mask)
    if skipped_testing:
        logger.info("left out %d Testing/ images without masks", skipped_testing)
    if not records:
        raise DataError(
            f"{root}: no T1w image with a lesion mask found ({skipped_testing} Testing/ images"
            " have none); expected Training/ scans with *_label-L_desc-T1lesion_mask.nii.gz"
        )
    return sorted(records.values())


def _scan(root: Path) -> tuple[list[Path], list[Path]]:
    """All image and mask files below `root`, skipping hidden files and folders (temp files)."""
    images: list[Path] = []
    masks: list[Path] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.endswith(IMAGE_SUFFIXES):
                images.append(Path(folder) / name)
            elif name.endswith(MASK_SUFFIXES):
                masks.append(Path(folder) / name)
    return images, masks


def _entities(path: Path, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """(subject, session) from a BIDS file name; the whole stem if it has no `sub-` entity."""
    match = _ENTITIES.match(path.name)
    if match:
        return match.group(1), match.group(2) or ""
    stem = path.name
    for suffix in suffixes:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem, ""


def _closest_mask(image: Path, candidates: list[Path]) -> Path | None:
    """The candidate sharing the longest folder prefix with `image` (None if there is none)."""
    if not candidates:
        return None
    same_folder = [m for m in candidates if m.parent == image.parent]
    if len(same_folder) == 1:
        return same_folder[0]
    if image.parent.name == "Images":
        sibling = [m for m in candidates if m.parent == image.parent.parent / "Masks"]
        if len(sibling) == 1:
            return sibling[0]

    def shared(mask: Path) -> int:
        return len(os.path.commonpath([image, mask]))

    ranked = sorted(candidates, key=shared, reverse=True)
    if len(ranked) > 1 and shared(ranked[0]) == shared(ranked[1]):
        raise DataError(
            f"{image}: several lesion masks match ({ranked[0]}, {ranked[1]}); expected one"
            " mask per image"
        )
    return ranked[0]


def _in_testing(image: Path, root: Path) -> bool:
    parts = image.relative_to(root).parts[:-1]
    return any(part.lower() == "testing" for part in parts) or root.name.lower() == "testing"

def load(rec: SubjectRecord) -> Volume:
    """Read, validate and normalise one subject's NIfTI image and (optional) mask.

    Raises:
        DataError: a file is missing, unreadable or truncated; the image is not 3D; it holds
            NaN/Inf voxels or only zeros; the mask's shape or affine differs from the image's
            (tolerance 1e-3); the mask holds values other than 0 and 1.
    """
    data, affine = _read_nifti(rec.image)
    data = _as_3d(data, rec.image, "image")
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise DataError(f"{rec.image}: {bad} NaN/Inf voxels; expected finite intensities")
    image, background = zscore(data, rec.image)
    label = None if rec.mask is None else _read_mask(rec.mask, data.shape, affine, rec.image)
    return Volume(image, label, affine, rec.image, background, rec.subject)



def orientation(path: Path) -> str:
    """The voxel axes' directions of a NIfTI file as axis codes ("RAS", "LPS", ...), from
    the header only.

    Raises:
        DataError: the file is missing or its header unreadable.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a NIfTI file (.nii or .nii.gz)")
    try:
        affine = load_image(path).affine
    except Exception as exc:  # nibabel raises many unrelated types for a broken header
        raise _unreadable(path, exc) from None
    return "".join(nib.aff2axcodes(affine))


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array and affine of a NIfTI file, every failure as one DataError line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected a NIfTI file (.nii or .nii.gz)")
    try:
        img = load_image(path)
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
