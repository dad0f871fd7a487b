"""What the dataset decides in a plan (`plan --data DIR`): the batch-size cap and, where the
stage YAML leaves them out, iterations per epoch and epochs.

- Batch cap (nnU-Net's `max_dataset_covered`): one batch holds at most 5 % of the
  training subjects' voxels, so that a small dataset is not learnt from a few huge
  batches; never below the stage's `planner.min_batch_size` or 1.
- Iterations per epoch: one epoch draws about as many voxels as the training subjects
  hold (ceil(training voxels / (patch voxels x batch))), 20..1000.
- Epochs: the stage's total number of steps stays that of the defaults (100 x 250 =
  25,000, nnU-Net trains 1000 x 250), spread over epochs of that length, 1..1000.
A value the stage YAML (or the curriculum's overrides) sets explicitly is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import StageSpec
from orchestrator.data.folds import split_subjects
from orchestrator.errors import DataError

MAX_DATASET_COVERED = 0.05
ITERATIONS_RANGE = (20, 1000)
EPOCHS_RANGE = (1, 1000)
TOTAL_STEPS = (StageSpec.model_fields["max_epochs"].default
               * StageSpec.model_fields["iterations_per_epoch"].default)


@dataclass(frozen=True)
class DatasetSize:
    """The subjects of a data folder and the voxels of each (image shapes, headers only)."""

    root: str
    records: list[Any]  # SubjectRecord
    voxels: dict[str, int]  # subject/session -> voxels
    largest_shape_vox: tuple[int, ...] | None = None  # the biggest image (validation memory)

    def train_voxels(self, spec: StageSpec) -> tuple[int, int]:
        """(training subjects, their voxels) under the stage's validation split."""
        train, _val = split_subjects(self.records, spec.val_fraction, spec.seed)
        return len(train), sum(self.voxels[_key(r)] for r in train)


def _key(rec: Any) -> str:
    return f"{rec.subject}/{rec.session}"


def measure_dataset(root: Path) -> DatasetSize:
    """Discover the subjects under `root` and read each image's shape.

    Raises:
        DataError: as `discover_subjects`, or an image whose header cannot be read.
    """
    # deferred: nibabel, h5py (data.sources reads the images; a plan without --data needs none)
    from orchestrator.data.sources import discover_subjects

    records = discover_subjects(Path(root))
    shapes = {_key(r): _shape(r) for r in records}
    largest = max(shapes.values(), key=math.prod) if shapes else None
    return DatasetSize(str(root), records, {k: math.prod(v) for k, v in shapes.items()}, largest)


def _shape(rec: Any) -> tuple[int, ...]:
    try:
        if rec.cached is not None:
            import h5py  # deferred: h5py (only a cached dataset is read here)

            with h5py.File(rec.cached, "r") as f:
                return tuple(int(n) for n in f["image"].shape)
        if Path(rec.image).is_dir():  # a PNG-slice patient folder
            from PIL import Image  # deferred: Pillow (only a PNG-slice dataset)

            slices = sorted(Path(rec.image).glob("*.png"))
            with Image.open(slices[0]) as im:  # as the loader stacks them: (W, H, slices)
                return (int(im.size[0]), int(im.size[1]), len(slices))
        from orchestrator.data.nifti import load_image  # deferred: nibabel

        return tuple(int(n) for n in load_image(rec.image).shape[:3])
    except (OSError, KeyError, IndexError, ValueError) as err:
        where = rec.cached or rec.image
        raise DataError(f"{where}: cannot read the image's shape ({type(err).__name__}: {err}); "
                        f"expected a readable NIfTI, PNG slice folder or cache file") from None


def batch_cap(spec: StageSpec, ds: DatasetSize) -> tuple[int, str]:
    """(largest batch the dataset supports, why)."""
    n_train, vox = ds.train_voxels(spec)
    patch = math.prod(spec.input_size_vox)
    cap = max(1, spec.planner.min_batch_size, int(MAX_DATASET_COVERED * vox / patch))
    return cap, (f"a batch covers at most {MAX_DATASET_COVERED:.0%} of the {n_train} training "
                 f"subjects' {vox:,} voxels (nnU-Net's rule), {cap} x {patch:,} at "
                 f"{'x'.join(map(str, spec.input_size_vox))}")


def derive_schedule(spec: StageSpec, input_size_vox: tuple[int, ...], batch_size: int,
                    ds: DatasetSize) -> tuple[dict[str, int], list[str]]:
    """(stage fields to set, reasons) for iterations_per_epoch and max_epochs not set in YAML."""
    n_train, vox = ds.train_voxels(spec)
    patch = math.prod(input_size_vox)
    update: dict[str, int] = {}
    reasons = []
    iters = spec.iterations_per_epoch
    if "iterations_per_epoch" not in spec.model_fields_set:
        iters = _clamp(math.ceil(vox / (patch * batch_size)), ITERATIONS_RANGE)
        update["iterations_per_epoch"] = iters
        reasons.append(f"iterations_per_epoch {iters}: an epoch draws about the {vox:,} voxels "
                       f"of the {n_train} training subjects (batch {batch_size} of {patch:,}; "
                       f"{ITERATIONS_RANGE[0]}..{ITERATIONS_RANGE[1]})")
    if "max_epochs" not in spec.model_fields_set:
        epochs = _clamp(math.ceil(TOTAL_STEPS / iters), EPOCHS_RANGE)
        update["max_epochs"] = epochs
        reasons.append(f"max_epochs {epochs}: {TOTAL_STEPS:,} steps in all at {iters} per epoch "
                       f"({EPOCHS_RANGE[0]}..{EPOCHS_RANGE[1]})")
    return update, reasons


def _clamp(value: int, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(bounds[1], value))


# A stage's job time from a measured step: the training steps, validation (sliding window
# over the validation subjects every val_every_epochs: counted as VALIDATION_SHARE more),
# and a safety margin for a slower node, data loading and the hand-off; whole 5 minutes.
VALIDATION_SHARE = 0.15
TIME_MARGIN = 1.3
MIN_JOB_MIN = 10


def job_time_min(spec: StageSpec, step_s: float) -> tuple[int, str]:
    """(minutes for the stage's job, how they were reckoned) from a measured step time."""
    steps = spec.max_epochs * spec.iterations_per_epoch * spec.grad_accum_steps
    minutes = steps * step_s * (1 + VALIDATION_SHARE) * TIME_MARGIN / 60
    rounded = max(MIN_JOB_MIN, 5 * math.ceil(minutes / 5))
    return rounded, (f"{steps} steps x {step_s:.3g} s measured x {1 + VALIDATION_SHARE:g} "
                     f"(validation) x {TIME_MARGIN:g} (margin) = {minutes:.0f} min")
