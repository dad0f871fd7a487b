"""Shared parts of the reliability suite: the tally, kills, and what must hold after one.

Kills: a stage (or `data cache`) runs in a child process forked from a fork server that
imported torch, MONAI and the orchestrator once (saving ~5 s of imports per child on 2
cores); the child is then killed with SIGKILL, either from outside at a seeded random
moment, or by itself at a chosen point inside an atomic write (`KillPoint`): half-way
through writing the temporary file, or with the temporary file complete but not yet
renamed. SIGKILL runs no handler, no `finally` and no atexit: what is on disk afterwards
is what a `kill -9`, an OOM kill or a node failure leaves.
"""
from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Counts for the summary line (tests/conftest.py prints it at the end of the session).
TALLY = {"kills": 0, "kinds": 0, "lost": 0}
KILLS = int(os.environ.get("RELIABILITY_KILLS", "20"))  # the full run: RELIABILITY_KILLS=60
SEED = int(os.environ.get("RELIABILITY_SEED", "15"))
PRELOAD = ["torch", "torch._dynamo", "monai", "h5py", "nibabel", "orchestrator.training.trainer",
           "orchestrator.data.cache", "orchestrator.training.checkpoints"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread in this test (and `ONE_THREAD` for its subprocesses): on 2 shared
    cores, a second thread only spins waiting for the other (a stage runs 5x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # env of a subprocess


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """`orchestrator ARGV` through the console entry point (`orchestrator.cli:main`) in this
    process, without an interpreter's start-up: (exit code, stdout, stderr)."""
    import sys

    from orchestrator.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}  # run-stage's
    old_argv = sys.argv
    sys.argv = ["orchestrator", *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old_argv
        for s, h in handlers.items():
            signal.signal(s, h)
    got = capsys.readouterr()
    return int(exc.value.code or 0), got.out, got.err


def summary_line() -> str:
    return (f"reliability: {TALLY['kills']} kills survived, {TALLY['kinds']} bad-input kinds "
            f"answered, {TALLY['lost']} lost (seed {SEED}; RELIABILITY_KILLS={KILLS})")


_CTX: list[Any] = []


def context() -> Any:
    """The fork-server multiprocessing context (started once, with the imports done)."""
    if not _CTX:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _CTX.append(ctx)
    return _CTX[0]


@dataclass(frozen=True)
class KillPoint:
    """Kill the child inside its `nth` (1-based) atomic write of a file named `name`.

    Attributes:
        name: the final file's name ("last.pt", "state.json", "metrics.csv", ...).
        nth: which write of that file.
        phase: "mid" (part of the temporary file written) or "before_rename" (temporary
            file complete and fsynced, not renamed).
    """

    name: str
    nth: int
    phase: str


def noop() -> None:
    """A child that does nothing (starts the fork server)."""


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _HalfWriter:
    """A file object that dies half-way through the data written to it."""

    def __init__(self, fh: Any, after_bytes: int) -> None:
        self.fh, self.left = fh, after_bytes

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= self.left:
            self.fh.write(view[: self.left])
            self.fh.flush()
            os.fsync(self.fh.fileno())
            _die()
        self.left -= len(view)
        return self.fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


def arm(point: KillPoint | None) -> None:
    """In the child: make the `point.nth` atomic write of `point.name` kill the process."""
    if point is None:
        return
    from orchestrator import atomic

    real_write, real_path = atomic.atomic_write, atomic.atomic_path
    seen = [0]

    def hit(path: Any) -> bool:
        name = Path(path).name
        if name != point.name and not (point.name.startswith("*") and name.endswith(point.name[1:])):
            return False
        seen[0] += 1
        return seen[0] == point.nth

    @contextlib.contextmanager
    def atomic_path(path: Any, suffix: str = "") -> Any:  # the cache's HDF5 files
        if not hit(path):
            with real_path(path, suffix) as tmp:
                yield tmp
            return
        with real_path(path, suffix) as tmp:
            yield tmp  # the writer fills it
            if point.phase == "mid":
                os.truncate(tmp, tmp.stat().st_size // 2)
            _die()

    def atomic_write(path: Any, writer: Any) -> None:
        if not hit(path):
            real_write(path, writer)
            return
        if point.phase == "mid":
            with real_path(path) as tmp, open(tmp, "wb") as fh:
                writer(_HalfWriter(fh, 64))
        with real_path(path) as tmp, open(tmp, "wb") as fh:  # before_rename (or a tiny file)
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
            _die()

    atomic.atomic_write = atomic_write
    if point.name.startswith("*"):
        from orchestrator.data import cache

        cache.atomic_path = atomic_path


def stage_child(plan_path: str, stage: str, point: KillPoint | None) -> None:
    import logging

    import torch

    from orchestrator.training.trainer import run_stage

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # 2 shared cores: threads would only wait on each other
    arm(point)
    run_stage(plan_path, stage)


def claim_at(run_dir: str, start_at: float) -> str:
    """Claim the run (as `submit` does) at the wall-clock time `start_at`; "claimed" or
    the refusal's message."""
    import time

    from orchestrator.errors import SubmissionError
    from orchestrator.runs import state as run_state

    while time.time() < start_at:
        pass
    try:
        run_state.claim_run(Path(run_dir), executor="slurm", submitted=run_state.now_iso())
    except SubmissionError as err:
        return str(err)
    return "claimed"


def _cache_child(root: str, out: str, point: KillPoint | None) -> None:
    from orchestrator.data.cache import build_cache

    arm(point)
    build_cache(Path(root), Path(out))


def run_cache_child(root: Path, out: Path, point: KillPoint | None = None,
                    kill_after_s: float | None = None) -> int:
    return run_child(_cache_child, (str(root), str(out), point), kill_after_s)


def run_child(target: Any, args: tuple, kill_after_s: float | None = None,
              timeout_s: float = 120) -> int:
    """Run `target(*args)` in a forked child; SIGKILL it after `kill_after_s` if given.

    Returns:
        The child's exit code (-9: killed).
    """
    proc = context().Process(target=target, args=args)
    proc.start()
    proc.join(kill_after_s if kill_after_s is not None else timeout_s)
    if proc.is_alive() and kill_after_s is not None:
        proc.kill()
        proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        raise AssertionError(f"child {target.__name__}{args} hung for {timeout_s} s")
    return int(proc.exitcode)


def run_stage_child(plan_path: Path, stage: str, point: KillPoint | None = None,
                    kill_after_s: float | None = None) -> int:
    return run_child(stage_child, (str(plan_path), stage, point), kill_after_s)


# --- what must hold after a kill -------------------------------------------------------------

def check_stage_after_kill(run_dir: Path, stage: str, before: dict[str, Any]) -> dict[str, Any]:
    """Every checkpoint loads, state.json parses and tells the truth, metrics.csv parses.

    Args:
        before: what the previous check returned ({} the first time): progress must never
            go backwards (nothing that was saved is lost).

    Returns:
        {"position": (epoch, step) of last.pt or None, "epoch": state's epoch}.
    """
    from orchestrator.training.checkpoints import load_checkpoint

    ckpts = run_dir / stage / "checkpoints"
    loaded = {p.name: load_checkpoint(p) for p in sorted(ckpts.glob("*.pt"))} if ckpts.is_dir() else {}
    state_path = run_dir / "state.json"
    entry = json.loads(state_path.read_text())["stages"].get(stage, {}) if state_path.exists() else {}
    position = None
    if "last.pt" in loaded:
        pr = loaded["last.pt"]["progress"]
        position = (pr["epoch"], pr["step_in_epoch"])
    old = before.get("position")
    if old is not None:
        assert position is not None and position >= old, f"last.pt went back: {old} -> {position}"
    epoch = int(entry.get("epoch") or 0)
    if epoch:  # state.json never claims an epoch that last.pt does not hold
        assert position is not None and position[0] >= epoch, (entry, position)
    if entry.get("state") == "COMPLETED":
        assert "final.pt" in loaded, entry
    if entry.get("last_checkpoint"):
        assert "last.pt" in loaded, entry
    metrics = run_dir / stage / "metrics.csv"
    if metrics.exists():
        with open(metrics, newline="") as fh:
            epochs = [int(r["epoch"]) for r in csv.DictReader(fh)]
        assert epochs == list(range(1, len(epochs) + 1)), epochs
        assert position is None or len(epochs) <= position[0] + 1, (epochs, position)
    return {"position": position, "epoch": epoch}


def next_kill(rng: random.Random, i: int, run_s: float, writes: dict[str, int]) -> Any:
    """The `i`-th seeded kill: every third one from outside at a random moment of a run
    (`run_s` long), the others inside a random write of a random file (`writes`: file name
    -> how many writes of it a resumed child makes at least), in one of the two phases."""
    if i % 3 == 0:
        return round(rng.uniform(0.05, run_s), 3)
    name = rng.choice(sorted(writes))
    return KillPoint(name, rng.randint(1, writes[name]), rng.choice(["mid", "before_rename"]))
