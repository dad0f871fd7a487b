"""How many whole subjects a loading process may keep: the bound of the volume cache.

Each DataLoader worker keeps the subjects it loads (`SubjectSampledDataset`, least
recently used first out). From raw NIfTI a subject is the whole normalised volume:
image float32, label uint8 and, for the boundary loss, its signed distance map float32:
about 78 MB at ATLAS size (197x233x189). Unbounded, a worker that meets hundreds of
subjects in an epoch grows by tens of GB. The bound comes from the job's memory: what
the main process already holds, a base per worker, a margin, and the rest shared by
the workers' caches. From the HDF5 cache (`orchestrator data cache`) a subject is only
its lesion voxel index and an open file, so memory stays small whatever the bound.

SLURM's accounting (jobacct_gather/linux) sums the RSS of the job's processes, so the
figures here are per process RSS, shared pages counted once per process.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from orchestrator.data.nifti import load_image
from orchestrator.data.records import SubjectRecord

logger = logging.getLogger(__name__)
GIB = 1024**3
WORKER_BASE_GB = 0.55  # a forked worker's RSS besides its cache and a load (measured 0.5-0.6)
MARGIN = 0.10  # of the job's memory, for batches in flight, allocator slack and the kernel
LOAD_BYTES_PER_VOXEL = 12  # transient while loading: nibabel's float64 copy + normalising
SDM_BYTES_PER_VOXEL = 16   # more while computing a distance map (scipy's float64 transforms)
CACHED_SUBJECT_BYTES = 4 * 1024**2  # a cache-folder subject: lesion index + an open file


@dataclass(frozen=True)
class CacheBound:
    """The volume cache's bound in each loading process, and the numbers behind it."""

    subjects: int
    mem_gb: float
    mem_source: str
    subject_mb: float
    processes: int

    def describe(self) -> str:
        return (f"volume cache: at most {self.subjects} subject(s) per loading process "
                f"({self.processes} of them, {self.subject_mb:.0f} MB a subject, job memory "
                f"{self.mem_gb:g} GB from {self.mem_source})")


def job_mem_gb(profile_mem_gb: float) -> tuple[float, str]:
    """The job's memory: SLURM's allocation when inside a job, else the profile's value."""
    per_node = os.environ.get("SLURM_MEM_PER_NODE", "")
    if per_node.isdigit() and int(per_node) > 0:
        return int(per_node) / 1024, "SLURM_MEM_PER_NODE"
    per_cpu, cpus = os.environ.get("SLURM_MEM_PER_CPU", ""), os.environ.get("SLURM_CPUS_ON_NODE", "")
    if per_cpu.isdigit() and cpus.isdigit() and int(per_cpu) > 0:
        return int(per_cpu) * int(cpus) / 1024, "SLURM_MEM_PER_CPU x SLURM_CPUS_ON_NODE"
    return float(profile_mem_gb), "the cluster profile's mem_gb"


def subject_nbytes(records: Sequence[SubjectRecord], patch_vox: Sequence[int],
                   with_sdm: bool, transient: bool = False) -> int:
    """Bytes one prepared subject holds (with `transient`: what preparing it needs on top,
    while it runs), from the largest of the first few image headers (nibabel reads the
    header only), padded to the patch size."""
    if all(rec.cached is not None for rec in records[:8]):
        return 0 if transient else CACHED_SUBJECT_BYTES

    voxels = 0
    for rec in records[:8]:
        if rec.cached is not None or rec.image.is_dir():
            continue
        shape = load_image(rec.image).shape[:3]
        padded = [max(int(s), int(p)) for s, p in zip(shape, list(patch_vox) + [1] * 3)]
        voxels = max(voxels, padded[0] * padded[1] * padded[2])
    if transient:
        return voxels * (LOAD_BYTES_PER_VOXEL + (SDM_BYTES_PER_VOXEL if with_sdm else 0))
    per_voxel = 4 + 1 + (4 if with_sdm else 0)  # image f32, label u8, distance map f32
    return max(voxels * per_voxel, CACHED_SUBJECT_BYTES)


