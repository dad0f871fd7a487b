"""Intensity normalisation shared by the layouts: z-score over the brain voxels."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.errors import DataError


def zscore(data: np.ndarray, path: Path) -> tuple[np.ndarray, float]:
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
