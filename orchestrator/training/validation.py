"""Validation on whole volumes: sliding-window inference (MONAI) and Dice."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from orchestrator.planning.memory import SLIDING_WINDOW


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice; 1.0 when both are empty (nothing to find, nothing found)."""
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(p, t).sum() / denom)


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
        logits = sliding_window_inference(x, tuple(roi_size), predictor=model, **SLIDING_WINDOW)
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


def volume_predictor(kind: str, model_kwargs: dict[str, Any], roi_size: Sequence[int],
                     device: torch.device, amp_dtype: torch.dtype | None
                     ) -> Callable[[nn.Module, Any], np.ndarray]:
    """How a stage's model labels a whole volume: 3D sliding window, or LCNN slice by slice."""
    if kind == "lcnn":
        from orchestrator.data.slices import predict_volume_slices

        in_slices = int(model_kwargs.get("in_slices", 5))
        return lambda model, vol: predict_volume_slices(
            model, vol.image, in_slices, tuple(roi_size), device, amp_dtype, background=vol.background)
    return lambda model, vol: predict_volume(model, vol.image, roi_size, device, amp_dtype)


def validate(model: nn.Module, records: Sequence[Any],
             predict: Callable[[nn.Module, Any], np.ndarray]) -> dict[str, float]:
    """Mean Dice over the validation subjects (each volume loaded, predicted, dropped)."""
    from orchestrator.data.sources import load_subject

    was_training = model.training
    model.eval()
    scores = []
    for rec in records:
        vol = load_subject(rec)
        scores.append(dice_score(predict(model, vol), vol.label))
    model.train(was_training)
    return {"val_dice": round(float(np.mean(scores)), 6) if scores else float("nan"),
            "val_subjects": len(scores)}
