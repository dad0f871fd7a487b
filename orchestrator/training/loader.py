"""The DataLoader of a stage's training epoch, and its batches with worker failures named."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from orchestrator.config import StagePlan
from orchestrator.training.interrupt import leave_signals_to_the_trainer
from orchestrator.training.recovery import loader_failure

WORKER_TIMEOUT_S = 300  # a batch that takes longer means a worker hung


def num_workers(sp: StagePlan) -> int:
    """The stage's `num_workers`, else one less than the job's CPUs (at most 4)."""
    if sp.spec.num_workers is not None:
        return sp.spec.num_workers
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))
    return max(0, min(4, cpus - 1))


def epoch_loader(dataset: Dataset, step_batch: int, indices: Iterable[int],
                 workers: int) -> DataLoader:
    """Batches of `step_batch` samples drawn in the order of `indices`."""
    return DataLoader(dataset, batch_size=step_batch, drop_last=True,
                      sampler=indices, num_workers=workers,
                      persistent_workers=False, timeout=WORKER_TIMEOUT_S if workers else 0,
                      worker_init_fn=leave_signals_to_the_trainer if workers else None)


def batches(loader: DataLoader, stage: str) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches; a DataLoader worker that died (the kernel's OOM killer, a
    segfault) or hung is a StageFailed saying what to change, not a hang or a bare
    RuntimeError. An exception raised in the dataset keeps its own type (e.g. DataError)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as err:
            failed = loader_failure(err, stage)
            if failed is not None:
                raise failed from err
            raise
        yield batch
