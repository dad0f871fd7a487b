"""Validation on whole volumes: sliding-window inference (MONAI), Dice and IoU.

`predict_volume` is the one whole-volume inference of the 3D family, for every device
(the device is an argument): validation during training, `evaluate`, `predict`, the
run's report and the benches. It runs MONAI's `sliding_window_inference` with Gaussian
weighting; `evaluate` and `predict` add nnU-Net's test-time mirroring (`MIRROR_AXES`, the
mean of the logits of the 2^k flipped copies of each window, flipped back) and a window
overlap of `INFERENCE_OVERLAP`; validation during training runs one pass at
`SLIDING_WINDOW`'s overlap, so epochs stay as fast as before.

Memory: the planner's validation estimate (`planning/memory.py`, `eval_peak`) counts
training validation, which this change leaves as it was. Mirroring acts per window, inside
the predictor, so the volume-sized buffers (input, Gaussian-weighted logits, count map,
argmax) stay as they were; it adds one flipped copy of the window batch and one logits
accumulator of (sw_batch_size, classes, *window) in fp32, a few MB at 144^3, and the
overlap changes how many windows run, not how many are live at once. `evaluate` and
`predict` do not run under a plan's budget.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from orchestrator.data.slices import predict_volume_slices
from orchestrator.data.sources import load_subject
from orchestrator.errors import DataError
from orchestrator.planning.memory import SLIDING_WINDOW, SlidingWindow

# nnU-Net's inference defaults, for `evaluate` and `predict` (training validation: none, 0.25)
MIRROR_AXES: tuple[int, ...] = (0, 1, 2)  # the volume's X, Y, Z: 8 passes per window
INFERENCE_OVERLAP = 0.5


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


def mirrored_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    axes: Sequence[int]) -> torch.Tensor:
    """Test-time mirroring as nnU-Net does it: the mean of the logits of every flipped
    copy of `x` (each subset of the spatial `axes`, 2^len(axes) passes), flipped back.

    Args:
        model: maps (N, C, X, Y, Z) to (N, classes, X, Y, Z) logits.
        x: the input batch (a sliding window's batch of windows).
        axes: spatial axes, 0-2 for X, Y, Z; () is one plain pass.
    """
    dims = [2 + int(a) for a in axes]
    total: torch.Tensor | None = None
    passes = 0
    for k in range(len(dims) + 1):
        for flip in itertools.combinations(dims, k):
            out = model(torch.flip(x, flip) if flip else x)
            out = (torch.flip(out, flip) if flip else out).float()
            total = out if total is None else total.add_(out)
            passes += 1
    assert total is not None  # range(len(dims) + 1) is never empty
    return total if passes == 1 else total.div_(passes)


@torch.no_grad()
def predict_volume(model: nn.Module, image: np.ndarray, roi_size: Sequence[int],
                   device: torch.device, amp_dtype: torch.dtype | None, *,
                   mirror_axes: Sequence[int] = (),
                   overlap: float = SLIDING_WINDOW["overlap"]) -> np.ndarray:
    """Label map of a whole (X, Y, Z) volume with the stage's patch as the window.

    Args:
        mirror_axes: test-time mirroring over these axes (`mirrored_logits`); () none, as
            in training validation.
        overlap: the windows' overlap, in [0, 1).
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    settings: SlidingWindow = {**SLIDING_WINDOW, "overlap": float(overlap)}
    axes = tuple(mirror_axes)

    def predictor(w: torch.Tensor) -> torch.Tensor:
        return mirrored_logits(model, w, axes)

    # cache_enabled=False: casts cached under no_grad leaked into the next training step
    # (seen here: an infinite gradient norm on the step after validation, torch 2.13 CPU)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                        cache_enabled=False):
        # the planner counts this call's memory with the same settings (no mirroring)
        # cast: the model returns one tensor in eval mode, so the windows stitch into one
        logits = cast(torch.Tensor, sliding_window_inference(x, tuple(roi_size), predictor=predictor,
                                                             **settings))
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


def volume_predictor(kind: str, model_kwargs: dict[str, Any], roi_size: Sequence[int],
                     device: torch.device, amp_dtype: torch.dtype | None, *,
                     mirror_axes: Sequence[int] = (), overlap: float = SLIDING_WINDOW["overlap"]
                     ) -> Callable[[nn.Module, Any], np.ndarray]:
    """How a stage's model labels a whole volume: 3D sliding window, or LCNN slice by slice.

    `mirror_axes` and `overlap` act on the 3D family (`predict_volume`); the LCNN labels
    each slice once (its symmetry branch already compares each hemisphere with its mirror).
    """
    if kind == "lcnn":
        in_slices = int(model_kwargs["in_slices"])  # model_kwargs holds every option
        h, w = roi_size  # LCNN's input is one slice
        return lambda model, vol: predict_volume_slices(
            model, vol.image, in_slices, (h, w), device, amp_dtype, background=vol.background)
    return lambda model, vol: predict_volume(model, vol.image, roi_size, device, amp_dtype,
                                             mirror_axes=mirror_axes, overlap=overlap)


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
