"""One DDP rank for tests/test_peer_watch.py, run as a script: `peer_worker.py DIR MODE TIMEOUT`.

It opens the stage's DDP session (training/distributed.py) from the environment the test
gives it, prints "joined", then all-reduces in a loop (or fails, as MODE says); a lost
peer is recorded into DIR/recorded.RANK.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.training import distributed

where, mode, timeout_s = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
rank = int(os.environ["RANK"])


def record(line: str) -> None:
    (where / f"recorded.{rank}").write_text(line)


with distributed.session("cpu", where, timeout_s, record) as peers:
    print("joined", flush=True)
    if mode == "fail" and rank == 1:
        raise ValueError("boom on purpose")
    for _ in range(10_000 if mode != "finish" else 20):
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == peers.world
        time.sleep(0.05)
print("finished", flush=True)
