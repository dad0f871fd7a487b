"""Find the subjects of an ATLAS R2.0 tree: T1w images paired with their lesion masks.

Two layouts are recognised anywhere under the root folder:

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

A folder of PNG slices (`images/<patient>/<NNN>.png` + `masks/<patient>/<NNN>.png`, see
`orchestrator.data.pngslices`) gives one record per patient whose `image` and `mask` are
the two slice folders.

A preprocessing cache folder (`orchestrator data cache`, see `orchestrator.data.cache`) is
recognised by its manifest, `orchestrator-cache.json`: its records carry the HDF5 file in
`cached`, and `load_subject` reads that instead of the NIfTI files.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("_T1w.nii.gz", "_T1w.nii")
MASK_SUFFIXES = ("_label-L_desc-T1lesion_mask.nii.gz", "_label-L_desc-T1lesion_mask.nii")
CACHE_MANIFEST_NAME = "orchestrator-cache.json"
SEARCHED_PATTERNS = (
    "Training/R0NN/sub-*/ses-*/anat/*_T1w.nii[.gz]",
    "Training/Images/*_T1w.nii[.gz]",
    "any other */*_T1w.nii[.gz]",
)
_ENTITIES = re.compile(r"^(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?")


@dataclass(frozen=True, order=True)
class SubjectRecord:
    """One T1w scan and, for training data, its lesion mask.

    Attributes:
        subject: BIDS subject id, e.g. "sub-r001s001".
        session: BIDS session id, e.g. "ses-1" ("" when the file name has none).
        image: the T1w NIfTI file.
        mask: the binary lesion mask (None for `Testing/` scans).
        cached: the subject's preprocessed HDF5 file when the record comes from a cache
            folder (then `image` and `mask` name the sources it was built from, which need
            not exist on this machine); None for plain NIfTI data.
    """

    subject: str
    session: str
    image: Path
    mask: Path | None = None
    cached: Path | None = None


def mask_name_for(image: Path) -> str:
    """The file name ATLAS gives the lesion mask of `image`."""
    for img_suffix, mask_suffix in zip(IMAGE_SUFFIXES, MASK_SUFFIXES):
        if image.name.endswith(img_suffix):
            return image.name[: -len(img_suffix)] + mask_suffix
    raise ValueError(f"{image}: not a T1w image name (expected a *_T1w.nii[.gz] suffix)")


def discover_subjects(root: Path, require_masks: bool = True) -> list[SubjectRecord]:
    """List every T1w scan under `root` with its lesion mask, sorted by subject and session.

    Args:
        root: a folder holding an ATLAS R2.0 tree (BIDS or flattened) anywhere below it,
            or a preprocessing cache folder (one holding `orchestrator-cache.json`), whose
            records are returned with `cached` set.
        require_masks: training use. Every image outside a `Testing/` folder must have a
            mask; `Testing/` images (which ATLAS ships without masks) are left out. With
            False, every image is listed and `mask` is None where there is none.

    Returns:
        The records, sorted by (subject, session, image path).

    Raises:
        DataError: `root` is missing or not a folder; no T1w image was found (the message
            lists the patterns searched); with `require_masks`, an image has no mask (the
            message names the image and the expected mask file); a subject and session
            appears twice; two masks are equally close to one image; a cache folder's
            manifest is unreadable, incomplete or lists a missing or truncated file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: dataset folder not found; expected a folder holding an ATLAS R2.0 tree"
            " (Training/R0NN/sub-*/ses-*/anat/ or Training/Images + Training/Masks)"
        )
    if (root / CACHE_MANIFEST_NAME).is_file():
        from orchestrator.data.cache import cached_records  # numpy; only for cache folders

        return cached_records(root)
    from orchestrator.data.pngslices import is_png_tree, png_records

    if is_png_tree(root):
        return png_records(root, require_masks)
    images, masks = _scan(root)
    if not images:
        raise DataError(
            f"{root}: no T1w images found; searched {', '.join(SEARCHED_PATTERNS)}"
        )
    masks_by_key: dict[tuple[str, str], list[Path]] = {}
    for mask in masks:
        masks_by_key.setdefault(_entities(mask, MASK_SUFFIXES), []).append(mask)

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
