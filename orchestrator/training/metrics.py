"""Per-subject segmentation metrics of a binary lesion mask, all finite for empty masks.

Voxel-wise: Dice (`validation.dice_score`), IoU (Jaccard, `validation.iou_score`, MONAI's
`compute_iou`), sensitivity, specificity, precision. Surface: the 95th-percentile Hausdorff
distance (MONAI). Lesion-wise, as the ATLAS R2.0 challenge scores them
(github.com/npnl/atlas2_grand_challenge, isles/scoring.py, `compute_lesion_f1_score`, the
ISLES'22 definition by E. de la Rosa): 3D connected components with 26-connectivity; a true
lesion is detected (TP) when a predicted voxel overlaps it, missed (FN) otherwise; a
predicted component touching no true lesion is a false positive (FP);
lesion F1 = TP / (TP + (FP + FN) / 2). Plus the absolute lesion count difference
(`compute_absolute_lesion_count_difference`) and the volume difference: the challenge's
`volume_difference` is |sum(pred) - sum(truth)| in voxels (`abs_volume_diff_vox`; ATLAS
R2.0 is 1 mm isotropic, so voxels are mm^3 there), ours also in mm^3 from the voxel size.

Empty masks, so that every subject gives a number and means stay defined:
- a ratio whose denominator is 0 (sensitivity without true lesion, precision without
  predicted voxel, specificity of an all-lesion volume) is 1.0: no error of that kind was
  possible; Dice of two empty masks is 1.0 and lesion F1 with no lesion on either side is
  1.0 (the challenge's `empty_value`);
- HD95 is 0.0 when both masks are empty and, when exactly one is, the image diagonal in
  mm (no distance in the image is larger) where MONAI would give NaN.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from orchestrator.training.validation import dice_score, iou_score

CONNECTIVITY = 26
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

# The keys `segmentation_metrics` returns; the first group is what reports summarise.
SUMMARY_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "hd95_mm", "lesion_f1",
                   "lesion_count_diff", "volume_diff_mm3", "abs_volume_diff_mm3", "abs_volume_diff_vox")
COUNT_KEYS = ("lesions_true", "lesions_pred", "lesions_detected", "lesions_missed",
              "lesions_false_positive", "volume_true_mm3", "volume_pred_mm3")


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray,
                         spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, Any]:
    """Every metric of one subject (see the module docstring for the conventions).

    Args:
        pred: predicted mask (X, Y, Z), nonzero = lesion.
        truth: ground-truth mask of the same shape.
        spacing_mm: voxel size along each axis, in mm.

    Returns:
        {"dice", "iou", "sensitivity", "specificity", "precision", "hd95_mm", "lesion_f1",
        "lesion_count_diff" (|lesions_pred - lesions_true|), "volume_diff_mm3" (predicted
        minus true, signed), "abs_volume_diff_mm3", "abs_volume_diff_vox" (ATLAS's
        volume difference), "lesions_true", "lesions_pred",
        "lesions_detected", "lesions_missed", "lesions_false_positive", "volume_true_mm3",
        "volume_pred_mm3"}: floats and ints, never NaN.

    Raises:
        ValueError: the shapes differ, the masks are not 3D, or `spacing_mm` does not
            hold one positive size per axis.
    """
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"segmentation_metrics: prediction {p.shape} and truth {t.shape}; "
                         "expected two 3D masks of one shape")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"segmentation_metrics: spacing_mm {spacing_mm}; expected 3 positive sizes")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    tn = p.size - tp - fp - fn
    voxel_mm3 = math.prod(spacing)
    lesions = lesion_counts(p, t)
    vol_true, vol_pred = (tp + fn) * voxel_mm3, (tp + fp) * voxel_mm3
    return {
        "dice": dice_score(p, t),
        "iou": iou_score(p, t),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "hd95_mm": hd95(p, t, spacing),
        "lesion_f1": lesion_f1(lesions),
        "lesion_count_diff": abs(lesions["lesions_pred"] - lesions["lesions_true"]),
        "volume_diff_mm3": vol_pred - vol_true,
        "abs_volume_diff_mm3": abs(vol_pred - vol_true),
        "abs_volume_diff_vox": abs(fp - fn),
        **lesions,
        "volume_true_mm3": vol_true,
        "volume_pred_mm3": vol_pred,
    }


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask surfaces, in mm.

    MONAI's `compute_hausdorff_distance(percentile=95)`; 0.0 when both masks are empty,
    the image diagonal in mm when exactly one is.
    """
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float(np.linalg.norm(np.asarray(p.shape) * np.asarray(spacing_mm, dtype=float)))
    from monai.metrics import compute_hausdorff_distance  # deferred: monai.metrics, only for HD95

    def onehot(m: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([~m, m])[None])

    with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated internal argument
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        d = compute_hausdorff_distance(onehot(p), onehot(t), percentile=95,
                                       spacing=[float(s) for s in spacing_mm])
    return float(d.reshape(-1)[0])


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a 3D mask (26-connectivity): (labels, count)."""
    labels, n = ndimage.label(np.asarray(mask) != 0, structure=_STRUCTURE_26)
    return labels, int(n)


def lesion_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Lesion-level counts: true/predicted components, detected, missed, false positive."""
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    true_labels, n_true = label_lesions(t)
    pred_labels, n_pred = label_lesions(p)
    detected = np.unique(true_labels[p & t]).size  # components of truth touched by pred
    touching = np.unique(pred_labels[p & t]).size  # components of pred touching truth
    return {"lesions_true": n_true, "lesions_pred": n_pred, "lesions_detected": int(detected),
            "lesions_missed": n_true - int(detected), "lesions_false_positive": n_pred - int(touching)}


def lesion_f1(counts: dict[str, int]) -> float:
    """ATLAS lesion-wise F1 from `lesion_counts`; 1.0 when neither side has a lesion."""
    tp, fp, fn = counts["lesions_detected"], counts["lesions_false_positive"], counts["lesions_missed"]
    return 1.0 if tp + fp + fn == 0 else tp / (tp + (fp + fn) / 2)


def largest_lesion_centroid(mask: np.ndarray) -> tuple[int, int, int] | None:
    """Voxel index nearest the centroid of the largest component, None for an empty mask."""
    labels, n = label_lesions(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.reshape(-1))[1:]
    largest = int(np.argmax(sizes)) + 1
    centre = ndimage.center_of_mass(labels == largest)
    x, y, z = (int(round(c)) for c in centre)
    return (x, y, z)


def _ratio(num: int, den: int) -> float:
    return 1.0 if den == 0 else num / den
