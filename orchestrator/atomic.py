"""Atomic file writes: temp file in the same folder + fsync + rename.

A bottom-layer utility (it imports nothing of the orchestrator): data, planning, training,
runs and launch all write through it.

A reader (a requeued job, `status`, the next stage) sees either the old file or the
complete new one, never a truncated one, even if the writer is killed mid-write.

A Python signal handler that fires during `atomic_write` (checkpoints, state.json, plans:
a writer given the open file) runs after it: PyTorch's SIGCHLD handler raises when a
DataLoader worker dies, and raised inside `torch.save`'s write it left an unwritten
checkpoint and an error about zip positions instead of the dead worker. `atomic_path`
(a library writing by path: NIfTI, HDF5, PNG) does not wait: those writes can take
minutes, and an error raised in them only abandons the temporary file.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    Args:
        path: the final file.
        suffix: ending of the temporary name (some writers choose the format by it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def signal_handlers_deferred() -> Iterator[None]:
    """Run the Python signal handlers of signals that arrive inside the block after it, in
    the order the signals came (in the main thread, the only one where Python runs them;
    elsewhere, a no-op). No signal is lost: every pending handler runs, and the first
    error one raised is raised after the block, where the caller's error handling sees it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, FrameType | None]] = []

    def later(signum: int, frame: FrameType | None) -> None:
        pending.append((signum, frame))

    handlers: dict[int, Callable[[int, FrameType | None], Any]] = {}
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(signum)
            if callable(handler):
                handlers[signum] = handler
                signal.signal(signum, later)
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        first: BaseException | None = None
        for number, frame in pending:
            try:
                handlers[number](number, frame)
            except BaseException as exc:  # noqa: BLE001  (the others still run; raised below)
                first = first or exc
        if first is not None:
            raise first


def atomic_write(path: Path | str, writer: Callable[[IO[bytes]], Any]) -> None:
    """Write `path` atomically with `writer(file_object)`; signal handlers wait for it."""
    with signal_handlers_deferred(), atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """torch.save through a temporary file, so a killed job never leaves a truncated .pt."""
    import torch  # deferred: the planner and `status` write files without importing torch

    atomic_write(path, lambda fh: torch.save(obj, fh))
