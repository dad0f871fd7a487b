"""What one process of a stage is: its role (who writes) and its peers (who it trains with).

A stage runs as one process, or as several DDP ranks (training/distributed.py). The
runner is the same in both cases; what differs is passed in as two objects:

- the role: `Writer` (the only process, or rank 0) writes checkpoints, state.json,
  metrics, split and hand-off files, and validates; `Follower` (every other rank) trains
  its share and writes nothing;
- the peers: `Solo` (alone) or `distributed.DdpPeers` (a process group), behind the
  `Peers` protocol: which samples this process draws, whether any process asked to
  stop, the metrics row every process agrees on, and the check before final.pt.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from orchestrator.atomic import atomic_write_text
from orchestrator.runs import state as run_state
from orchestrator.training import checkpoints as ck
from orchestrator.training.metrics_log import MetricsLog
from orchestrator.training.recovery import remove_stale_temp_files


class Role(Protocol):
    """Who writes a stage's files: the writer does, a follower does nothing."""

    writes: bool

    def record(self, run_dir: Path, stage: str, counter: str | None = None,
               **fields: Any) -> dict[str, Any]: ...

    def save_checkpoint(self, path: Path, payload: Callable[[], dict[str, Any]]) -> None: ...

    def write_text(self, path: Path, text: str) -> None: ...

    def remove(self, *paths: Path) -> None: ...

    def remove_stale_temp_files(self, dirs: list[Path], stage: str) -> None: ...

    def metrics_log(self, stage_dir: Path) -> MetricsLog: ...


class Writer:
    """The process that writes: the only one, or DDP rank 0."""

    writes = True

    def record(self, run_dir: Path, stage: str, counter: str | None = None,
               **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the stage's state.json entry (incrementing `counter`, if given)."""
        if counter:
            return run_state.bump_stage(run_dir, stage, counter, **fields)
        return run_state.update_stage(run_dir, stage, **fields)

    def save_checkpoint(self, path: Path, payload: Callable[[], dict[str, Any]]) -> None:
        ck.save_checkpoint(path, payload())

    def write_text(self, path: Path, text: str) -> None:
        atomic_write_text(path, text)

    def remove(self, *paths: Path) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def remove_stale_temp_files(self, dirs: list[Path], stage: str) -> None:
        remove_stale_temp_files(dirs, stage)

    def metrics_log(self, stage_dir: Path) -> MetricsLog:
        return MetricsLog(stage_dir)


class _QuietLog(MetricsLog):
    """A follower keeps the rows in memory (for early stopping) and writes nothing."""

    def _flush(self) -> None:
        pass


class Follower:
    """A DDP rank other than 0: it trains its share and writes nothing."""

    writes = False

    def record(self, run_dir: Path, stage: str, counter: str | None = None,
               **fields: Any) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, path: Path, payload: Callable[[], dict[str, Any]]) -> None:
        pass

    def write_text(self, path: Path, text: str) -> None:
        pass

    def remove(self, *paths: Path) -> None:
        pass

    def remove_stale_temp_files(self, dirs: list[Path], stage: str) -> None:
        pass

    def metrics_log(self, stage_dir: Path) -> MetricsLog:
        return _QuietLog(stage_dir)


def role_of(rank: int) -> Role:
    """Rank 0 writes; the others follow."""
    return Writer() if rank == 0 else Follower()


class Peers(Protocol):
    """The processes a stage trains with: none (`Solo`) or a DDP group."""

    rank: int
    world: int

    def share(self, start: int, size: int) -> Iterable[int]:
        """This process's sample indices of an epoch of `size`, from its position `start`."""
        ...

    def any_stops(self, stop: Callable[[], bool] | None) -> Callable[[], bool] | None:
        """A stop check that turns true on every process once one of them asks to stop."""
        ...

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the step runs (after the weights are loaded): `model` or its DDP."""
        ...

    def agree_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss, made non-finite where it is non-finite on any process."""
        ...

    def agree_row(self, row: dict[str, Any], best_dice: float) -> tuple[dict[str, Any], float]:
        """The writer's metrics row and best Dice, on every process."""
        ...

    def settle(self, model: torch.nn.Module, stage_dir: Path, stage: str, role: Role) -> None:
        """Before final.pt: check that every process holds the same weights."""
        ...

    def barrier(self) -> None:
        """Wait until every process got here (final.pt is written)."""
        ...


class Solo:
    """A stage trained by one process: it has nobody to agree with."""

    rank, world = 0, 1

    def share(self, start: int, size: int) -> Iterable[int]:
        return range(start, size)

    def any_stops(self, stop: Callable[[], bool] | None) -> Callable[[], bool] | None:
        return stop

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def agree_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def agree_row(self, row: dict[str, Any], best_dice: float) -> tuple[dict[str, Any], float]:
        return row, best_dice

    def settle(self, model: torch.nn.Module, stage_dir: Path, stage: str, role: Role) -> None:
        pass

    def barrier(self) -> None:
        pass
