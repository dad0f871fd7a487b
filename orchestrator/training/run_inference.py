"""A run's model as `evaluate --run` and `predict --run` use it: the model (the run's
best.pt, or a K-fold run's ensemble) and its post-processing, chosen on the run's
validation subjects and recorded beside best.pt.

The choice (`postprocess.choose_postprocessing`) is made the first time a run's model is
used for inference after training, on the validation subjects the model never trained
on: the split of the stage the run's model comes from (`<stage>/split.json`), or, for a
K-fold run, each fold's model on its own validation subjects, pooled (as nnU-Net decides
on its cross-validation predictions). It is made with the inference it will be applied
after (mirroring and overlap as asked, nnU-Net's by default) and written atomically to
`runs/<run>/postprocessing.json` with the models it was made for: a later best.pt (a
resumed run) makes it stale, and the next use chooses again.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.atomic import atomic_write_text
from orchestrator.config import load_plan
from orchestrator.data.intensity import Normalization, load_normalised
from orchestrator.data.sources import discover_subjects
from orchestrator.errors import ConfigError, DataError
from orchestrator.runs import state as run_state
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.crossval import evaluate_folds, fold_dirs, fold_models, load_fold_ensemble
from orchestrator.training.evaluate import evaluate_checkpoint
from orchestrator.training.postprocess import POSTPROCESS_FILE, choose_postprocessing
from orchestrator.training.predict import InferenceModel, load_inference_model
from orchestrator.training.run_model import run_model_file
from orchestrator.training.validation import INFERENCE_OVERLAP, MIRROR_AXES

logger = logging.getLogger(__name__)


def run_model(run_dir: Path, device: str | torch.device = "auto",
              mirror_axes: Sequence[int] = MIRROR_AXES, overlap: float = INFERENCE_OVERLAP,
              postprocess: bool = True) -> InferenceModel:
    """What `predict --run RUN` predicts with: the folds' ensemble for a K-fold run, else the
    run's best.pt (the best validation checkpoint over its stages), with the run's
    post-processing (`run_postprocessing`) unless `postprocess` is False.

    Raises:
        ConfigError: the run has no model yet; CheckpointError: a fold has none.
    """
    run_dir = Path(run_dir)
    if run_state.fold_run_dirs(run_dir):
        model = load_fold_ensemble(run_dir, device, mirror_axes=mirror_axes, overlap=overlap)
    else:
        model = load_inference_model(run_model_file(run_dir), device, mirror_axes, overlap)
    if postprocess:
        model.postprocessing = run_postprocessing(run_dir, device, mirror_axes, overlap)["choice"]
    return model


def evaluate_run(run_dir: Path, data_dir: Path | None = None, out_dir: Path | None = None,
                 device: str = "auto", progress: Callable[[int, int], None] | None = None,
                 mirror_axes: Sequence[int] = MIRROR_AXES,
                 overlap: float = INFERENCE_OVERLAP) -> dict[str, Any]:
    """`evaluate --run RUN`: a K-fold run's `evaluate_folds`; else its best.pt on `data_dir`
    (default: the run's data), as `evaluate_checkpoint`; the run's post-processing applied.

    Raises:
        ConfigError: no data directory; CheckpointError: no model yet.
    """
    run_dir = Path(run_dir)
    choice = run_postprocessing(run_dir, device, mirror_axes, overlap)["choice"]
    if run_state.fold_run_dirs(run_dir):
        return evaluate_folds(run_dir, data_dir, out_dir, device, progress=progress,
                              mirror_axes=mirror_axes, overlap=overlap, postprocessing=choice)
    data = data_dir or load_plan(run_dir / "plan.yaml").data_dir
    if data is None:
        raise ConfigError(f"{run_dir / 'plan.yaml'}: no data directory; give --data DIR")
    model = run_model(run_dir, device, mirror_axes, overlap, postprocess=False)
    model.postprocessing = choice
    return evaluate_checkpoint(model, Path(data), out_dir or run_dir / "eval", device=device,
                               progress=progress)


def run_postprocessing(run_dir: Path, device: str | torch.device = "auto",
                       mirror_axes: Sequence[int] = MIRROR_AXES,
                       overlap: float = INFERENCE_OVERLAP) -> dict[str, Any]:
    """The run's recorded post-processing where it was chosen for the run's current
    models, else chosen now on the validation subjects and recorded.

    Where the validation data cannot be read here (the run's data folder is elsewhere),
    nothing is applied or recorded, with a warning: {"choice": {"method": "none"}, ...}.

    Returns:
        postprocessing.json's document: `choose_postprocessing`'s plus "models",
        "inference", "validation_subjects" and "created".

    Raises:
        ConfigError: no model yet; CheckpointError: a model file is unreadable.
    """
    run_dir = Path(run_dir)
    path = run_dir / POSTPROCESS_FILE
    members = _members(run_dir)
    models = [_identity(run_dir, p) for p, _ in members]
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            logger.warning("%s: unreadable (%s); choosing again", path, err)
        else:
            if doc.get("models") == models:
                return dict(doc)
            logger.info("%s: made for other models (a later best.pt); choosing again", path)
    try:
        sets = [(p, _records(run_dir, p, stage_val)) for p, stage_val in members]
    except (DataError, ConfigError, OSError) as err:
        logger.warning("%s: post-processing not chosen, none applied: %s", run_dir.name, err)
        return {"choice": {"method": "none"}, "models": models, "not_chosen": str(err)}
    preds, truths, subjects = [], [], []
    t0 = time.perf_counter()
    for ckpt, records in sets:
        model = load_inference_model(ckpt, device, mirror_axes, overlap)
        norm = Normalization.from_dict(model.checkpoint.get("normalization"))
        for rec in records:
            vol = load_normalised(rec, norm)
            preds.append(model.predict(vol))
            truths.append(np.asarray(vol.label))
            subjects.append(f"{rec.subject}/{rec.session}")
    doc = {**choose_postprocessing(preds, truths), "models": models,
           "inference": {"mirror_axes": list(mirror_axes), "overlap": float(overlap)},
           "validation_subjects": subjects, "seconds": round(time.perf_counter() - t0, 2),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    logger.info("%s: post-processing %s (validation Dice %.4f -> %.4f, lesion F1 %.3f -> %.3f)",
                run_dir.name, doc["choice"], doc["dice_before"], doc["dice_after"],
                doc["lesion_f1_before"], doc["lesion_f1_after"])
    return doc


def _members(run_dir: Path) -> list[tuple[Path, Path | None]]:
    """(model file, None) per fold of a K-fold run (each fold's plan names its validation
    subjects); (best.pt, its stage's split.json) for a plain run."""
    if run_state.fold_run_dirs(run_dir):
        return [(p, None) for p in fold_models(run_dir)]
    best = run_model_file(run_dir)
    stage = load_checkpoint(best).get("stage")
    return [(best, run_dir / str(stage) / "split.json")]


def _records(run_dir: Path, model_file: Path, split: Path | None) -> list[Any]:
    """The validation subjects of one model (see `_members`)."""
    if split is None:  # a fold: its sub-run's plan
        fold = next(d for d in fold_dirs(run_dir) if d in model_file.parents)
        plan = load_plan(fold / "plan.yaml")
        wanted = [str(s) for s in plan.val_subjects or []]
        key: Callable[[Any], str] = lambda r: str(r.subject)  # noqa: E731
    else:
        plan = load_plan(run_dir / "plan.yaml")
        if not split.exists():
            raise DataError(f"{split}: not found; expected the split of the run model's stage")
        wanted = list(json.loads(split.read_text()).get("val", []))
        key = lambda r: f"{r.subject}/{r.session}"  # noqa: E731
    if plan.data_dir is None:
        raise ConfigError(f"{run_dir / 'plan.yaml'}: no data directory")
    found = [r for r in discover_subjects(Path(plan.data_dir)) if key(r) in set(wanted)]
    if not found:
        raise DataError(f"{plan.data_dir}: none of the validation subjects {wanted[:3]} is there")
    return found


def _identity(run_dir: Path, model_file: Path) -> dict[str, Any]:
    """What the choice was made for: the file (relative to the run) and its header."""
    ckpt = load_checkpoint(model_file)
    header = ckpt.get("run_model") or {"stage": ckpt.get("stage"), "epoch": ckpt.get("epoch"),
                                       "dice": ckpt.get("best_dice")}
    return {"file": str(Path(model_file).relative_to(run_dir)), **header}
