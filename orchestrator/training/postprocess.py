"""Post-processing of predicted lesion masks, chosen on validation as nnU-Net does.

nnU-Net decides per dataset, on its cross-validation predictions, whether removing
connected components (keeping the largest) raises the foreground Dice, and applies it
only then. Stroke lesions are often several per brain, so besides keeping the largest
component the candidates remove components below a size (`MIN_SIZES_VOX`): small
false-positive specks cost lesion F1 and Dice, a small true lesion removed costs both.
Each candidate is scored on the validation subjects' predictions; the one with the
highest mean Dice is chosen where it beats the masks as predicted (strictly: a tie keeps
the prediction), else none. Components are 3D, 26-connected (`metrics.label_lesions`,
scipy), as the ATLAS lesion counts are.

The record (`choose_postprocessing`'s document) is written beside the run's model
(`runs/<run>/postprocessing.json`, `run_inference.py`) and applied by
`evaluate --run` and `predict --run` (`apply_postprocessing`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from orchestrator.errors import ConfigError
from orchestrator.training.metrics import label_lesions, lesion_counts, lesion_f1
from orchestrator.training.validation import dice_score

POSTPROCESS_FILE = "postprocessing.json"
METHODS = ("none", "keep_largest", "remove_small")
# component sizes below which a component is removed (voxels; ATLAS is 1 mm isotropic)
MIN_SIZES_VOX = (5, 10, 20, 50, 100, 200, 500)
NONE: dict[str, Any] = {"method": "none"}


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of `mask` alone (an empty mask stays empty)."""
    labels, n = label_lesions(mask)
    if n <= 1:
        return (labels > 0).astype(np.uint8)
    sizes = np.bincount(labels.reshape(-1))[1:]
    return (labels == int(np.argmax(sizes)) + 1).astype(np.uint8)


def remove_small_components(mask: np.ndarray, min_size_vox: int) -> np.ndarray:
    """`mask` without its connected components of fewer than `min_size_vox` voxels."""
    labels, n = label_lesions(mask)
    if n == 0:
        return (labels > 0).astype(np.uint8)
    sizes = np.bincount(labels.reshape(-1))
    keep = sizes >= int(min_size_vox)
    keep[0] = False  # background
    return keep[labels].astype(np.uint8)


def apply_postprocessing(mask: np.ndarray, choice: dict[str, Any] | None) -> np.ndarray:
    """`mask` post-processed as `choice` says ({"method": ..., "min_size_vox": ...});
    None or "none" returns it unchanged.

    Raises:
        ConfigError: an unknown method, or remove_small without a positive min_size_vox.
    """
    method = (choice or NONE).get("method", "none")
    if method == "none":
        return mask
    if method == "keep_largest":
        return keep_largest_component(mask)
    if method == "remove_small":
        size = (choice or {}).get("min_size_vox")
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"post-processing min_size_vox {size!r}; expected a positive integer")
        return remove_small_components(mask, size)
    raise ConfigError(f"post-processing method {method!r}; expected one of {', '.join(METHODS)}")


def candidates(sizes: Sequence[int] = MIN_SIZES_VOX) -> list[dict[str, Any]]:
    """What `choose_postprocessing` tries: none, keep the largest, remove below each size."""
    return [NONE, {"method": "keep_largest"},
            *({"method": "remove_small", "min_size_vox": int(s)} for s in sizes)]


def score(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray],
          choice: dict[str, Any] | None) -> dict[str, float]:
    """Mean Dice and mean lesion F1 of the post-processed `preds` against `truths`."""
    dice, f1 = [], []
    for p, t in zip(preds, truths, strict=True):
        q = apply_postprocessing(p, choice)
        dice.append(dice_score(q, t))
        f1.append(lesion_f1(lesion_counts(q, t)))
    return {"dice": round(float(np.mean(dice)), 6), "lesion_f1": round(float(np.mean(f1)), 6)}


def choose_postprocessing(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                          sizes: Sequence[int] = MIN_SIZES_VOX) -> dict[str, Any]:
    """The candidate that raises the mean validation Dice most, or none where none does.

    Args:
        preds: the validation subjects' predicted masks (as the model predicts them).
        truths: their true masks, in the same order.
        sizes: the remove-small candidates' sizes in voxels.

    Returns:
        {"choice": {"method", ["min_size_vox"]}, "dice_before", "dice_after",
        "lesion_f1_before", "lesion_f1_after", "subjects": n,
        "candidates": [{"method", ["min_size_vox"], "dice", "lesion_f1"}]}.

    Raises:
        ConfigError: no validation subject to choose on.
    """
    if not preds:
        raise ConfigError("post-processing: no validation subject; expected at least one "
                          "labelled validation subject to choose on")
    scored = [{**c, **score(preds, truths, c)} for c in candidates(sizes)]
    before = scored[0]
    best = max(scored, key=lambda c: c["dice"])  # the first of equals: none, then the simplest
    chosen = best if best["dice"] > before["dice"] else before
    choice = {k: v for k, v in chosen.items() if k in ("method", "min_size_vox")}
    return {"choice": choice, "dice_before": before["dice"], "dice_after": chosen["dice"],
            "lesion_f1_before": before["lesion_f1"], "lesion_f1_after": chosen["lesion_f1"],
            "subjects": len(preds), "candidates": scored}
