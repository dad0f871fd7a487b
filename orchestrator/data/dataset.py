"""Subject-level train/validation split and the random-patch training dataset.

`PatchDataset[i]` is a pure function of (seed, epoch, i): every random choice for sample
i of an epoch comes from `np.random.default_rng([seed, epoch, i])`, so a resumed run, a
different number of DataLoader workers or a different sample order all see exactly the
same patches.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from orchestrator.data import augment
from orchestrator.data.cachefile import CachedVolume
from orchestrator.data.distance import signed_distance_map
from orchestrator.data.intensity import load_normalised
from orchestrator.data.records import SubjectRecord, Volume
from orchestrator.data.sources import load_subject
from orchestrator.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def load_validation_volumes(records: Sequence[SubjectRecord]) -> list[Volume]:
    """Whole volumes for validation (sliding-window inference), in record order.

    Raises:
        DataError: as `load_subject`.
    """
    return [load_subject(rec) for rec in records]


class PatchDraw(NamedTuple):
    """Where sample i of an epoch comes from (`PatchDataset.patch_draw`).

    Attributes:
        subject_index: index of its record.
        start_vox: the patch's corner in the (padded) volume.
        lesion_centred: True when it was drawn centred on a lesion voxel (then moved only
            as far as needed to stay inside the volume).
    """

    subject_index: int
    start_vox: tuple[int, int, int]
    lesion_centred: bool


@dataclass
class _Prepared:
    """A volume padded to at least the patch size, with its lesion voxels listed.

    For a cached subject `orchestrator.data.cachefile.CachedVolume` stands in for it:
    the same `shape`, `lesion_flat` and `crop`, read from the HDF5 file patch by patch.
    """

    image: np.ndarray
    label: np.ndarray
    lesion_flat: np.ndarray  # flat indices of lesion voxels in the padded grid
    sdm: np.ndarray | None = None  # the label's signed distance map, when asked for

    @property
    def shape(self) -> tuple[int, ...]:
        return self.image.shape

    def crop(self, start: np.ndarray, size: tuple[int, ...],
             names: tuple[str, ...] = ("image", "label")) -> tuple[np.ndarray, ...]:
        box = tuple(slice(s, s + p) for s, p in zip(start, size))
        return tuple(getattr(self, name)[box] for name in names)


class SubjectSampledDataset(Dataset):
    """Training samples that are a pure function of (seed, epoch, i).

    Sample i of an epoch comes from the subject `order[(epoch * samples_per_epoch + i) % n]`
    (a fixed permutation from the seed), so epochs rotate through all subjects and a
    resumed run sees exactly the samples an uninterrupted one would. Subjects are loaded
    on first use and cached per process (`max_cached_volumes` bounds it; pickling drops
    it, so DataLoader workers load their own). Subclasses prepare a subject once
    (`_prepare_record`) and cut samples from it (`__getitem__`, using `_rng(i)`).
    """

    def __init__(self, records: Sequence[SubjectRecord], samples_per_epoch: int,
                 lesion_fraction: float, seed: int, augment: float,
                 max_cached_volumes: int | None) -> None:
        if not records:
            raise DataError(f"{type(self).__name__}: no training subjects; expected at least one record")
        missing = [rec.image for rec in records if rec.mask is None]
        if missing:
            raise DataError(
                f"{missing[0]}: no lesion mask; expected a mask for every training image"
            )
        if samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch {samples_per_epoch}; expected at least 1")
        if not 0.0 <= lesion_fraction <= 1.0:
            raise ConfigError(f"lesion_fraction {lesion_fraction}; expected a value in [0, 1]")
        self.records = list(records)
        self.samples_per_epoch = int(samples_per_epoch)
        self.lesion_fraction = float(lesion_fraction)
        self.seed = int(seed)
        self.augment = float(augment)  # the augmentation's strength; 0 (False): none
        self.max_cached_volumes = max_cached_volumes
        self.epoch = 0
        self._order = np.random.default_rng([self.seed]).permutation(len(self.records))
        self._cache: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples `__getitem__` returns."""
        if epoch < 0:
            raise ValueError(f"epoch {epoch}; expected >= 0")
        self.epoch = int(epoch)

    def subject_index(self, i: int, epoch: int | None = None) -> int:
        """Which record sample i of `epoch` (default: the current one) is drawn from."""
        epoch = self.epoch if epoch is None else epoch
        return int(self._order[(epoch * self.samples_per_epoch + i) % len(self.records)])

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(f"sample {i} out of range [0, {self.samples_per_epoch})")
        return np.random.default_rng([self.seed, self.epoch, int(i)])

    normalization: Any = None  # data.intensity.Normalization of the stage; None: z-score

    def _prepare_record(self, rec: SubjectRecord) -> Any:
        raise NotImplementedError

    def _volume(self, index: int) -> Any:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        prepared = self._prepare_record(self.records[index])
        self._cache[index] = prepared
        if self.max_cached_volumes is not None:
            while len(self._cache) > max(1, self.max_cached_volumes):
                self._cache.popitem(last=False)
        return prepared

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # workers load their own; never pickle volumes
        return state