def cache_bound(mem_gb: float, mem_source: str, workers: int, subject_bytes: int,
                main_rss_bytes: int, load_bytes: int = 0, step_bytes: int = 0) -> CacheBound:
    """How many subjects each loading process may keep (at least 1: a patch needs its subject).

    Args:
        mem_gb: the job's memory (`job_mem_gb`).
        mem_source: where that figure came from, for the log line.
        workers: DataLoader workers; 0 means the main process loads (and caches) itself.
        subject_bytes: one prepared subject (`subject_nbytes`).
        main_rss_bytes: the main process's resident memory now (model, validation, torch).
        load_bytes: what loading one subject needs on top, while it runs, in each
            loading process (`subject_nbytes(..., transient=True)`).
        step_bytes: what the main process adds during a training step (on the CPU: the
            plan's predicted step peak; on a GPU the step lives in GPU memory: 0).
    """
    processes = max(1, workers)
    free = (mem_gb * GIB * (1 - MARGIN) - main_rss_bytes - step_bytes
            - workers * WORKER_BASE_GB * GIB - processes * load_bytes)
    per_process = int(max(0.0, free) / processes // max(1, subject_bytes))
    bound = CacheBound(max(1, per_process), mem_gb, mem_source, subject_bytes / 1024**2, processes)
    if per_process < 1:
        logger.warning("%s: not even one subject fits per process; expect the job to run out of "
                       "memory: build the cache (`orchestrator data cache DIR`) or use fewer "
                       "workers", bound.describe())
    return bound


def current_rss_bytes() -> int:
    """This process's resident memory."""
    import psutil  # deferred: only the trainer measures its memory

    return int(psutil.Process().memory_info().rss)


class VolumeCaching(Protocol):
    """A training dataset that keeps prepared volumes (data/dataset.py's datasets); its
    `patch_size_vox` and `with_sdm` are read when it has them."""

    max_cached_volumes: int | None

    @property
    def records(self) -> Sequence[SubjectRecord]: ...


def bound_volume_cache(dataset: VolumeCaching, profile_mem_gb: float, workers: int,
                       step_gb: float = 0.0) -> CacheBound:
    """Set `dataset.max_cached_volumes` from the job's memory, unless it was given; returns
    the bound (the stage's log says it once). `step_gb`: see `cache_bound`'s step_bytes."""
    mem_gb, source = job_mem_gb(profile_mem_gb)
    records = dataset.records
    patch = getattr(dataset, "patch_size_vox", (1, 1, 1))
    sdm = bool(getattr(dataset, "with_sdm", False))
    bound = cache_bound(mem_gb, source, workers, subject_nbytes(records, patch, sdm),
                        current_rss_bytes(), subject_nbytes(records, patch, sdm, transient=True),
                        int(step_gb * GIB))
    if getattr(dataset, "max_cached_volumes", None) is None:
        dataset.max_cached_volumes = bound.subjects
    return bound


ATLAS_VOXELS = 197 * 233 * 189
RAW_LOAD_S = 3.6  # one ATLAS-size subject from .nii.gz: read 0.4 s + distance map 3.2 s (here)
CACHE_PATCH_S = 0.0025  # one 96^3 patch from the HDF5 cache (docs/benchmarks.md)


def raw_data_notice(root: str, records: Sequence[SubjectRecord], mean_voxels: float,
                    samples_per_epoch: int, workers: int) -> str | None:
    """One line for `plan --data` on raw NIfTI: what the HDF5 cache would save per epoch.

    With memory bounded, a worker rarely finds the subject of its next sample still loaded
    (hundreds of subjects take turns), so each sample reads and prepares a whole volume.
    None for a cache folder.
    """
    if not records or all(r.cached is not None for r in records):
        return None
    per_sample = RAW_LOAD_S * mean_voxels / ATLAS_VOXELS - CACHE_PATCH_S
    saved_min = samples_per_epoch * max(0.0, per_sample) / max(1, workers) / 60
    return (f"--data is raw NIfTI: each training sample decompresses and prepares a whole "
            f"volume (~{RAW_LOAD_S * mean_voxels / ATLAS_VOXELS:.1f} s), and each worker's "
            f"memory holds the volumes it keeps. `orchestrator data cache {root}` once, then "
            f"--data {root}/.cache, would save about {saved_min:.0f} min of loading per epoch "
            f"of stage 1 ({samples_per_epoch} samples, {max(1, workers)} workers) and keep "
            "memory flat")
