"""Synthetic ATLAS R2.0 look-alikes: brain phantoms with stroke lesions, as a BIDS tree.

A phantom is an ellipsoid-ish head, bilaterally symmetric about the x midline: scalp,
skull, CSF, folded cortex (GM), WM, lateral ventricles and deep grey matter with T1
contrast (WM > GM > CSF), a smooth multiplicative bias field and Rician-like noise.
Each subject gets 1-3 lesions, hypo-intense like chronic stroke on T1, mostly in one
hemisphere, log-normally sized (median ~5 cm^3, 0.01-500 cm^3 at 1 mm, scaled with the
volume for smaller grids so that they stay inside the brain; the first lesion is drawn with at
least 64 voxels, so a 32^3 test volume still has a visible one).

Everything is vectorised: one 197x233x189 subject takes about a second to draw.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from orchestrator.atomic import atomic_path
from orchestrator.data.records import SubjectRecord
from orchestrator.errors import ConfigError

logger = logging.getLogger(__name__)

REFERENCE_SHAPE_VOX = (197, 233, 189)  # ATLAS R2.0 / MNI152NLin2009aSym at 1 mm
MNI_ORIGIN_MM = (-98.0, -134.0, -72.0)  # world position of voxel (0, 0, 0) there
SPACE = "space-MNI152NLin2009aSym"
SUBJECTS_PER_SITE = 3
MIN_SIDE_VOX = 16

BACKGROUND, SCALP, SKULL, CSF, GM, WM, DEEP_GM = range(7)
BRAIN_TISSUES = (CSF, GM, WM, DEEP_GM)
# Relative T1 intensity per tissue label (WM bright, GM grey, CSF dark, skull darker).
T1_BY_TISSUE = np.array([0.0, 0.65, 0.08, 0.22, 0.52, 0.85, 0.66], dtype=np.float32)
LESION_MEDIAN_CM3 = 5.0
LESION_LOG_SIGMA = 1.8
LESION_RANGE_CM3 = (0.01, 500.0)
MIN_PRIMARY_LESION_VOX = 64


@dataclass
class Phantom:
    """One synthetic subject.

    Attributes:
        image: float32 (X, Y, Z) T1w-like intensities (arbitrary scanner units), 0 outside the head.
        mask: uint8 (X, Y, Z) lesion mask in {0, 1}.
        tissue: uint8 (X, Y, Z) tissue labels before the lesions (BACKGROUND ... DEEP_GM).
        affine: 4x4 voxel-to-world matrix, 1 mm isotropic RAS.
    """

    image: np.ndarray
    mask: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray


def synthesize_atlas(
    out_dir: Path,
    subjects: int = 4,
    shape_vox: tuple[int, int, int] = REFERENCE_SHAPE_VOX,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[SubjectRecord]:
    """Write an ATLAS R2.0-style BIDS tree of synthetic subjects under `out_dir`.

    Files: `Training/R001/sub-r001s001/ses-1/anat/` +
    `sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz` and
    `..._label-L_desc-T1lesion_mask.nii.gz`, three subjects per site folder. Each file is
    written to a hidden temporary name and renamed, the mask before the image, so an
    interrupted run never leaves a half-written file or an image without its mask.

    Args:
        out_dir: dataset root (created if missing; existing subjects are overwritten).
        subjects: number of subjects.
        shape_vox: volume size in voxels (1 mm isotropic).
        seed: subject k is drawn from `np.random.default_rng([seed, k])`, so the output is
            a function of the seed, and a smaller `subjects` gives a prefix of a larger one.
        progress: called with (subjects done, subjects) after each subject.

    Returns:
        The records of the written subjects, sorted.

    Raises:
        ConfigError: `subjects` < 1 or a side of `shape_vox` < 16.
    """
    shape = _check_args(subjects, shape_vox)
    out_dir = Path(out_dir)
    records = []
    for k in range(subjects):
        phantom = synthesize_subject(shape, seed=(seed, k))
        records.append(write_subject(out_dir, k, phantom.image, phantom.mask, phantom.affine))
        if progress is not None:
            progress(k + 1, subjects)
    return sorted(records)


def write_subject(out_dir: Path, k: int, image: np.ndarray, mask: np.ndarray,
                  affine: np.ndarray) -> SubjectRecord:
    """Write subject number `k` (0-based) of a synthetic tree: mask first, then image.

    `Training/R{site}/sub-r{site}s{index}/ses-1/anat/`, three subjects per site folder.
    """
    site, index = divmod(k, SUBJECTS_PER_SITE)
    subject = f"sub-r{site + 1:03d}s{index + 1:03d}"
    anat = Path(out_dir) / "Training" / f"R{site + 1:03d}" / subject / "ses-1" / "anat"
    stem = f"{subject}_ses-1_{SPACE}"
    image_path = anat / f"{stem}_T1w.nii.gz"
    mask_path = anat / f"{stem}_label-L_desc-T1lesion_mask.nii.gz"
    _save_nifti(mask, affine, mask_path)
    _save_nifti(image, affine, image_path)
    logger.debug("wrote %s (%d lesion voxels)", image_path, int(mask.sum()))
    return SubjectRecord(subject, "ses-1", image_path, mask_path)


def synthesize_subject(shape_vox: Sequence[int], seed: int | Sequence[int] = 0) -> Phantom:
    """Draw one phantom (in memory); `synthesize_atlas` writes these to disk.

    Args:
        shape_vox: volume size (X, Y, Z) in voxels, each >= 16.
        seed: anything `np.random.default_rng` accepts.
    """
    shape = _check_args(1, shape_vox)
    rng = np.random.default_rng(seed)
    tissue = _draw_tissue(rng, shape)
    contrast = T1_BY_TISSUE * rng.uniform(0.96, 1.04, size=len(T1_BY_TISSUE)).astype(np.float32)
    image = contrast[tissue]
    image *= 1.0 + 0.03 * _smooth_field(rng, shape, step_vox=6.0)  # within-tissue texture
    mask = _draw_lesions(rng, tissue, image)
    image *= _bias_field(rng, shape)
    sigma = np.float32(0.03 * T1_BY_TISSUE[WM])
    image += sigma * rng.standard_normal(shape, dtype=np.float32)
    np.abs(image, out=image)  # magnitude images: Rician-like noise, never negative
    head = tissue != BACKGROUND
    np.maximum(image, np.float32(1e-3), out=image, where=head)
    image[~head] = 0.0
    image *= np.float32(rng.uniform(300.0, 800.0))  # arbitrary scanner units
    return Phantom(image, mask, tissue, _affine(shape))


def _check_args(subjects: int, shape_vox: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape_vox)
    if len(shape) != 3 or min(shape) < MIN_SIDE_VOX:
        raise ConfigError(
            f"synthetic data: shape_vox {tuple(shape_vox)}; expected 3 sides of at least"
            f" {MIN_SIDE_VOX} voxels"
        )
    if subjects < 1:
        raise ConfigError(f"synthetic data: subjects {subjects}; expected at least 1")
    return shape


def _affine(shape: tuple[int, int, int]) -> np.ndarray:
    """1 mm RAS; the MNI152NLin2009aSym origin, scaled for other grid sizes."""
    affine = np.eye(4)
    for axis in range(3):
        frac = MNI_ORIGIN_MM[axis] / REFERENCE_SHAPE_VOX[axis]
        affine[axis, 3] = float(round(frac * shape[axis]))
    return affine


def _axes_coords(shape, centre, half_axes):
    """Normalised coordinates per axis, shaped to broadcast: (X,1,1), (1,Y,1), (1,1,Z)."""
    out = []
    for axis, (n, c, h) in enumerate(zip(shape, centre, half_axes)):
        v = (np.arange(n, dtype=np.float32) - np.float32(c)) / np.float32(h)
        out.append(v.reshape([-1 if a == axis else 1 for a in range(3)]))
    return out


def _draw_tissue(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 tissue labels of a head, symmetric about the x midline."""
    nx, ny, nz = shape
    centre = ((nx - 1) / 2.0, 0.52 * (ny - 1), 0.45 * (nz - 1))  # x centre: exact midline
    size = rng.uniform(0.95, 1.03)
    half = (0.41 * nx * size, 0.43 * ny * size, 0.42 * nz * size)
    x, y, z = _axes_coords(shape, centre, half)
    radius = np.sqrt(x * x + y * y + z * z)
    outline = _smooth_field(rng, shape, step_vox=max(nx, ny, nz) / 4.0, symmetric_x=True)
    folds = _smooth_field(rng, shape, step_vox=max(3.0, nx / 24.0), symmetric_x=True)
    outer = radius * (1.0 + 0.03 * outline)
    inner = outer * (1.0 + 0.06 * folds)
    del radius, outline, folds

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[outer < 1.0] = SCALP
    tissue[outer < 0.93] = SKULL
    tissue[outer < 0.88] = CSF
    tissue[outer < 0.84] = GM
    tissue[(inner < 0.70) & (outer < 0.80)] = WM
    del inner
    # Interhemispheric fissure: a CSF sheet on the midline above the ventricles.
    fissure = (np.abs(x) * half[0] < max(0.6, 0.006 * nx)) & (z > -0.1) & (outer < 0.88)
    tissue[fissure & (tissue == GM)] = CSF
    del outer, fissure
    ventricle_scale = rng.uniform(0.8, 1.4)  # atrophy varies between subjects
    for sign in (-1.0, 1.0):  # structures in mirrored pairs keep the symmetry
        deep_gm_centre = (centre[0] + sign * 0.12 * nx, centre[1], centre[2] - 0.03 * nz)
        _ellipsoid_into(tissue, shape, deep_gm_centre, (0.06 * nx, 0.08 * ny, 0.07 * nz), DEEP_GM)
        ventricle_centre = (centre[0] + sign * 0.05 * nx, centre[1] + 0.02 * ny,
                            centre[2] + 0.06 * nz)
        ventricle_axes = (0.035 * nx * ventricle_scale, 0.15 * ny, 0.05 * nz * ventricle_scale)
        _ellipsoid_into(tissue, shape, ventricle_centre, ventricle_axes, CSF)
    return tissue