class PatchDataset(SubjectSampledDataset):
    """Random training patches, a fixed number per epoch.

    Sample i of an epoch takes subject `order[(epoch * samples_per_epoch + i) % n]` (a
    seed-fixed permutation: round-robin over subjects across epochs). With probability
    `lesion_fraction` (and if the subject has lesion voxels) the patch is centred on a
    random lesion voxel, moved as needed to stay inside the volume; otherwise its corner
    is uniform. Volumes smaller than the patch are zero-padded symmetrically (image with
    its background value, label with 0).

    Volumes are loaded on first use and kept in the instance (per process: each
    DataLoader worker fills its own cache; pickling drops it). `max_cached_volumes`
    bounds that memory (about 43 MB per ATLAS subject) at the cost of re-reading.
    Records from a cache folder (`rec.cached` set) are not loaded: only their lesion
    voxel list is kept, and each patch is read from the HDF5 file (a few ms).
    With `augment` (True, or a strength: `augment_strength`), `augment.spatial` (flips,
    sometimes a small rotation/scaling) and `augment.intensity` (scale/shift, sometimes
    gamma and noise) change each patch.

    Note: the epoch lives in the instance. Call `set_epoch` before iterating; DataLoader
    workers see it only if they are started after the call (persistent_workers=False).

    Items: {"image": float32 tensor (1, X, Y, Z), "label": int64 tensor (X, Y, Z)}, and
    with `with_sdm` "sdm": float32 (1, X, Y, Z), the signed distance map of the whole
    volume's label cropped like it (the boundary loss's input; the cache stores it, for
    NIfTI records it is computed once per subject when loaded; padding is 0).
    """

    def __init__(
        self,
        records: Sequence[SubjectRecord],
        patch_size_vox: tuple[int, int, int],
        samples_per_epoch: int,
        lesion_fraction: float = 1 / 3,
        seed: int = 0,
        augment: float = False,
        max_cached_volumes: int | None = None,
        with_sdm: bool = False,
    ) -> None:
        if len(patch_size_vox) != 3 or min(patch_size_vox) < 1:
            raise ConfigError(f"patch_size_vox {patch_size_vox}; expected 3 positive sizes")
        super().__init__(records, samples_per_epoch, lesion_fraction, seed, augment,
                         max_cached_volumes)
        x, y, z = (int(p) for p in patch_size_vox)
        self.patch_size_vox = (x, y, z)
        self.with_sdm = with_sdm

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = self._rng(i)
        vol = self._volume(self.subject_index(i))
        start, _ = self._patch_start(rng, vol)
        names = ("image", "label", "sdm") if self.with_sdm else ("image", "label")
        image, label, *sdm = vol.crop(start, self.patch_size_vox, names=names)
        if self.augment:
            image, label, *sdm = augment.spatial(rng, image, label, *sdm, strength=self.augment)
            image = augment.intensity(rng, image, strength=self.augment)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)[None]),
            "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
        }
        if sdm:
            item["sdm"] = torch.from_numpy(np.ascontiguousarray(sdm[0], dtype=np.float32)[None])
        return item

    def patch_draw(self, i: int) -> PatchDraw:
        """Where sample i of the current epoch comes from (the draws `__getitem__` makes)."""
        index = self.subject_index(i)
        start, lesion_centred = self._patch_start(self._rng(i), self._volume(index))
        x, y, z = (int(s) for s in start)
        return PatchDraw(index, (x, y, z), lesion_centred)

    def _patch_start(self, rng: np.random.Generator, vol: _Prepared) -> tuple[np.ndarray, bool]:
        shape = np.array(vol.shape)
        patch = np.array(self.patch_size_vox)
        high = shape - patch  # >= 0: volumes are padded to the patch size
        draw_lesion = rng.random() < self.lesion_fraction
        if draw_lesion and vol.lesion_flat.size:
            flat = vol.lesion_flat[rng.integers(vol.lesion_flat.size)]
            centre = np.array(np.unravel_index(flat, vol.shape))
            return np.clip(centre - patch // 2, 0, high), True
        return rng.integers(0, high + 1), False

    def _prepare_record(self, rec: SubjectRecord) -> Any:
        if rec.cached is not None:
            return CachedVolume(rec.cached, self.patch_size_vox)
        return _prepare(load_normalised(rec, self.normalization), self.patch_size_vox, self.with_sdm)


def _prepare(vol: Volume, patch_size_vox: tuple[int, int, int], with_sdm: bool = False) -> _Prepared:
    """Pad to at least the patch size (centred), index the lesion voxels and, if asked,
    compute the label's signed distance map (on the unpadded volume, padded with 0)."""
    assert vol.label is not None
    pad = [max(0, p - s) for p, s in zip(patch_size_vox, vol.image.shape)]
    image, label = vol.image, vol.label
    sdm = signed_distance_map(label) if with_sdm else None
    if any(pad):
        widths = [(p // 2, p - p // 2) for p in pad]
        image = np.pad(image, widths, constant_values=vol.background)
        label = np.pad(label, widths, constant_values=0)
        sdm = None if sdm is None else np.pad(sdm, widths, constant_values=0)
    return _Prepared(image, label, np.flatnonzero(label), sdm)
