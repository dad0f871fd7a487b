"""Lesion masks for new T1w scans from a trained checkpoint (`orchestrator predict`).

The image is validated and normalised exactly as in training (`load_subject`, or the
dataset mean/std the checkpoint's stage used: `data/intensity.py`), labelled
whole (3D: sliding window with the checkpoint's patch; LCNN: slice by slice), and the
uint8 mask is written with the input's affine and header, so it overlays the input in
any viewer. Inference is nnU-Net's by default: test-time mirroring over the three axes
and a window overlap of 0.5 (`validation.MIRROR_AXES`, `INFERENCE_OVERLAP`); a run's
post-processing (`postprocess.py`, chosen on its validation subjects) is applied to
the mask where the model carries one (`predict --run`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from orchestrator.atomic import atomic_path
from orchestrator.data.intensity import Normalization, load_normalised
from orchestrator.data.nifti import load_image
from orchestrator.data.records import SubjectRecord, Volume
from orchestrator.data.sources import check_orientation
from orchestrator.errors import ConfigError, DataError
from orchestrator.training.checkpoints import load_checkpoint, model_from_checkpoint
from orchestrator.training.devices import resolve_device
from orchestrator.training.postprocess import apply_postprocessing
from orchestrator.training.validation import INFERENCE_OVERLAP, MIRROR_AXES, volume_predictor

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PRED_SUFFIX = "_pred.nii.gz"


@dataclass
class InferenceModel:
    """A checkpoint's model, ready to label whole volumes.

    Attributes:
        path: the checkpoint file.
        checkpoint: its payload (without re-reading it: "arch", "stage", "input_size_vox", ...).
        model: the network, in eval mode on the device.
        predict: volume -> uint8 (X, Y, Z) label map, with the model's mirroring and overlap.
        single_pass: the same without mirroring (what `evaluate` times against).
        mirror_axes: the axes `predict` mirrors over (() for none, and for the LCNN).
        overlap: the sliding window's overlap.
        postprocessing: the run's recorded choice (`postprocess.py`), None for none.
    """

    path: Path
    checkpoint: dict[str, Any]
    model: nn.Module
    predict: Callable[[Volume], np.ndarray]
    single_pass: Callable[[Volume], np.ndarray]
    mirror_axes: tuple[int, ...] = ()
    overlap: float = INFERENCE_OVERLAP
    postprocessing: dict[str, Any] | None = field(default=None)

    def __call__(self, vol: Volume) -> np.ndarray:
        """The mask `predict` writes: the prediction, post-processed where a choice is set."""
        return apply_postprocessing(self.predict(vol), self.postprocessing)


def inference_model(path: Path, ckpt: dict[str, Any], model: nn.Module, device: torch.device,
                    mirror_axes: Sequence[int] = MIRROR_AXES,
                    overlap: float = INFERENCE_OVERLAP) -> InferenceModel:
    """`model` (built from `ckpt`, in eval mode on `device`) as an `InferenceModel`.

    Raises:
        ConfigError: `overlap` outside [0, 1) or an axis outside 0-2.
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"--overlap {overlap}; expected a fraction in [0, 1) (nnU-Net: 0.5)")
    if any(a not in (0, 1, 2) for a in mirror_axes):
        raise ConfigError(f"mirror axes {list(mirror_axes)}; expected axes among 0, 1, 2 (X, Y, Z)")
    kind = "lcnn" if ckpt["arch"] == "lcnn" else "seg3d"
    axes = tuple(int(a) for a in mirror_axes) if kind == "seg3d" else ()
    if kind == "lcnn" and mirror_axes:
        logger.info("%s: an LCNN labels each slice once; mirroring applies to the 3D family", path)
    kwargs, roi = ckpt.get("model_kwargs", {}), tuple(ckpt["input_size_vox"])
    mirrored = volume_predictor(kind, kwargs, roi, device, None, mirror_axes=axes, overlap=overlap)
    plain = volume_predictor(kind, kwargs, roi, device, None, overlap=overlap)
    return InferenceModel(Path(path), ckpt, model, lambda vol: mirrored(model, vol),
                          lambda vol: plain(model, vol), axes, float(overlap))


