"""Intensity normalisation as a stage asks: per-volume z-score or a dataset mean/std.

`zscore` (the default) is `load_subject`'s: each volume z-scored over its nonzero voxels.
`dataset` is what the LCNN seed did on its PNG slices (torchvision's ToTensor then
Normalize(0.2162, 0.1841)): x / 255 (x / 65535 for 16-bit PNGs) for PNG slices, the raw
values for NIfTI, then (x - mean) / std; the background value is that of a zero voxel.
The HDF5 cache holds z-scored volumes, so `dataset` refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.data.nifti import load_image
from orchestrator.data.pngslices import read_png_volume
from orchestrator.data.sources import load_subject
from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class Normalization:
    """How a volume's intensities are normalised (from the stage; kept in checkpoints)."""

    kind: str = "zscore"  # zscore | dataset
    mean: float | None = None
    std: float | None = None

    @classmethod
    def of_stage(cls, spec: Any) -> Normalization:
        return cls(getattr(spec, "normalization", "zscore"), getattr(spec, "intensity_mean", None),
                   getattr(spec, "intensity_std", None))

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> Normalization:
        """From a checkpoint's "normalization" entry (absent in older ones: zscore)."""
        return cls(**doc) if doc else cls()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std}


def load_normalised(rec: Any, norm: Normalization | None = None) -> Any:
    """`load_subject(rec)`, its image normalised as `norm` says (zscore: unchanged).

    Raises:
        ConfigError: `dataset` normalisation of a cached subject, or without mean/std.
        DataError: as `load_subject`.
    """
    vol = load_subject(rec)
    if norm is None or norm.kind == "zscore":
        return vol
    if norm.mean is None or not norm.std:
        raise ConfigError(f"normalization dataset: intensity_mean {norm.mean}, intensity_std "
                          f"{norm.std}; expected both, std > 0")
    if rec.cached is not None:
        raise ConfigError(f"{rec.cached}: the cache holds z-scored volumes; normalization dataset "
                          "needs the raw data (PNG slices or NIfTI): train with --data on it")
    raw = _raw_image(rec)
    vol.image = ((raw - norm.mean) / norm.std).astype(np.float32)
    vol.background = float((0.0 - norm.mean) / norm.std)
    return vol


def _raw_image(rec: Any) -> np.ndarray:
    """The image's raw intensities as float32 (X, Y, Z), PNG slices scaled to [0, 1]."""
    if rec.image.is_dir():
        raw, _mask = read_png_volume(rec.image, None)
        return raw / (65535.0 if raw.max() > 255 else 255.0)
    data = np.asarray(load_image(rec.image).dataobj, dtype=np.float32)
    return data.reshape(data.shape[:3])
