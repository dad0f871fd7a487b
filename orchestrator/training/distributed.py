"""DistributedDataParallel for a stage whose job runs several tasks (one per GPU, or CPU).

The launcher exports the torch.distributed variables (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK: submitit's `TorchDistributedEnvironment` under SLURM, torchrun
elsewhere); with WORLD_SIZE > 1 `stage_runner` returns a `DistributedStageRunner`:

- the process group uses NCCL on GPUs and gloo on the CPU;
- each rank draws its own share of every epoch's samples (rank r takes samples
  r, r + W, r + 2W, ... of a dataset W times larger): the planner's batch is per rank,
  and the datasets are pure in (seed, epoch, i), so the shares are deterministic;
- gradients are all-reduced by DDP, so every rank holds the same weights; at the end
  the ranks compare digests of their weights and a divergence fails the stage;
- rank 0 alone writes checkpoints, metrics, split/hand-off files and state.json, and
  validates; the other ranks receive its metrics row, so early stopping agrees (the
  row's `train_loss` is the mean over rank 0's share of the epoch);
- a stop request (preemption signal) seen by any rank stops every rank at the same step.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from orchestrator.atomic import atomic_write_text
from orchestrator.config import Plan
from orchestrator.training import checkpoints as ck
from orchestrator.training.devices import resolve_device
from orchestrator.training.metrics_log import MetricsLog
from orchestrator.training.trainer import StageFailed, StageRunner

logger = logging.getLogger(__name__)
DDP_REPORT = "ddp.json"
GROUP_TIMEOUT = datetime.timedelta(minutes=10)  # a rank that died leaves the others waiting


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def stage_runner(plan: Plan, stage: str, device: str = "auto") -> StageRunner:
    """The stage's runner: distributed when this process is one of several ranks."""
    if world_size() > 1:
        return DistributedStageRunner(plan, stage, device)
    return StageRunner(plan, stage, device)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (ranks compare it)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Tear the process group down when the stage ends (it is set up by the runner)."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _init_group(device: torch.device) -> str:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # "cuda" then means this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", timeout=GROUP_TIMEOUT)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
    if cpus and device.type == "cpu":  # the ranks share the node's cores
        torch.set_num_threads(cpus)
    return backend


class _QuietLog(MetricsLog):
    """A rank other than 0 keeps the rows in memory (for early stopping) and writes nothing."""

    def _flush(self) -> None:
        pass


class _RecordedShare:
    """The rank's sample indices, as the DataLoader draws them (reported in ddp.json)."""

    def __init__(self, indices: range, seen: list[int]) -> None:
        self.indices, self.seen = indices, seen

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        for i in self.indices:
            self.seen.append(i)
            yield i


class _DDPObjective:
    """Runs the stage's objective through the DDP wrapper, so backward all-reduces gradients.

    The trainer calls `objective(model, ...)` with its plain model; the forward goes through
    `ddp` (same parameters). A non-finite loss on any rank is made non-finite on every rank,
    so all of them skip the step together (a lone skip would leave the others waiting).
    """

    def __init__(self, inner: Callable[..., torch.Tensor], ddp: DistributedDataParallel) -> None:
        self.inner, self.ddp = inner, ddp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert model is self.ddp.module, "DDP objective called with another model"
        loss = self.inner(self.ddp, *args, **kwargs)
        finite = torch.tensor([float(torch.isfinite(loss).all())])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return loss if finite.item() == 1.0 else loss * float("nan")


class DistributedStageRunner(StageRunner):
    """A StageRunner that is one rank of several (see the module docstring)."""

    def __init__(self, plan: Plan, stage: str, device: str = "auto") -> None:
        self.backend = _init_group(resolve_device(device))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_writer = self.rank == 0
        super().__init__(plan, stage, device)
        # per-rank batch: the epoch has W times the samples, each rank runs the same steps
        self.dataset.samples_per_epoch *= self.world
        self.seen: list[int] = []
        if not self.is_writer:
            self.log = _QuietLog(self.dir)
        logger.info("%s: rank %d of %d (%s) on %s", stage, self.rank, self.world, self.backend,
                    socket.gethostname())

    # ------------------------------------------------------------------ start
    def start(self) -> str:
        how = super().start()
        # DDP broadcasts rank 0's parameters and buffers here: after the hand-off or resume
        ids = [self.device.index or 0] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.train_step.objective = _DDPObjective(self.train_step.objective, self.ddp)
        return how

    def _handoff(self) -> str:
        if self.is_writer:
            return super()._handoff()
        return f"hand-off from {self.sp.init_from}: weights received from rank 0"

    def _write_split(self) -> None:
        if self.is_writer:
            super()._write_split()

    # ------------------------------------------------------------------ loop
    def sample_indices(self, start: int) -> Iterable[int]:
        """This rank's share from the rank's own position `start` (samples it has drawn)."""
        self.seen = [] if start == 0 else self.seen
        share = range(start * self.world + self.rank, len(self.dataset), self.world)
        return _RecordedShare(share, self.seen)

    def train_steps(self, max_steps: int | None = None,
                    stop: Callable[[], bool] | None = None) -> bool:
        def any_rank_stops() -> bool:
            flag = torch.tensor([1.0 if stop is not None and stop() else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return flag.item() > 0
        return super().train_steps(max_steps, any_rank_stops)

    def end_epoch(self, seconds: float) -> dict[str, Any]:
        if not self.is_writer:  # rank 0 validates; its row comes below
            self.val_recs, val_recs = [], self.val_recs
        try:
            row = super().end_epoch(seconds)
        finally:
            if not self.is_writer:
                self.val_recs = val_recs
        shared = [row, self.progress.best_dice]
        dist.broadcast_object_list(shared, src=0)
        row, self.progress.best_dice = shared
        self.log.rows[-1] = row
        return row

    # ------------------------------------------------------------------ writes: rank 0
    def save_last(self) -> None:
        if self.is_writer:
            super().save_last()

    def record(self, counter: str | None = None, **fields: Any) -> dict[str, Any]:
        return super().record(counter, **fields) if self.is_writer else {}

    def save_final(self, path: Path) -> None:
        """Check every rank holds rank 0's weights, then rank 0 writes final.pt and ddp.json.

        Raises:
            StageFailed: the ranks' weights differ (gradients were not all-reduced).
        """
        # buffers (BatchNorm running statistics) follow rank 0, as DDP does before every
        # forward; parameters are not touched: they must already agree (all-reduce)
        for buf in self.model.buffers():
            dist.broadcast(buf, src=0)
        mine = {"rank": self.rank, "host": socket.gethostname(),
                "weights_sha256": weights_digest(self.model.state_dict()),
                "samples_last_epoch": list(self.seen)}
        ranks: list[Any] = [None] * self.world
        dist.all_gather_object(ranks, mine)
        in_sync = len({r["weights_sha256"] for r in ranks}) == 1
        if self.is_writer:
            report = {"world_size": self.world, "backend": self.backend, "in_sync": in_sync,
                      "ranks": ranks}
            atomic_write_text(self.dir / DDP_REPORT, json.dumps(report, indent=2))
        if not in_sync:
            raise StageFailed(f"stage {self.sp.name}: the {self.world} DDP ranks ended with "
                              f"different weights; see {self.dir / DDP_REPORT}")
        if self.is_writer:
            ck.save_checkpoint(path, self.payload(full=False))
        dist.barrier()  # final.pt exists for every rank once any of them returns
