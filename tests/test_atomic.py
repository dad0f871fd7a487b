"""Atomic writes: a signal handler that raises in the middle of a write (PyTorch's SIGCHLD
handler does when a DataLoader worker dies) runs after the write, which completes."""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
import torch

from orchestrator import atomic


class WorkerDied(RuntimeError):
    pass


@pytest.fixture
def raising_usr1() -> Iterator[list[str]]:
    """A SIGUSR1 handler that raises, as PyTorch's SIGCHLD handler does; it records when it ran."""
    ran: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        ran.append("handler")
        raise WorkerDied("DataLoader worker (pid 1234) is killed by signal: Killed.")

    previous = signal.signal(signal.SIGUSR1, handler)
    yield ran
    signal.signal(signal.SIGUSR1, previous)


def test_a_signal_during_torch_save_waits_for_the_checkpoint(tmp_path: Path,
                                                             raising_usr1: list[str]) -> None:
    """The handler's error comes after the file is whole, and it is the handler's error,
    not one about the zip file's positions."""
    path = tmp_path / "last.pt"
    state = {"weights": torch.arange(50_000, dtype=torch.float32), "epoch": 3}

    def writer(fh) -> None:  # noqa: ANN001
        fh.write(b"")  # the signal arrives once the write has begun
        os.kill(os.getpid(), signal.SIGUSR1)
        torch.save(state, fh)
        raising_usr1.append("written")

    with pytest.raises(WorkerDied, match="DataLoader worker"):
        atomic.atomic_write(path, writer)
    assert raising_usr1 == ["written", "handler"]
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], state["weights"])
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_handler_is_back_after_the_write(tmp_path: Path, raising_usr1: list[str]) -> None:
    """Outside a write the handler runs at once, as before."""
    atomic.atomic_write_text(tmp_path / "state.json", "{}")
    with pytest.raises(WorkerDied):
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(1000):  # Python runs the handler at the next bytecode boundary
            pass
    assert raising_usr1 == ["handler"]


def test_a_writer_that_fails_still_delivers_the_signal(tmp_path: Path,
                                                       raising_usr1: list[str]) -> None:
    """Both errors are kept: the handler's, with the write's as its context; the old file
    stays and no temporary file is left."""
    path = tmp_path / "state.json"
    atomic.atomic_write_text(path, "old")

    def writer(fh) -> None:  # noqa: ANN001
        os.kill(os.getpid(), signal.SIGUSR1)
        raise OSError(28, "No space left on device")

    with pytest.raises(WorkerDied) as caught:
        atomic.atomic_write(path, writer)
    assert isinstance(caught.value.__context__, OSError)
    assert path.read_text() == "old" and not list(tmp_path.glob(".tmp-*"))


def test_every_pending_handler_runs_though_one_raises(tmp_path: Path,
                                                     raising_usr1: list[str]) -> None:
    """A dead worker (raising) and a preemption signal (setting a flag) arrive during one
    write: the flag is set too, and the worker's error is raised."""
    stop: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: stop.append(signum))
    try:
        def writer(fh) -> None:  # noqa: ANN001
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR2)
            fh.write(b"whole")

        with pytest.raises(WorkerDied):
            atomic.atomic_write(tmp_path / "last.pt", writer)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert raising_usr1 == ["handler"] and stop == [signal.SIGUSR2]
    assert (tmp_path / "last.pt").read_bytes() == b"whole"
