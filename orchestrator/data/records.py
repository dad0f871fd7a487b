"""The record types every data module shares: a subject's files, a loaded volume, a check row.

A leaf module: it imports no other module of `orchestrator.data`, so every layout
(`nifti`, `pngslices`, `cachefile`), the layout chooser (`sources`) and the datasets can
import it without a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_MANIFEST_NAME = "orchestrator-cache.json"  # marks a preprocessing-cache folder


@dataclass(frozen=True, order=True)
class SubjectRecord:
    """One T1w scan and, for training data, its lesion mask.

    Attributes:
        subject: BIDS subject id, e.g. "sub-r001s001".
        session: BIDS session id, e.g. "ses-1" ("" when the file name has none).
        image: the T1w NIfTI file (a folder of slices for PNG data).
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
