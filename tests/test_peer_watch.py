"""A lost DDP rank ends the stage within the bound, naming the rank and its node (issue 24).

Real processes and real gloo on this machine, no SLURM: two ranks of
tests/peer_worker.py meet through training/distributed.py's rendezvous; the test kills,
stops or fails one of them and times how long the other takes to end, and with what line.
The same on the two-node SLURM cluster, with a rank that cannot start and ranks that
finish cleanly: tests/test_slurm_multinode.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.training.distributed import EXIT_PEER_LOST, RENDEZVOUS_DIR

WORKER = Path(__file__).with_name("peer_worker.py")
TIMEOUT_S = 8.0  # the profile's peer_timeout_s, small for the test


def _start(tmp_path: Path, rank: int, mode: str, key: str) -> subprocess.Popen:
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "ORCH_RANK_NODES": "nodeA,nodeB",
           "ORCH_RENDEZVOUS_KEY": key,
           "ORCH_RANK_LOGS": json.dumps([str(tmp_path / "rank0.log"), str(tmp_path / "rank1.log")]),
           "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115  # the child holds it
    return subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), mode, str(TIMEOUT_S)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_joined(tmp_path: Path, ranks: list[int], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all("joined" in (tmp_path / f"rank{r}.log").read_text() for r in ranks):
            return
        time.sleep(0.1)
    raise AssertionError("ranks did not join: " + " | ".join(
        (tmp_path / f"rank{r}.log").read_text()[-500:] for r in ranks))


def _ended(proc: subprocess.Popen, since: float) -> tuple[int, float]:
    rc = proc.wait(timeout=TIMEOUT_S + 30)
    return rc, time.monotonic() - since


def _last_line(tmp_path: Path, rank: int) -> str:
    return (tmp_path / f"rank{rank}.log").read_text().strip().splitlines()[-1]


@pytest.fixture
def pair(tmp_path: Path, request: pytest.FixtureRequest):
    procs: list[subprocess.Popen] = []

    def start(mode: str, ranks: tuple[int, ...] = (0, 1)) -> list[subprocess.Popen]:
        key = f"{request.node.name}.{os.getpid()}"
        procs.extend(_start(tmp_path, r, mode, key) for r in ranks)
        return procs

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()


@pytest.mark.parametrize("killed", [1, 0], ids=["follower killed", "writer killed"])
def test_a_killed_rank_ends_the_other_quickly_with_its_rank_and_node(tmp_path: Path, pair,
                                                                    killed: int) -> None:
    ranks = pair("loop")
    survivor = 1 - killed
    _wait_joined(tmp_path, [0, 1])
    t0 = time.monotonic()
    ranks[killed].kill()
    rc, took = _ended(ranks[survivor], t0)
    assert rc != 0 and took < TIMEOUT_S, (rc, took)  # its collective broke: no need to wait it out
    line = _last_line(tmp_path, survivor)
    node = "nodeB" if killed else "nodeA"
    assert f"rank {killed} (node {node}) was lost" in line and "orchestrator resume" in line, line
    # the writer records the line; with no writer left, the follower does
    assert (tmp_path / f"recorded.{survivor}").read_text() in line
    assert not list((tmp_path / RENDEZVOUS_DIR).glob("*.json"))  # no address left behind


def test_a_silent_rank_ends_the_other_within_the_bound(tmp_path: Path, pair) -> None:
    """A stopped process (a node that hangs) breaks no connection: the collective would
    wait 10 minutes; the peer watch ends the survivor, and its loader children, in time."""
    r0, r1 = pair("loop")
    _wait_joined(tmp_path, [0, 1])
    t0 = time.monotonic()
    r1.send_signal(signal.SIGSTOP)
    rc, took = _ended(r0, t0)
    assert rc == EXIT_PEER_LOST and TIMEOUT_S - 1 < took < TIMEOUT_S + 6, (rc, took)
    line = _last_line(tmp_path, 0)
    assert line.startswith("rank 1 (node nodeB) was lost: no heartbeat"), line
    assert (tmp_path / "recorded.0").read_text() == line


def test_a_failing_rank_is_named_with_its_error_at_once(tmp_path: Path, pair) -> None:
    r0, r1 = pair("fail")
    assert r1.wait(timeout=60) != 0
    rc, took = _ended(r0, time.monotonic())
    assert rc != 0 and took < TIMEOUT_S, (rc, took)
    line = _last_line(tmp_path, 0)
    assert "rank 1 (node nodeB) failed: ValueError: boom on purpose" in line, line
