"""Training-time augmentation of patches and slice stacks.

Every random choice comes from the sample's own generator (`rng`, seeded by (seed,
epoch, i)), so an augmented sample is as reproducible as an unaugmented one: a resumed
run, another worker count or another sample order see the same data.

- spatial (3D patches): a flip per axis, and with probability `AFFINE_PROB` a small
  rotation (up to `ROTATE_MAX_DEG` about each axis) and scaling about the patch centre
  (MONAI's `Affine`; image and distance maps bilinear with border padding, the label
  nearest-neighbour with zeros);
- intensity (image only): scale and shift, with probability `GAMMA_PROB` a gamma
  (nnU-Net's: on the intensities mapped to [0, 1] and back), with probability
  `NOISE_PROB` Gaussian noise.

`strength` (a stage's `augment_strength`, 0 to 2) scales every probability and how far
each draw lies from the identity (angle, scale - 1, intensity scale - 1, shift, gamma - 1,
noise std); flips stay as they are. Strength 1 is exactly the augmentation above.
"""
from __future__ import annotations

import math
from typing import TypeVar, cast

import numpy as np

INTENSITY_SCALE_RANGE = (0.9, 1.1)
INTENSITY_SHIFT_RANGE = (-0.1, 0.1)
AFFINE_PROB = 0.2
ROTATE_MAX_DEG = 10.0
SCALE_RANGE = (0.9, 1.1)
GAMMA_PROB = 0.3
GAMMA_RANGE = (0.7, 1.5)
NOISE_PROB = 0.15
NOISE_STD_MAX = 0.1  # the image is normalised to unit variance over the brain


_Draw = TypeVar("_Draw", float, np.ndarray)  # one draw or one per axis


def _away(value: _Draw, strength: float) -> _Draw:
    """A multiplicative draw (1 = identity) moved `strength` times as far from 1."""
    return 1.0 + (value - 1.0) * strength


def spatial(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
            *maps: np.ndarray, strength: float = 1.0) -> tuple[np.ndarray, ...]:
    """Flip and (sometimes) rotate/scale a 3D patch: (image, label, *maps) alike."""
    flips = rng.random(image.ndim) < 0.5
    axes = tuple(int(a) for a in np.flatnonzero(flips))
    if axes:
        image, label = np.flip(image, axis=axes), np.flip(label, axis=axes)
        maps = tuple(np.flip(m, axis=axes) for m in maps)
    if rng.random() < AFFINE_PROB * strength:
        angles = rng.uniform(-1.0, 1.0, image.ndim) * math.radians(ROTATE_MAX_DEG) * strength
        scales = _away(rng.uniform(*SCALE_RANGE, image.ndim), strength)
        image, label, *rest = _affine(angles, scales, image, label, maps)
        maps = tuple(rest)
    return (image, label, *maps)


def _affine(angles: np.ndarray, scales: np.ndarray, image: np.ndarray, label: np.ndarray,
            maps: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    import torch  # deferred: torch and MONAI (seconds to import) only for the affine branch
    from monai.transforms import Affine

    common = {"rotate_params": angles.tolist(), "scale_params": scales.tolist(), "image_only": True}
    smooth = np.stack([np.asarray(image, np.float32), *[np.asarray(m, np.float32) for m in maps]])
    # cast: with image_only=True MONAI's Affine returns the image alone, not (image, affine)
    warped = cast(torch.Tensor, Affine(mode="bilinear", padding_mode="border", **common)(
        torch.from_numpy(smooth)))
    lab = cast(torch.Tensor, Affine(mode="nearest", padding_mode="zeros", **common)(
        torch.from_numpy(np.asarray(label, np.float32)[None])))
    out = np.asarray(warped.numpy())
    return [out[0], np.asarray(lab.numpy()[0]).round().astype(label.dtype), *out[1:]]


def intensity(rng: np.random.Generator, image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Scale/shift, and sometimes gamma and noise, of an image (float32)."""
    scale = _away(rng.uniform(*INTENSITY_SCALE_RANGE), strength)
    shift = rng.uniform(*INTENSITY_SHIFT_RANGE) * strength
    image = np.asarray(image, np.float32) * np.float32(scale) + np.float32(shift)
    if rng.random() < GAMMA_PROB * strength:
        gamma = _away(rng.uniform(*GAMMA_RANGE), strength)
        lo, hi = float(image.min()), float(image.max())
        if hi > lo:
            unit = (image - lo) / (hi - lo)
            image = (np.power(unit, gamma) * (hi - lo) + lo).astype(np.float32)
    if rng.random() < NOISE_PROB * strength:
        std = rng.uniform(0.0, NOISE_STD_MAX) * strength
        image = image + rng.normal(0.0, std, image.shape).astype(np.float32)
    return image
