"""Augmentation: reproducible from the sample's generator, and each change is the one named."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data import augment
from orchestrator.data.distance import signed_distance_map


def _patch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    image = g.normal(size=(24, 24, 24)).astype(np.float32)
    label = np.zeros((24, 24, 24), np.int64)
    label[8:16, 9:17, 7:15] = 1
    return image, label, signed_distance_map(label)


def test_same_generator_same_augmentation(monkeypatch) -> None:
    monkeypatch.setattr(augment, "AFFINE_PROB", 1.0)
    monkeypatch.setattr(augment, "NOISE_PROB", 1.0)
    image, label, sdm = _patch()
    a = augment.spatial(np.random.default_rng([1, 2, 3]), image, label, sdm)
    b = augment.spatial(np.random.default_rng([1, 2, 3]), image, label, sdm)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(augment.intensity(np.random.default_rng(5), image),
                                  augment.intensity(np.random.default_rng(5), image))


def test_affine_moves_image_label_and_map_together(monkeypatch) -> None:
    monkeypatch.setattr(augment, "AFFINE_PROB", 1.0)
    image, label, sdm = _patch()
    for seed in range(4):
        img2, lab2, sdm2 = augment.spatial(np.random.default_rng(seed), image, label, sdm)
        assert img2.shape == image.shape and lab2.dtype == label.dtype
        assert set(np.unique(lab2)) <= {0, 1}
        # a rotation <= 10 deg and scaling 0.9-1.1 per axis: the lesion keeps 0.7-1.35 of its volume
        assert 0.7 * label.sum() <= lab2.sum() <= 1.35 * label.sum()
        agree = np.mean((sdm2 < 0) == (lab2 == 1))  # the two interpolations differ at the rim only
        assert agree > 0.98, agree
        assert not np.array_equal(img2, image)


def test_gamma_keeps_range_and_order_noise_is_bounded(monkeypatch) -> None:
    image, _, _ = _patch()
    monkeypatch.setattr(augment, "NOISE_PROB", 0.0)
    monkeypatch.setattr(augment, "GAMMA_PROB", 1.0)
    out = augment.intensity(np.random.default_rng(0), image)
    scaled = augment.intensity(np.random.default_rng(0), image)  # same draws
    np.testing.assert_array_equal(out, scaled)
    order = np.argsort(image, axis=None)
    assert np.all(np.diff(out.reshape(-1)[order]) >= -1e-6)  # monotone: gamma keeps the order
    monkeypatch.setattr(augment, "GAMMA_PROB", 0.0)
    plain = augment.intensity(np.random.default_rng(0), image)
    assert out.min() == pytest.approx(plain.min(), abs=1e-5)
    assert out.max() == pytest.approx(plain.max(), abs=1e-5)
    assert not np.allclose(out, plain)
    monkeypatch.setattr(augment, "NOISE_PROB", 1.0)
    noisy = augment.intensity(np.random.default_rng(0), image)
    assert 0 < np.std(noisy - plain) <= augment.NOISE_STD_MAX * 1.05
