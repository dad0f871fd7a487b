"""2D slice stacks for the LCNN: sampling for training and slice-by-slice inference.

The LCNN reads 2T+1 adjacent axial slices, (2T+1, H, W), and segments the centre one. It
mirrors its input along the last axis to compare the hemispheres, so W must be the
left-right axis. Volumes are RAS (X = left-right, Y = posterior-anterior, Z =
inferior-superior), so an axial slice `image[:, :, z]` is transposed to (H=Y, W=X).

Planes are fitted to a fixed (H, W) by centre-cropping or padding each axis symmetrically
(the odd voxel, if any, at the end, as `PatchDataset` pads), so the brain's midline stays
within half a voxel of the middle of W.

`SliceStackDataset[i]`, like `PatchDataset[i]`, is a pure function of (seed, epoch, i).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orchestrator.data import augment
from orchestrator.data.dataset import SubjectSampledDataset
from orchestrator.data.intensity import load_normalised
from orchestrator.data.records import SubjectRecord
from orchestrator.errors import ConfigError

logger = logging.getLogger(__name__)


def slice_stack(image: np.ndarray, z: int, half_width: int) -> np.ndarray:
    """The axial slices z-T..z+T of an (X, Y, Z) volume as (2T+1, H=Y, W=X).

    Indices outside the volume are clamped: the first and last slices are replicated.

    Args:
        image: (X, Y, Z) volume.
        z: centre slice, in [0, Z).
        half_width: T >= 0.

    Returns:
        A contiguous (2T+1, Y, X) array of `image`'s dtype.

    Raises:
        IndexError: `z` outside [0, Z).
        ValueError: `image` is not 3D or `half_width` < 0.
    """
    if image.ndim != 3:
        raise ValueError(f"slice_stack: image of shape {image.shape}; expected (X, Y, Z)")
    if half_width < 0:
        raise ValueError(f"slice_stack: half_width {half_width}; expected >= 0")
    n_z = image.shape[2]
    if not 0 <= z < n_z:
        raise IndexError(f"slice_stack: slice {z} out of range [0, {n_z})")
    return np.ascontiguousarray(image[:, :, _stack_indices(z, half_width, n_z)].transpose(2, 1, 0))


def crop_or_pad_hw(array: np.ndarray, size_hw: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """`array` (..., H, W) centre-cropped or padded with `fill` to (..., *size_hw)."""
    out = np.full(array.shape[:-2] + tuple(size_hw), fill, dtype=array.dtype)
    (src_h, dst_h), (src_w, dst_w) = (_window(n, s) for n, s in zip(array.shape[-2:], size_hw))
    out[..., dst_h, dst_w] = array[..., src_h, src_w]
    return out


@dataclass
class _Slices:
    """A subject as (Z, H, W) planes fitted to the output size, with its candidate slices."""

    image: np.ndarray  # float32 (Z, H, W)
    label: np.ndarray  # uint8 (Z, H, W)
    lesion_z: np.ndarray  # slices with lesion voxels inside the fitted plane
    brain_z: np.ndarray  # slices with brain (non-background) voxels inside the fitted plane


class SliceStackDataset(SubjectSampledDataset):
    """Random training slice stacks for the LCNN, a fixed number per epoch.

    Sample i of an epoch takes subject `order[(epoch * samples_per_epoch + i) % n]` (a
    seed-fixed permutation, as `PatchDataset`). With probability `lesion_fraction` the
    centre slice is uniform among the slices with lesion voxels (inside the fitted
    plane), if there are any; otherwise uniform among the slices holding brain, else
    among all slices. Every random choice comes from `np.random.default_rng([seed,
    epoch, i])`. With `augment`, a left-right flip (along W: the midline stays put) and
    the intensity changes of `augment.intensity` (scale/shift, gamma, noise) are drawn
    from the same generator.

    Volumes are loaded on first use and kept per process (pickling drops the cache;
    `max_cached_volumes` bounds it). Call `set_epoch` before iterating.

    Items: {"image": float32 tensor (in_slices, H, W), "label": int64 tensor (H, W)}, the
    label being the centre slice's mask.
    """

    def __init__(
        self,
        records: Sequence[SubjectRecord],
        in_slices: int,
        size_hw: tuple[int, int],
        samples_per_epoch: int,
        lesion_fraction: float = 0.5,
        seed: int = 0,
        augment: float = False,
        max_cached_volumes: int | None = None,
    ) -> None:
        """Check the arguments; nothing is loaded yet.

        Raises:
            ConfigError: `in_slices` not odd and >= 1, `size_hw` not two positive sizes,
                `samples_per_epoch` < 1, or `lesion_fraction` outside [0, 1].
            DataError: no records, or a record without mask.
        """
        _check_geometry(in_slices, size_hw)
        super().__init__(records, samples_per_epoch, lesion_fraction, seed, augment,
                         max_cached_volumes)
        self.in_slices = int(in_slices)
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = self._rng(i)
        vol = self._volume(self.subject_index(i))
        z = self._centre_slice(rng, vol)
        half_width = self.in_slices // 2
        image = vol.image[_stack_indices(z, half_width, vol.image.shape[0])]
        label = vol.label[z]
        if self.augment:
            image, label = _augment_stack(rng, image, label, self.augment)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
        }

    def _centre_slice(self, rng: np.random.Generator, vol: _Slices) -> int:
        draw_lesion = rng.random() < self.lesion_fraction
        if draw_lesion and vol.lesion_z.size:
            return int(vol.lesion_z[rng.integers(vol.lesion_z.size)])
        if vol.brain_z.size:
            return int(vol.brain_z[rng.integers(vol.brain_z.size)])
        return int(rng.integers(vol.image.shape[0]))

    def _prepare_record(self, rec: SubjectRecord) -> _Slices:
        vol = load_normalised(rec, self.normalization)
        assert vol.label is not None  # checked in __init__
        image = crop_or_pad_hw(vol.image.transpose(2, 1, 0), self.size_hw, vol.background)
        label = crop_or_pad_hw(vol.label.transpose(2, 1, 0), self.size_hw, 0)
        lesion_z = np.flatnonzero(label.any(axis=(1, 2)))
        brain_z = np.flatnonzero((image != vol.background).any(axis=(1, 2)))
        return _Slices(image, label, lesion_z, brain_z)


def predict_volume_slices(
    model: nn.Module,
    image: np.ndarray,
    in_slices: int,
    size_hw: tuple[int, int],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int = 8,
    background: float = 0.0,
) -> np.ndarray:
    """Segment every axial slice of a volume with a 2D slice-stack model (the LCNN).

    Each stack is fitted to `size_hw` as in training; predictions are put back into the
    volume's (X, Y) geometry, and voxels cropped away are predicted 0 (background). The
    model's train/eval mode is restored afterwards.

    Args:
        model: maps (B, in_slices, H, W) to (B, C, H, W) logits, already on `device`.
        image: (X, Y, Z) normalised volume (as `Volume.image`).
        in_slices: 2T+1, odd.
        size_hw: the model's input (H, W).
        device: where the model runs.
        amp_dtype: autocast dtype (torch.float16/bfloat16), or None for float32.
        batch_size: slices per forward pass.
        background: padding value (as `Volume.background`).

    Returns:
        uint8 (X, Y, Z) label map: the argmax over classes.

    Raises:
        ConfigError: `in_slices` not odd and >= 1, `size_hw` not two positive sizes, or
            `batch_size` < 1.
        ValueError: `image` is not 3D.
    """
    _check_geometry(in_slices, size_hw)
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}; expected at least 1")
    if image.ndim != 3:
        raise ValueError(f"predict_volume_slices: image of shape {image.shape}; expected (X, Y, Z)")
    volume_zyx = np.asarray(image, dtype=np.float32).transpose(2, 1, 0)
    planes = crop_or_pad_hw(volume_zyx, (int(size_hw[0]), int(size_hw[1])), background)
    n_z, n_y, n_x = planes.shape[0], image.shape[1], image.shape[0]
    (src_h, dst_h), (src_w, dst_w) = _window(n_y, size_hw[0]), _window(n_x, size_hw[1])
    out = np.zeros((n_z, n_y, n_x), dtype=np.uint8)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(
            device.type,
            dtype=amp_dtype or torch.float32,
            enabled=amp_dtype is not None,
            cache_enabled=False,
        ):
            for start in range(0, n_z, batch_size):
                zs = range(start, min(start + batch_size, n_z))
                stacks = np.stack([planes[_stack_indices(z, in_slices // 2, n_z)] for z in zs])
                logits = model(torch.from_numpy(stacks).to(device))
                pred = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
                out[zs.start:zs.stop, src_h, src_w] = pred[:, dst_h, dst_w]
    finally:
        model.train(was_training)
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def _check_geometry(in_slices: int, size_hw: Sequence[int]) -> None:
    if isinstance(in_slices, bool) or in_slices < 1 or in_slices % 2 == 0:
        raise ConfigError(
            f"in_slices {in_slices}; expected an odd count >= 1 (2T+1 slices around the centre)"
        )
    if len(size_hw) != 2 or min(size_hw) < 1:
        raise ConfigError(f"size_hw {tuple(size_hw)}; expected 2 positive sizes (H, W)")


def _stack_indices(z: int, half_width: int, n_z: int) -> np.ndarray:
    """Slice indices z-T..z+T, clamped to [0, n_z)."""
    return np.clip(np.arange(z - half_width, z + half_width + 1), 0, n_z - 1)


def _window(n: int, size: int) -> tuple[slice, slice]:
    """(source, destination) slices fitting an axis of length n to `size`, centred.

    A crop cuts floor((n - size) / 2) voxels at the start; a pad adds floor((size - n) / 2)
    at the start. The odd voxel either way goes at the end.
    """
    if size <= n:
        start = (n - size) // 2
        return slice(start, start + size), slice(0, size)
    start = (size - n) // 2
    return slice(0, n), slice(start, start + n)


def _augment_stack(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                   strength: float = 1.0):
    """A left-right flip (W, symmetric about the midline), then `augment.intensity`."""
    if rng.random() < 0.5:
        image = image[..., ::-1]
        label = label[..., ::-1]
    return augment.intensity(rng, image, strength=strength), label
