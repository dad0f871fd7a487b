"""Evaluate a checkpoint on a labelled dataset (`orchestrator evaluate`).

Each subject is predicted whole (as `predict` does: by default mirrored over the three
axes, windows overlapping by 0.5, and a run's post-processing applied), scored with
`metrics.segmentation_metrics`, and written out. Each subject is also predicted in one
plain pass (no mirroring) and timed both ways, so the report says what mirroring costs
per volume and what it gives (Dice and lesion F1 of the plain pass, of the mirrored one,
and after post-processing). The folder (default: the stage's `eval/`) holds:

    report.json             what was evaluated, per-metric mean/median/std/min/max over
                            subjects (the masks as written), the conventions used, every
                            subject's values, and "inference": the settings, seconds per
                            volume with and without mirroring, Dice and lesion F1 by step
    subjects.csv            one row per subject
    overlays/<id>.png       three orthogonal slices through the largest true lesion
    predictions/<id>_pred.nii.gz

Every file is written atomically; report.json last, so its presence means a complete run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import voxel_sizes

from orchestrator.atomic import atomic_path, atomic_write_text
from orchestrator.data.intensity import Normalization, load_normalised
from orchestrator.data.sources import check_orientation, discover_subjects
from orchestrator.errors import DataError
from orchestrator.training.metrics import (
    CONNECTIVITY,
    COUNT_KEYS,
    SUMMARY_METRICS,
    largest_lesion_centroid,
    lesion_counts,
    lesion_f1,
    segmentation_metrics,
)
from orchestrator.training.postprocess import apply_postprocessing
from orchestrator.training.predict import (
    PRED_SUFFIX,
    InferenceModel,
    load_inference_model,
    write_mask,
)
from orchestrator.training.validation import INFERENCE_OVERLAP, MIRROR_AXES, dice_score

logger = logging.getLogger(__name__)

CONVENTIONS = {
    "connectivity": CONNECTIVITY,
    "iou": "Jaccard index |P & T| / |P | T| of the foreground (MONAI compute_iou)",
    "lesion_f1": "ATLAS R2.0 challenge (npnl/atlas2_grand_challenge isles/scoring.py): "
                 "a true lesion overlapped by the prediction is TP, else FN; "
                 "a predicted component touching no true lesion is FP; F1 = TP / (TP + (FP + FN) / 2)",
    "empty_masks": "Dice, lesion F1 and 0/0 ratios (sensitivity, specificity, precision) are 1.0; "
                   "HD95 is 0.0 when both masks are empty, the image diagonal in mm when one is",
    "volume_diff_mm3": "predicted minus true volume (signed)",
    "abs_volume_diff_vox": "ATLAS R2.0 challenge volume difference: |predicted - true| in voxels",
    "std": "population standard deviation (ddof=0)",
}
STAT_NAMES = ("mean", "median", "std", "min", "max")
CSV_COLUMNS = ("subject", "session", *SUMMARY_METRICS, *COUNT_KEYS)


def default_eval_dir(checkpoint: Path) -> Path:
    """runs/<run>/<stage>/checkpoints/X.pt -> runs/<run>/<stage>/eval (else beside the file)."""
    folder = Path(checkpoint).resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "eval"


def evaluate_checkpoint(checkpoint: Path | InferenceModel, data_dir: Path, out_dir: Path | None = None,
                        device: str = "auto",
                        progress: Callable[[int, int], None] | None = None,
                        subjects: Sequence[str] | None = None,
                        mirror_axes: Sequence[int] = MIRROR_AXES,
                        overlap: float = INFERENCE_OVERLAP,
                        postprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predict every labelled subject of `data_dir` with `checkpoint` and score it.

    Args:
        checkpoint: a stage's best.pt/final.pt/last.pt, or a loaded model
            (`load_inference_model`; a run's, with its post-processing: `run_inference`).
        data_dir: an ATLAS R2.0 tree (`discover_subjects`); every image needs its mask.
        out_dir: where the results go; default `default_eval_dir(checkpoint)`.
        device: where the model runs: auto (the GPU where there is one), cuda or cpu.
        progress: called with (subjects done, subjects) after each subject.
        subjects: only these subject ids (a fold's validation subjects); None: all.
        mirror_axes: test-time mirroring over these axes ((): one pass), for a file.
        overlap: the sliding window's overlap, for a file.
        postprocessing: a post-processing choice (`postprocess.py`) to apply; None: the
            loaded model's own (none for a file).

    Returns:
        The report written to out_dir/report.json, plus "out_dir".

    Raises:
        CheckpointError: the checkpoint is missing, unreadable or does not fit its model.
        DataError: the dataset folder holds no labelled subject, or a subject's files are
            unusable (the message names the file).
    """
    runner = (checkpoint if isinstance(checkpoint, InferenceModel)
              else load_inference_model(Path(checkpoint), device, mirror_axes, overlap))
    if postprocessing is not None:
        runner.postprocessing = postprocessing
    checkpoint = runner.path
    out = Path(out_dir) if out_dir is not None else default_eval_dir(checkpoint)
    records = discover_subjects(Path(data_dir))
    if subjects is not None:
        records = [r for r in records if r.subject in set(subjects)]
        if not records:
            raise DataError(f"{data_dir}: none of the subjects {list(subjects)[:3]} is there; "
                            "expected the data the run was trained on")
    for rec in records:  # before anything is written
        check_orientation(rec, runner.checkpoint.get("orientation"), runner.path)
    norm = Normalization.from_dict(runner.checkpoint.get("normalization"))
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    steps: dict[str, list[tuple[float, float]]] = {"single_pass": [], "mirrored": [],
                                                   "postprocessed": []}
    seconds: dict[str, list[float]] = {"single_pass": [], "mirrored": []}
    for k, rec in enumerate(records):
        sid = f"{rec.subject}_{rec.session}" if rec.session else rec.subject
        vol = load_normalised(rec, norm)  # as the checkpoint's stage trained
        raw, plain = _predict_timed(runner, vol, seconds)
        pred = apply_postprocessing(raw, runner.postprocessing)
        done = ((("single_pass", raw),) if plain is None  # the one pass is the prediction
                else (("single_pass", plain), ("mirrored", raw)))
        for name, mask in (*done, ("postprocessed", pred)):
            steps[name].append(_dice_f1(mask, vol.label))
        spacing = tuple(float(s) for s in voxel_sizes(vol.affine))
        values = segmentation_metrics(pred, vol.label, spacing)
        pred_path = out / "predictions" / f"{sid}{PRED_SUFFIX}"
        overlay_path = out / "overlays" / f"{sid}.png"
        write_mask(pred, rec.image, pred_path)
        write_overlay(vol.image, vol.label, pred, overlay_path, f"{sid}  Dice {values['dice']:.3f}")
        rows.append({"subject": rec.subject, "session": rec.session, **_rounded(values),
                     "image": str(rec.image), "prediction": str(pred_path), "overlay": str(overlay_path)})
        logger.info("%s: dice %.4f hd95 %.2f mm lesion F1 %.3f", sid, values["dice"],
                    values["hd95_mm"], values["lesion_f1"])
        if progress is not None:
            progress(k + 1, len(records))
    ckpt = runner.checkpoint
    report = {
        "checkpoint": str(Path(checkpoint).resolve()), "stage": ckpt.get("stage"), "arch": ckpt["arch"],
        "input_size_vox": list(ckpt["input_size_vox"]), "best_dice": ckpt.get("best_dice"),
        "data_dir": str(Path(data_dir).resolve()), "device": str(device), "n_subjects": len(rows),
        "seconds": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conventions": CONVENTIONS, "inference": _inference_summary(runner, seconds, steps),
        "metrics": summarise(rows), "subjects": rows,
    }
    atomic_write_text(out / "subjects.csv", _csv(rows))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    return {**report, "out_dir": str(out)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: mean, median, std (ddof=0), min, max over the (at least one) subjects."""
    summary = {}
    for name in (*SUMMARY_METRICS, *COUNT_KEYS):
        v = np.asarray([r[name] for r in rows], dtype=np.float64)
        stats = (v.mean(), np.median(v), v.std(), v.min(), v.max())
        summary[name] = {k: round(float(s), 6) for k, s in zip(STAT_NAMES, stats)}
    return summary


def write_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path,
                  title: str = "") -> None:
    """PNG of sagittal, coronal and axial slices through the largest true lesion's centroid.

    The volume's centre when there is no true lesion. The image in grey, the truth's
    outline in green, the prediction's in red. Uses matplotlib's Agg canvas directly, so
    no global backend is set.
    """
    # deferred: matplotlib, only for the figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    centre = largest_lesion_centroid(truth) or tuple(s // 2 for s in image.shape)
    lo, hi = np.percentile(image, (1, 99))
    fig = Figure(figsize=(12, 4.6), dpi=80)
    FigureCanvasAgg(fig)
    views = (("sagittal", 0), ("coronal", 1), ("axial", 2))
    for i, (name, axis) in enumerate(views):
        ax = fig.add_subplot(1, 3, i + 1)
        index = [slice(None)] * 3
        index[axis] = centre[axis]
        plane = tuple(index)
        ax.imshow(image[plane].T, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
        for mask, colour in ((truth, "lime"), (pred, "red")):
            sl = np.asarray(mask[plane] != 0, dtype=np.float32).T
            if 0 < sl.sum() < sl.size:  # contour() warns on constant planes
                ax.contour(sl, levels=[0.5], colors=colour, linewidths=1.2, origin="lower")
        ax.set_title(f"{name} {'xyz'[axis]}={centre[axis]}")
        ax.set_axis_off()
    handles = [Line2D([], [], color="lime", label="truth"), Line2D([], [], color="red", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _predict_timed(runner: InferenceModel, vol: Any, seconds: dict[str, list[float]]
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(the model's prediction, the plain pass's where the model mirrors, else None); the
    seconds of each appended to `seconds`."""
    t0 = time.perf_counter()
    raw = runner.predict(vol)
    t1 = time.perf_counter()
    if not runner.mirror_axes:
        seconds["single_pass"].append(t1 - t0)
        return raw, None
    seconds["mirrored"].append(t1 - t0)
    plain = runner.single_pass(vol)
    seconds["single_pass"].append(time.perf_counter() - t1)
    return raw, plain


def _dice_f1(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    return dice_score(pred, truth), lesion_f1(lesion_counts(pred, truth))


def _inference_summary(runner: InferenceModel, seconds: dict[str, list[float]],
                       steps: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """report.json's "inference": the settings, mean seconds per volume with and without
    mirroring, and mean Dice and lesion F1 after each step (plain pass, mirrored,
    post-processed); a step that did not run is null."""
    def mean(v: list[float]) -> float | None:
        return round(float(np.mean(v)), 6) if v else None

    return {
        "mirror_axes": list(runner.mirror_axes), "overlap": runner.overlap,
        "window_weighting": "gaussian (MONAI sliding_window_inference)",
        "postprocessing": runner.postprocessing or {"method": "none"},
        "seconds_per_volume": {name: mean(v) for name, v in seconds.items()},
        **{name: {"dice": mean([d for d, _ in v]), "lesion_f1": mean([f for _, f in v])}
           for name, v in steps.items()},
    }


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
