"""What a stage finds when it starts again, or when a helper process dies under it.

- progress that state.json records but whose last.pt is gone: an error, not a silent
  fresh start (`resume --fresh` starts over on purpose);
- temporary files of writes killed mid-way (kill -9, a node failure): removed;
- a DataLoader worker that died or hung: the StageFailed that says what to change.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from orchestrator.config import Plan
from orchestrator.errors import CheckpointError, StageFailed
from orchestrator.runs.state import STATE_FILE

logger = logging.getLogger(__name__)


def refuse_lost_progress(last: Path, entry: dict[str, Any], plan: Plan, stage: str) -> None:
    """No last.pt: fine for a stage that never wrote one.

    Raises:
        CheckpointError: the stage's state.json entry says it reached an epoch or wrote a
            last.pt; the message names the file and the command that starts over on purpose.
    """
    epoch = int(entry.get("epoch") or 0)
    if epoch <= 0 and not entry.get("last_checkpoint"):
        return
    got = f"epoch {epoch}" if epoch > 0 else "a written last.pt"
    raise CheckpointError(
        f"{last}: checkpoint not found, but {plan.run_dir / STATE_FILE} says stage {stage} "
        f"reached {got}; restore the file, or start the stage over on purpose with "
        f"`orchestrator resume {plan.run} --fresh {stage} --runs-dir {plan.runs_dir}`")


def remove_stale_temp_files(folders: list[Path], stage: str) -> None:
    """Delete the temporary files (`.tmp-*`) of interrupted writes in a stage's folders: a
    stage's folders have one writer, the process starting it, so none is in use."""
    for folder in folders:
        for tmp in folder.glob(".tmp-*") if folder.is_dir() else ():
            logger.info("%s: removing %s, left by an interrupted write", stage, tmp.name)
            tmp.unlink(missing_ok=True)


def loader_failure(err: BaseException, stage: str) -> StageFailed | None:
    """A DataLoader worker that died or hung, as the StageFailed that says what to change;
    None for any other error. PyTorch notices a dead worker in `next()`, or anywhere in
    the main process through its SIGCHLD handler (then in the middle of a step)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not isinstance(err, RuntimeError) or not ("DataLoader worker" in first
                                                 or "DataLoader timed out" in first):
        return None
    return StageFailed(
        f"stage {stage}: {first}. A data loader worker died or hung (often out of host "
        "memory): set num_workers: 0 (or fewer) in the stage YAML, or give the job more "
        "memory (mem_gb in the cluster profile)")
