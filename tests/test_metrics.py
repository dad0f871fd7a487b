"""Segmentation metrics on tiny hand-made masks, empty masks included."""
from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.training import metrics, validation
from orchestrator.training.metrics import hd95, segmentation_metrics


def _mask(shape: tuple[int, int, int], *voxels: tuple[int, int, int]) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for v in voxels:
        m[v] = 1
    return m


def test_voxel_metrics_by_hand() -> None:
    truth = _mask((2, 2, 2), (0, 0, 0), (0, 0, 1), (0, 1, 0))
    pred = _mask((2, 2, 2), (0, 0, 1), (0, 1, 0), (0, 1, 1))  # tp 2, fp 1, fn 1, tn 4
    m = segmentation_metrics(pred, truth)
    assert m["dice"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["iou"] == pytest.approx(2 / 4)  # |P & T| 2, |P | T| 4
    assert m["abs_volume_diff_vox"] == 0  # 3 voxels each
    assert metrics.dice_score is validation.dice_score  # one Dice in the project


def test_lesion_f1_count_and_volume_two_blobs() -> None:
    truth = np.zeros((12, 6, 6), np.uint8)
    truth[1:3, 1:3, 1:3] = 1  # lesion A (8 voxels): found
    truth[6:8, 1:3, 1:3] = 1  # lesion B (8 voxels): missed
    pred = np.zeros_like(truth)
    pred[2:4, 1:3, 1:3] = 1  # overlaps A (8 voxels)
    pred[10, 4, 4] = 1  # false positive
    m = segmentation_metrics(pred, truth, spacing_mm=(1.0, 1.0, 2.0))
    assert (m["lesions_true"], m["lesions_pred"]) == (2, 2)
    assert (m["lesions_detected"], m["lesions_missed"], m["lesions_false_positive"]) == (1, 1, 1)
    assert m["lesion_f1"] == pytest.approx(1 / (1 + (1 + 1) / 2))
    assert m["lesion_count_diff"] == 0
    assert (m["volume_true_mm3"], m["volume_pred_mm3"]) == (32.0, 18.0)  # 2 mm^3 voxels
    assert (m["volume_diff_mm3"], m["abs_volume_diff_mm3"]) == (-14.0, 14.0)
    assert m["abs_volume_diff_vox"] == 7  # 16 true voxels, 9 predicted: ATLAS counts voxels
    assert m["iou"] == pytest.approx(4 / 21)  # A & pred 4 voxels; union 16 + 9 - 4
    assert m["dice"] == pytest.approx(2 * 4 / 25)
    only_a = np.zeros_like(truth)
    only_a[1:3, 1:3, 1:3] = 1
    m = segmentation_metrics(only_a, truth)
    assert m["lesion_f1"] == pytest.approx(1 / (1 + 0.5)) and m["lesion_count_diff"] == 1


def test_components_use_26_connectivity() -> None:
    diagonal = _mask((3, 3, 3), (0, 0, 0), (1, 1, 1), (2, 2, 2))
    assert metrics.label_lesions(diagonal)[1] == 1
    assert metrics.CONNECTIVITY == 26


def test_hd95_known_geometry() -> None:
    a, b = _mask((8, 4, 4), (1, 1, 1)), _mask((8, 4, 4), (4, 1, 1))
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing_mm=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert segmentation_metrics(a, b)["hd95_mm"] == pytest.approx(3.0)


def test_both_empty() -> None:
    empty = np.zeros((4, 5, 6), np.uint8)
    m = segmentation_metrics(empty, empty)
    for key in ("dice", "iou", "sensitivity", "specificity", "precision", "lesion_f1"):
        assert m[key] == 1.0, key
    assert m["hd95_mm"] == 0.0 and m["lesion_count_diff"] == 0 and m["volume_diff_mm3"] == 0.0


def test_one_side_empty_is_finite() -> None:
    shape = (4, 5, 6)
    empty, lesion = np.zeros(shape, np.uint8), _mask(shape, (1, 1, 1), (1, 1, 2))
    diagonal = math.sqrt(4**2 + (5 * 2) ** 2 + 6**2)  # spacing (1, 2, 1)
    missed = segmentation_metrics(empty, lesion, spacing_mm=(1, 2, 1))
    assert (missed["dice"], missed["sensitivity"], missed["precision"], missed["lesion_f1"]) == (0, 0, 1, 0)
    assert missed["hd95_mm"] == pytest.approx(diagonal)
    assert missed["lesion_count_diff"] == 1 and missed["volume_diff_mm3"] == -4.0
    assert missed["iou"] == 0.0 and missed["abs_volume_diff_vox"] == 2
    invented = segmentation_metrics(lesion, empty)
    assert (invented["dice"], invented["sensitivity"]) == (0, 1)
    assert (invented["precision"], invented["lesion_f1"]) == (0, 0)
    assert invented["specificity"] == pytest.approx(118 / 120)
    assert invented["hd95_mm"] == pytest.approx(math.sqrt(16 + 25 + 36))
    assert not any(isinstance(v, float) and math.isnan(v) for v in {**missed, **invented}.values())


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"prediction \(2, 2, 2\) and truth \(2, 2, 3\)"):
        segmentation_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="spacing_mm"):
        segmentation_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), spacing_mm=(1, 0, 1))


def test_iou_is_dice_over_two_minus_dice() -> None:
    """IoU = D / (2 - D) for any pair of masks: the two reports agree."""
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 7, 8)) > 0.6, rng.random((6, 7, 8)) > 0.5
    d = validation.dice_score(a, b)
    assert validation.iou_score(a, b) == pytest.approx(d / (2 - d))
    assert validation.iou_score(a, a) == 1.0