def _ellipsoid_into(tissue, shape, centre, half_axes, value) -> None:
    """Paint an axis-aligned ellipsoid into `tissue`, computed inside its bounding box only."""
    lo = [max(0, int(math.floor(c - h))) for c, h in zip(centre, half_axes)]
    hi = [min(n, int(math.ceil(c + h)) + 1) for n, c, h in zip(shape, centre, half_axes)]
    if any(h <= low for low, h in zip(lo, hi)):
        return
    box = tuple(slice(low, h) for low, h in zip(lo, hi))
    x, y, z = _axes_coords([h - low for low, h in zip(lo, hi)],
                           [c - low for c, low in zip(centre, lo)], half_axes)
    tissue[box][x * x + y * y + z * z < 1.0] = value


def _smooth_field(rng, shape, step_vox: float, symmetric_x: bool = False) -> np.ndarray:
    """Smooth random float32 field with unit-ish amplitude and features ~`step_vox` wide.

    Random control points, cubic spline up to half resolution, then linear to full: about
    as smooth as a full cubic upsampling at a fraction of its cost.
    """
    coarse_shape = [max(4, int(math.ceil(n / step_vox)) + 1) for n in shape]
    grid = rng.standard_normal(coarse_shape).astype(np.float32)
    if symmetric_x:
        grid = 0.5 * (grid + grid[::-1])
        grid /= grid.std() + 1e-6
    half_shape = [max(c, (n + 1) // 2) for c, n in zip(coarse_shape, shape)]
    field = _resize(grid, half_shape, order=3)
    return _resize(field, shape, order=1)


def _resize(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Spline resample; scipy's zoom maps corner voxels onto corner voxels (keeps the x mirror)."""
    if order == 1:
        return _linear_resize(array, shape)
    factors = [n / m for n, m in zip(shape, array.shape)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest")
    assert out.shape == tuple(shape), (out.shape, shape)
    return out.astype(np.float32, copy=False)


def _linear_resize(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize, corners aligned, done one axis at a time."""
    out = array
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0.0, m - 1, n, dtype=np.float64)
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(m - 2, 0))
        w = (pos - i0).astype(np.float32)
        i1 = np.minimum(i0 + 1, m - 1)
        wshape = [1] * out.ndim
        wshape[axis] = n
        w = w.reshape(wshape)
        a = np.take(out, i0, axis=axis)
        b = np.take(out, i1, axis=axis)
        out = a + (b - a) * w
    return out.astype(np.float32, copy=False)


def _bias_field(rng, shape) -> np.ndarray:
    """exp of a random quadratic per axis (separable): a smooth ~+-15 % intensity drift."""
    log_bias = np.zeros((1, 1, 1), dtype=np.float32)
    for axis, n in enumerate(shape):
        t = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        a, b = rng.normal(0.0, 0.06, size=2)
        v = (a * t + b * (t * t - 1.0 / 3.0)).astype(np.float32)
        log_bias = log_bias + v.reshape([-1 if i == axis else 1 for i in range(3)])
    return np.exp(log_bias)


def _draw_lesions(rng, tissue: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Paint 1-3 hypo-intense lesions into `image` (in place); returns their mask."""
    shape = tissue.shape
    mask = np.zeros(shape, dtype=np.uint8)
    brain_vox = int(np.count_nonzero(np.isin(tissue, BRAIN_TISSUES)))
    scale = float(np.prod(shape)) / float(np.prod(REFERENCE_SHAPE_VOX))
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    side = float(rng.choice([-1.0, 1.0]))
    for k in range(count):
        cm3 = rng.lognormal(math.log(LESION_MEDIAN_CM3), LESION_LOG_SIGMA)
        cm3 = float(np.clip(cm3, *LESION_RANGE_CM3))
        target_vox = max(cm3 * 1000.0 * scale, MIN_PRIMARY_LESION_VOX if k == 0 else 8.0)
        target_vox = min(target_vox, 0.2 * brain_vox)
        lesion_side = side if rng.random() < 0.85 else -side
        # the first lesion starts in deep tissue so that clipping to the brain spares it
        tissues = (WM, DEEP_GM) if k == 0 else (GM, WM, DEEP_GM)
        centre = _lesion_centre(rng, tissue, lesion_side, tissues)
        if centre is None:
            continue
        _paint_lesion(rng, tissue, image, mask, centre, target_vox)
    if not mask.any():  # every centre draw failed (tiny volume): put one in the middle of WM
        _paint_lesion(rng, tissue, image, mask, np.array(shape) // 2, MIN_PRIMARY_LESION_VOX)
    return mask


def _lesion_centre(rng, tissue, side: float, tissues: tuple[int, ...]) -> np.ndarray | None:
    """A random voxel of `tissues` in the given hemisphere (rejection sampling)."""
    shape = np.array(tissue.shape)
    mid = (shape[0] - 1) / 2.0
    for _ in range(20):
        cand = (rng.random((64, 3)) * shape).astype(np.intp)
        ok = np.isin(tissue[cand[:, 0], cand[:, 1], cand[:, 2]], tissues)
        ok &= (cand[:, 0] - mid) * side > 1.0
        if ok.any():
            return cand[np.argmax(ok)]
    return None


def _paint_lesion(rng, tissue, image, mask, centre, target_vox: float) -> None:
    """An irregular rotated blob of about `target_vox` voxels, clipped to the brain."""
    radius = (3.0 * target_vox / (4.0 * math.pi)) ** (1.0 / 3.0)
    ratios = np.exp(rng.normal(0.0, 0.25, size=3))
    axes = radius * ratios / np.prod(ratios) ** (1.0 / 3.0)
    reach = 1.4 * float(axes.max()) + 1.0
    lo = np.maximum(0, np.floor(centre - reach)).astype(int)
    hi = np.minimum(tissue.shape, np.ceil(centre + reach) + 1).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.indices(hi - lo, dtype=np.float32).reshape(3, -1)
    grid += (lo - centre)[:, None].astype(np.float32)
    rot = Rotation.random(random_state=rng).as_matrix().astype(np.float32)
    local = (rot.T @ grid) / axes[:, None].astype(np.float32)
    dist = np.sqrt((local * local).sum(axis=0)).reshape(hi - lo)
    bumps = _linear_resize(rng.standard_normal((4, 4, 4)).astype(np.float32), dist.shape)
    dist *= 1.0 + 0.15 * bumps
    in_brain = np.isin(tissue[box], BRAIN_TISSUES)
    lesion = (dist < 1.0) & in_brain
    weight = np.clip((1.15 - dist) / 0.3, 0.0, 1.0) * in_brain  # partial-volume edge
    value = T1_BY_TISSUE[CSF] * rng.uniform(1.0, 1.8)  # CSF-like: hypo-intense on T1
    image[box] = image[box] * (1.0 - weight) + np.float32(value) * weight
    mask[box] |= lesion.astype(np.uint8)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """nibabel save through a hidden temporary .nii.gz (gzip chosen by the suffix) + rename."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code="mni")
    img.set_qform(affine, code="mni")
    img.header.set_xyzt_units("mm")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
