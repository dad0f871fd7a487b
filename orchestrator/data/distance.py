"""Signed distance maps: what the boundary loss weighs each voxel's probability by.

The data cache stores one per subject (`orchestrator.data.cache`), the datasets compute
it for uncached subjects, and `orchestrator.training.losses` consumes it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance to the lesion boundary, in voxels (Kervadec et al., 2019).

    The boundary is taken on the voxel faces between lesion and background: a voxel's
    value is its centre's distance to the nearest voxel of the other kind, minus half a
    voxel, negative inside the lesion and positive outside. So no voxel is 0, the voxels
    next to the boundary are -0.5 (inside) and +0.5 (outside), and 1D [0, 0, 1, 1, 0]
    gives [1.5, 0.5, -0.5, -0.5, 0.5].

    A mask with no lesion voxel, or with no background voxel, has no boundary: its map is
    all zeros (as in Kervadec's reference code), so the boundary loss of such a patch is
    exactly 0 and the regional term alone decides; a constant there would make the loss
    depend on the patch size. Distances are in voxels (ATLAS is 1 mm isotropic). Computed
    on the whole volume, so that cropped patches keep the true distances.

    Args:
        mask: binary (nonzero = lesion) array of any dimension.

    Returns:
        float32 array of `mask`'s shape.
    """
    fg = np.asarray(mask) != 0
    if fg.all() or not fg.any():
        return np.zeros(fg.shape, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~fg)
    inside = ndimage.distance_transform_edt(fg)
    return np.where(fg, 0.5 - inside, outside - 0.5).astype(np.float32)
