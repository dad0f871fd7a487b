"""Validation on whole volumes: sliding-window inference (MONAI), Dice and IoU."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from orchestrator.data.slices import predict_volume_slices
from orchestrator.data.sources import load_subject
from orchestrator.errors import DataError
from orchestrator.planning.memory import SLIDING_WINDOW


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice; 1.0 when both are empty (nothing to find, nothing found)."""
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(p, t).sum() / denom)


def iou_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU (Jaccard) through MONAI's `compute_iou`; 1.0 when both are empty."""
    from monai.metrics import compute_iou  # deferred: monai.metrics, only for IoU

    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    if not p.any() and not t.any():
        return 1.0  # as for Dice; MONAI would give NaN with its default ignore_empty

    def onehot(m: np.ndarray) -> torch.Tensor:  # (1, 2, ...): background, foreground
        return torch.from_numpy(np.stack([~m, m])[None])

    iou = compute_iou(onehot(p), onehot(t), include_background=False, ignore_empty=False)
    return float(iou.reshape(-1)[0])


@torch.no_grad()
def predict_volume(model: nn.Module, image: np.ndarray, roi_size: Sequence[int],
                   device: torch.device, amp_dtype: torch.dtype | None) -> np.ndarray:
    """Label map of a whole (X, Y, Z) volume with the stage's patch as the window."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    # cache_enabled=False: casts cached under no_grad leaked into the next training step
    # (seen here: an infinite gradient norm on the step after validation, torch 2.13 CPU)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                        cache_enabled=False):
        # the planner counts this call's memory with the same settings
        # cast: the model returns one tensor in eval mode, so the windows stitch into one
        logits = cast(torch.Tensor, sliding_window_inference(x, tuple(roi_size), predictor=model,
                                                             **SLIDING_WINDOW))
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


def volume_predictor(kind: str, model_kwargs: dict[str, Any], roi_size: Sequence[int],
                     device: torch.device, amp_dtype: torch.dtype | None
                     ) -> Callable[[nn.Module, Any], np.ndarray]:
    """How a stage's model labels a whole volume: 3D sliding window, or LCNN slice by slice."""
    if kind == "lcnn":
        in_slices = int(model_kwargs["in_slices"])  # model_kwargs holds every option
        h, w = roi_size  # LCNN's input is one slice
        return lambda model, vol: predict_volume_slices(
            model, vol.image, in_slices, (h, w), device, amp_dtype, background=vol.background)
    return lambda model, vol: predict_volume(model, vol.image, roi_size, device, amp_dtype)


def validate(model: nn.Module, records: Sequence[Any],
             predict: Callable[[nn.Module, Any], np.ndarray],
             load: Callable[[Any], Any] | None = None) -> dict[str, float]:
    """Mean Dice and IoU over the validation subjects (each volume loaded, predicted, dropped)."""
    load = load or load_subject  # the stage's normalisation (data/intensity.py)
    was_training = model.training
    model.eval()
    scores, ious = [], []
    for rec in records:
        vol = load(rec)
        if vol.label is None:
            raise DataError(f"{rec}: no lesion mask; validation needs one per subject")
        pred = predict(model, vol)
        scores.append(dice_score(pred, vol.label))
        ious.append(iou_score(pred, vol.label))
    model.train(was_training)
    return {"val_dice": _mean(scores), "val_iou": _mean(ious), "val_subjects": len(scores)}


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 6) if values else float("nan")
