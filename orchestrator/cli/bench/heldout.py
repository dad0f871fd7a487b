"""`bench curriculum`'s inference figures: a trained model on the held-out subjects in one
plain pass, with nnU-Net's test-time mirroring, and with mirroring and the post-processing
chosen on validation subjects (neither trained nor tested on), as `evaluate --run` does."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from orchestrator.data.sources import load_subject
from orchestrator.training.metrics import lesion_counts, lesion_f1
from orchestrator.training.postprocess import apply_postprocessing, choose_postprocessing
from orchestrator.training.validation import (
    INFERENCE_OVERLAP,
    MIRROR_AXES,
    dice_score,
    predict_volume,
)


def inference_figures(model: torch.nn.Module, patch: Sequence[int], test: Sequence[Any],
                      val: Sequence[Any]) -> dict[str, Any]:
    """Held-out Dice and lesion F1 (means over `test`) of `model`: "single_pass" (overlap
    0.5, no mirroring), "mirrored" (8 passes), "mirrored_postprocessed" (the choice made on
    `val`'s mirrored predictions); the seconds per volume of each pass; the choice."""
    dev = torch.device("cpu")
    model.eval()

    def run(vols: list[Any], axes: tuple[int, ...]) -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        preds = [predict_volume(model, v.image, patch, dev, None, mirror_axes=axes,
                                overlap=INFERENCE_OVERLAP) for v in vols]
        return preds, (time.perf_counter() - t0) / max(1, len(vols))

    tests = [load_subject(r) for r in test]
    truths = [np.asarray(v.label) for v in tests]
    plain, plain_s = run(tests, ())
    mirrored, mirrored_s = run(tests, MIRROR_AXES)
    vals = [load_subject(r) for r in val]
    val_preds, _ = run(vals, MIRROR_AXES)
    chosen = choose_postprocessing(val_preds, [np.asarray(v.label) for v in vals])
    post = [apply_postprocessing(p, chosen["choice"]) for p in mirrored]
    return {"overlap": INFERENCE_OVERLAP, "mirror_axes": list(MIRROR_AXES),
            "single_pass": _scores(plain, truths), "mirrored": _scores(mirrored, truths),
            "mirrored_postprocessed": _scores(post, truths),
            "seconds_per_volume": {"single_pass": round(plain_s, 2), "mirrored": round(mirrored_s, 2)},
            "postprocessing": {k: chosen[k] for k in ("choice", "dice_before", "dice_after",
                                                      "lesion_f1_before", "lesion_f1_after")},
            "validation_subjects": len(vals)}


def _scores(preds: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    dice = [dice_score(p, t) for p, t in zip(preds, truths)]
    f1 = [lesion_f1(lesion_counts(p, t)) for p, t in zip(preds, truths)]
    return {"dice": round(float(np.mean(dice)), 4), "lesion_f1": round(float(np.mean(f1)), 4)}
