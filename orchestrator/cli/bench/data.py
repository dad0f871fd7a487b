"""`orchestrator bench data`: random-patch read cost from .nii.gz versus the HDF5 cache.

It synthesises its own ATLAS-sized subjects into a temporary folder, builds the cache and
times, per patch size, a random crop from the .nii.gz (nibabel decompresses the whole
file, then the crop is taken) and from the cache (a copy out of a memmap of the
contiguous dataset, `cachefile.CachedVolume`; the files are in the page cache: warm),
then `PatchDataset` samples per second.
`PatchDataset` keeps loaded volumes in memory; for ATLAS (655 subjects, 43 MB each) that
is bounded with `max_cached_volumes`, so every sample re-reads its subject: that is the
case timed (`..._reload_...`), and the all-in-RAM rate from NIfTI is given for reference.
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import torch

from orchestrator.data.cache import build_cache
from orchestrator.data.cachefile import CachedVolume
from orchestrator.data.dataset import PatchDataset
from orchestrator.data.nifti import load_image
from orchestrator.data.sources import discover_subjects
from orchestrator.data.synth import REFERENCE_SHAPE_VOX, synthesize_atlas
from orchestrator.planning.probe import usable_cpus

CROP_SIZES_VOX = (96, 144)
PATCH_SIZE_VOX = 96


def bench_data(
    tmp_dir: Path | None = None,
    shape_vox: tuple[int, int, int] = REFERENCE_SHAPE_VOX,
    subjects: int = 2,
    repeats: int = 10,
) -> dict:
    """Measure patch reads from .nii.gz and from the cache (about a minute on 2 cores).

    Args:
        tmp_dir: where the temporary data go (default: the system's temp folder).
        shape_vox: volume size of the synthetic subjects.
        subjects: how many subjects (samples round-robin over them).
        repeats: timed crops per size and format; NIfTI dataset samples (cache: 20x more).

    Returns:
        {"bench": "data", "machine": {...}, "figures": {name: number}}: crop times in ms
        (medians), `..._ratio` = NIfTI time / cache time, samples per second, cache build
        seconds and sizes per subject.
    """
    figures: dict[str, float] = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="bench-data-") as tmp:
        root = Path(tmp) / "atlas"
        t0 = time.perf_counter()
        synthesize_atlas(root, subjects=subjects, shape_vox=shape_vox, seed=0)
        figures["synth_s_per_subject"] = (time.perf_counter() - t0) / subjects
        report = build_cache(root)
        figures["cache_build_s_per_subject"] = report.seconds / subjects
        nifti, cached = discover_subjects(root), discover_subjects(report.out)
        figures["nifti_mb_per_subject"] = _mb(sum(r.image.stat().st_size for r in nifti)) / subjects
        cache_bytes = sum(r.cached.stat().st_size for r in cached if r.cached)
        figures["cache_mb_per_subject"] = _mb(cache_bytes) / subjects
        for size in CROP_SIZES_VOX:
            patch = (size,) * 3

            def from_nifti(k: int, patch: tuple[int, ...] = patch) -> np.ndarray:
                data = np.asarray(load_image(nifti[k % subjects].image).dataobj)
                return data[_random_box(rng, data.shape, patch)]

            volumes = [CachedVolume(r.cached, patch) for r in cached if r.cached]

            def from_cache(k: int, patch: tuple[int, ...] = patch,
                           volumes: list[CachedVolume] = volumes) -> np.ndarray:
                vol = volumes[k % subjects]
                start = rng.integers(0, np.array(vol.shape) - np.array(patch) + 1)
                return vol.crop(start, patch, names=("image",))[0]

            from_cache(0)  # open the files: warm
            nifti_ms = _median_ms(from_nifti, repeats)
            cache_ms = _median_ms(from_cache, repeats)
            figures[f"crop{size}_nifti_ms"] = nifti_ms
            figures[f"crop{size}_cache_ms"] = cache_ms
            figures[f"crop{size}_ratio"] = nifti_ms / cache_ms
        figures.update(_dataset_rates(nifti, cached, repeats))
    return {"bench": "data", "machine": machine_info(torch.__version__),
            "figures": {k: round(float(v), 4) for k, v in figures.items()}}


def machine_info(torch_version: str) -> dict:
    """What the figures were measured on."""
    return {"cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
            "python": platform.python_version(), "torch": torch_version, "numpy": np.__version__,
            "h5py": h5py.__version__, "nibabel": nib.__version__}


def _cpu_model() -> str | None:
    """The CPU's name (/proc/cpuinfo's "model name"; None elsewhere): figures from two
    machines differ in speed and, through their kernels, in the last digits."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), None)
    except OSError:
        return None


def _dataset_rates(nifti: list, cached: list, repeats: int) -> dict[str, float]:
    """PatchDataset samples/s at 96^3: re-reading each subject (NIfTI, cache), all in RAM."""
    patch = (PATCH_SIZE_VOX,) * 3
    out = {}
    cases = (("patch96_nifti_reload", nifti, 1, repeats),
             ("patch96_cache", cached, None, 20 * repeats),
             ("patch96_nifti_in_ram", nifti, None, 20 * repeats))
    for name, records, bound, samples in cases:
        ds = PatchDataset(records, patch, samples_per_epoch=samples, seed=0,
                          max_cached_volumes=bound)
        if bound is None:
            for i in range(len(records)):
                ds[i]  # load (NIfTI) or open (cache) every subject before timing
        t0 = time.perf_counter()
        for i in range(samples):
            ds[i]
        out[f"{name}_samples_per_s"] = samples / (time.perf_counter() - t0)
    out["patch96_cache_vs_nifti_reload_ratio"] = (
        out["patch96_cache_samples_per_s"] / out["patch96_nifti_reload_samples_per_s"])
    return out


def _random_box(rng: np.random.Generator, shape: tuple[int, ...], patch: tuple[int, ...]):
    start = rng.integers(0, np.maximum(np.array(shape) - patch, 0) + 1)
    return tuple(slice(s, s + p) for s, p in zip(start, patch))


def _median_ms(fn, repeats: int) -> float:
    times = []
    for k in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def _mb(n_bytes: int) -> float:
    return n_bytes / 2**20
