"""DistributedDataParallel for a stage whose job runs several tasks (one per GPU, or CPU).

The launcher exports the torch.distributed variables (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK: submitit's `TorchDistributedEnvironment` under SLURM, torchrun
elsewhere); with WORLD_SIZE > 1 `session()` opens the process group and yields this
rank's `DdpPeers` (training/rank.py's `Peers`), which `run_stage` passes to the runner
with the rank's role (rank 0 the writer, the others followers):

- the process group uses NCCL on GPUs and gloo on the CPU;
- each rank draws its own share of every epoch's samples (rank r takes samples
  r, r + W, r + 2W, ... of a dataset W times larger): the planner's batch is per rank,
  and the datasets are pure in (seed, epoch, i), so the shares are deterministic;
- the step runs the DDP module, so backward all-reduces the gradients and every rank
  holds the same weights; a non-finite loss on any rank is made non-finite on every
  rank, so all of them skip the step together (a lone skip would leave the others
  waiting); at the end the ranks compare digests of their weights and a divergence
  fails the stage;
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

from orchestrator.errors import StageFailed
from orchestrator.training.devices import resolve_device
from orchestrator.training.rank import Peers, Role, Solo

logger = logging.getLogger(__name__)
DDP_REPORT = "ddp.json"
GROUP_TIMEOUT = datetime.timedelta(minutes=10)  # a rank that died leaves the others waiting


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (ranks compare it)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Peers]:
    """This process's peers for one stage: `Solo` alone, else a DDP process group (opened
    here, torn down when the stage ends)."""
    if world_size() <= 1:
        yield Solo()
        return
    try:
        yield DdpPeers(_init_group(resolve_device(device)))
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


class DdpPeers:
    """One rank of a DDP process group (see the module docstring)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.seen: list[int] = []
        logger.info("rank %d of %d (%s) on %s", self.rank, self.world, backend,
                    socket.gethostname())

    def share(self, start: int, size: int) -> Iterable[int]:
        """This rank's share from the rank's own position `start` (samples it has drawn)."""
        self.seen = [] if start == 0 else self.seen
        return _RecordedShare(range(start * self.world + self.rank, size, self.world), self.seen)

    def any_stops(self, stop: Callable[[], bool] | None) -> Callable[[], bool]:
        def any_rank_stops() -> bool:
            flag = torch.tensor([1.0 if stop is not None and stop() else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return flag.item() > 0
        return any_rank_stops

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        # DDP broadcasts rank 0's parameters and buffers here: after the hand-off or resume
        device = next(model.parameters()).device  # this rank's GPU, or the CPU
        ids = [device.index or 0] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def agree_loss(self, loss: torch.Tensor) -> torch.Tensor:
        finite = torch.tensor([float(torch.isfinite(loss).all())])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return loss if finite.item() == 1.0 else loss * float("nan")

    def agree_row(self, row: dict[str, Any], best_dice: float) -> tuple[dict[str, Any], float]:
        shared: list[Any] = [row, best_dice]
        dist.broadcast_object_list(shared, src=0)
        return shared[0], shared[1]

    def settle(self, model: torch.nn.Module, stage_dir: Path, stage: str, role: Role) -> None:
        """Check every rank holds rank 0's weights; rank 0 writes ddp.json.

        Raises:
            StageFailed: the ranks' weights differ (gradients were not all-reduced).
        """
        # buffers (BatchNorm running statistics) follow rank 0, as DDP does before every
        # forward; parameters are not touched: they must already agree (all-reduce)
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
        mine = {"rank": self.rank, "host": socket.gethostname(),
                "weights_sha256": weights_digest(model.state_dict()),
                "samples_last_epoch": list(self.seen)}
        ranks: list[Any] = [None] * self.world
        dist.all_gather_object(ranks, mine)
        in_sync = len({r["weights_sha256"] for r in ranks}) == 1
        report = {"world_size": self.world, "backend": self.backend, "in_sync": in_sync,
                  "ranks": ranks}
        role.write_text(stage_dir / DDP_REPORT, json.dumps(report, indent=2))
        if not in_sync:
            raise StageFailed(f"stage {stage}: the {self.world} DDP ranks ended with "
                              f"different weights; see {stage_dir / DDP_REPORT}")

    def barrier(self) -> None:
        dist.barrier()  # final.pt exists for every rank once any of them returns
