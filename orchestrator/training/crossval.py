"""A K-fold run's models: evaluate each fold on its own validation subjects, and predict
with the ensemble of the folds (`evaluate --run RUN`, `predict --run RUN`, through
`run_inference.py`).

Each fold's model is its sub-run's `best.pt` (runs/<run>/folds/fold<i>/best.pt) when every
fold has one, else, of the chain's last 3D stage that every fold has trained, its
`checkpoints/best.pt` (else `final.pt`): one stage for all folds. The
ensemble averages the folds' softmax probabilities, as nnU-Net does (mean of softmax,
then argmax): per sliding window for the 3D family, per slice stack for the LCNN.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.atomic import atomic_write_text
from orchestrator.config import load_plan
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.runs import state as run_state
from orchestrator.runs.cv_summary import metric_summary
from orchestrator.training.checkpoints import load_checkpoint, model_from_checkpoint
from orchestrator.training.devices import resolve_device
from orchestrator.training.evaluate import evaluate_checkpoint
from orchestrator.training.metrics import SUMMARY_METRICS
from orchestrator.training.predict import InferenceModel, inference_model
from orchestrator.training.validation import INFERENCE_OVERLAP, MIRROR_AXES

logger = logging.getLogger(__name__)


def fold_dirs(run_dir: Path) -> list[Path]:
    """The fold sub-runs of a K-fold run, in fold order.

    Raises:
        ConfigError: the run has no folds (it was not submitted with --folds).
    """
    dirs = run_state.fold_run_dirs(Path(run_dir))
    if not dirs:
        raise ConfigError(f"{run_dir}: not a cross-validation run (no folds/fold<i>/); expected a "
                          "run submitted with --folds K")
    return dirs


def fold_checkpoint(fold_dir: Path, stage: str) -> Path | None:
    """Stage `stage`'s best.pt (else final.pt) in one fold; None when it has neither.

    Raises:
        ConfigError: the fold's plan has no such stage.
    """
    load_plan(fold_dir / "plan.yaml").stage(stage)  # names the stages there are
    for file in ("best.pt", "final.pt"):
        path = fold_dir / stage / "checkpoints" / file
        if path.exists():
            return path
    return None


def fold_models(run_dir: Path, stage: str | None = None) -> list[Path]:
    """One checkpoint per fold, of one stage for all (see the module docstring): `stage`, or
    every fold's best.pt where each has one, else the chain's last 3D stage that every fold
    has trained.

    Raises:
        ConfigError: not a K-fold run, or no such stage.
        CheckpointError: no stage has a model in every fold.
    """
    dirs = fold_dirs(run_dir)
    if stage is None and all((d / "best.pt").exists() for d in dirs):
        return [d / "best.pt" for d in dirs]
    plan = load_plan(dirs[0] / "plan.yaml")
    names = [stage] if stage else [s.name for s in plan.stages if s.kind == "seg3d"][::-1]
    for name in names:
        paths = [p for d in dirs if (p := fold_checkpoint(d, name)) is not None]
        if len(paths) == len(dirs):
            return paths
    missing = [d.name for d in dirs if fold_checkpoint(d, names[-1]) is None]
    raise CheckpointError(f"{Path(run_dir) / 'folds'}: {', '.join(missing)} has no best.pt or final.pt "
                          f"of {names[-1] if stage else 'any 3D stage'}; expected every fold to have "
                          "trained it (orchestrator status shows them; resume RUN reruns a failed fold)")


class FoldEnsemble(nn.Module):
    """The folds' models as one: the mean of their softmax probabilities."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(m(x).float(), dim=1) for m in self.members]
        return torch.stack(probs).mean(0)


def load_fold_ensemble(run_dir: Path, device: str | torch.device = "auto",
                       stage: str | None = None, mirror_axes: Sequence[int] = MIRROR_AXES,
                       overlap: float = INFERENCE_OVERLAP) -> InferenceModel:
    """An `InferenceModel` predicting with every fold's model (mean of softmax; mirrored,
    the mean over the flips of that mean).

    Raises:
        ConfigError: not a K-fold run.
        CheckpointError: a fold has no model, or the folds' models differ in kind or input.
    """
    paths = fold_models(run_dir, stage)
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    for p, c in zip(paths[1:], ckpts[1:]):
        if (c["arch"], list(c["input_size_vox"])) != (first["arch"], list(first["input_size_vox"])):
            raise CheckpointError(f"{p}: a {c['arch']} at {c['input_size_vox']}; expected the folds' "
                                  f"models to match {paths[0]} ({first['arch']} at "
                                  f"{first['input_size_vox']})")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = FoldEnsemble([model_from_checkpoint(c, p) for c, p in zip(ckpts, paths)]).to(dev).eval()
    info = {**first, "folds": [str(p) for p in paths]}
    return inference_model(Path(run_dir), info, model, dev, mirror_axes, overlap)


def evaluate_folds(run_dir: Path, data_dir: Path | None = None, out_dir: Path | None = None,
                   device: str = "auto", stage: str | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   mirror_axes: Sequence[int] = MIRROR_AXES, overlap: float = INFERENCE_OVERLAP,
                   postprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each fold's model on its own validation subjects; the folds' mean ± std per metric.
    Inference and post-processing as `evaluate_checkpoint`'s.

    Writes every fold's report under `out_dir/fold<i>/` (default runs/<run>/eval/) and
    `out_dir/cv_report.json`: {"run", "folds": [{fold, checkpoint, subjects, metrics}],
    "summary": {metric: {mean, std, n}}}.

    Raises:
        ConfigError: not a K-fold run, or no data directory.
        CheckpointError, DataError: as `evaluate_checkpoint`.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "eval"
    dirs = fold_dirs(run_dir)
    models = fold_models(run_dir, stage)
    reports = []
    for k, (d, ckpt) in enumerate(zip(dirs, models)):
        plan = load_plan(d / "plan.yaml")
        data = data_dir or plan.data_dir
        if data is None:
            raise ConfigError(f"{d / 'plan.yaml'}: no data directory; give --data DIR")
        rep = evaluate_checkpoint(ckpt, Path(data), out / d.name, device=device,
                                  subjects=plan.val_subjects, mirror_axes=mirror_axes,
                                  overlap=overlap, postprocessing=postprocessing)
        reports.append({"fold": plan.fold, "checkpoint": rep["checkpoint"],
                        "subjects": [r["subject"] for r in rep["subjects"]], "metrics": rep["metrics"]})
        logger.info("%s: %d subjects, Dice %.4f", d.name, rep["n_subjects"], rep["metrics"]["dice"]["mean"])
        if progress is not None:
            progress(k + 1, len(dirs))
    doc = {"run": run_dir.name, "folds": reports, "summary": metric_summary(reports, SUMMARY_METRICS),
           "std": "population standard deviation (ddof=0) over the folds of each fold's mean"}
    atomic_write_text(out / "cv_report.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return {**doc, "out_dir": str(out)}