def load_inference_model(checkpoint: Path, device: str | torch.device = "auto",
                         mirror_axes: Sequence[int] = MIRROR_AXES,
                         overlap: float = INFERENCE_OVERLAP) -> InferenceModel:
    """Load `checkpoint` and wrap its model for whole-volume prediction (fp32).

    Args:
        mirror_axes: test-time mirroring over these axes (default all three; () none).
        overlap: the sliding window's overlap (default nnU-Net's 0.5).

    Raises:
        CheckpointError: missing/unreadable checkpoint, or weights that do not fit the model.
        ConfigError: `device` is cuda and there is no GPU; a bad overlap or axis.
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = model_from_checkpoint(ckpt, path).to(dev).eval()
    return inference_model(path, ckpt, model, dev, mirror_axes, overlap)


def write_mask(mask: np.ndarray, reference: Path, path: Path) -> None:
    """Write `mask` as uint8 NIfTI with `reference`'s affine and header, atomically."""
    ref = load_image(reference)
    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), ref.affine, ref.header)
    img.set_data_dtype(np.uint8)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"  # nibabel picks gzip by the name
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)


def image_stem(path: Path) -> str:
    """File name without its .nii/.nii.gz suffix."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def list_inputs(input: Path) -> list[Path]:
    """The NIfTI files to label: `input` itself, or the images directly in the folder.

    Files ending in `_pred.nii.gz` (earlier outputs) are left out of a folder's listing.

    Raises:
        DataError: `input` does not exist, is a file that is not .nii/.nii.gz, or is a
            folder without such files.
    """
    if input.is_file():
        if not input.name.endswith(NIFTI_SUFFIXES):
            raise DataError(f"{input}: not a NIfTI file; expected a .nii or .nii.gz T1w image")
        return [input]
    if input.is_dir():
        files = sorted(p for p in input.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.endswith(NIFTI_SUFFIXES) and not p.name.endswith(PRED_SUFFIX))
        if not files:
            raise DataError(f"{input}: no .nii/.nii.gz images in this folder; expected T1w images")
        return files
    raise DataError(f"{input}: input not found; expected a .nii/.nii.gz T1w image or a folder of them")


def output_path(image: Path, input: Path, out: Path | None) -> Path:
    """Where the mask of `image` goes (see `predict_paths`)."""
    name = image_stem(image) + PRED_SUFFIX
    if out is None:
        return image.parent / name
    if input.is_file():
        return out
    return out / name


def predict_paths(checkpoint: Path | InferenceModel, input: Path, out: Path | None = None,
                  device: str | torch.device = "auto", mirror_axes: Sequence[int] = MIRROR_AXES,
                  overlap: float = INFERENCE_OVERLAP) -> list[Path]:
    """Label one T1w image, or every image in a folder, with a trained checkpoint.

    Args:
        checkpoint: a `best.pt`/`final.pt`/`last.pt` of a stage, or a loaded model
            (`load_inference_model`, `crossval.load_fold_ensemble`).
        input: a .nii/.nii.gz image, or a folder of them (not searched recursively).
        out: for a file input, the output file; for a folder, the output folder. Default:
            `<input stem>_pred.nii.gz` beside each input image.
        device: where the model runs: auto (the GPU where there is one), cuda or cpu.
        mirror_axes, overlap: inference settings (`load_inference_model`) for a checkpoint
            path; a loaded model keeps its own.

    Returns:
        The written mask files, in input order (post-processed where the model carries
        a run's choice).

    Raises:
        DataError: the input is missing, not NIfTI, or an image is unreadable, invalid or
            in another orientation than the checkpoint's training data (the message names
            the file); nothing is written then.
        CheckpointError: the checkpoint is missing, unreadable or does not fit its model.
    """
    input, out = Path(input), None if out is None else Path(out)
    images = [SubjectRecord(image_stem(p), "", p, None) for p in list_inputs(input)]
    runner = (checkpoint if isinstance(checkpoint, InferenceModel)  # e.g. a K-fold ensemble
              else load_inference_model(checkpoint, device, mirror_axes, overlap))
    for rec in images:  # before anything is written
        check_orientation(rec, runner.checkpoint.get("orientation"), runner.path)
    written = []
    for rec in images:
        image = rec.image
        vol = load_normalised(rec, Normalization.from_dict(runner.checkpoint.get("normalization")))
        target = output_path(image, input, out)
        write_mask(runner(vol), image, target)
        logger.info("%s -> %s", image, target)
        written.append(target)
    return written
