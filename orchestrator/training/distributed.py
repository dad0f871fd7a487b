"""DistributedDataParallel for a stage whose job runs several tasks (one per GPU, or CPU),
on one node or several.

The launcher (launch/node.py) exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (the first
node of the job) and where every rank runs (`ORCH_RANK_NODES`, `ORCH_RANK_LOGS`, the
attempt's `ORCH_RENDEZVOUS_KEY`); with WORLD_SIZE > 1 `session()` opens the process group
and yields this rank's `DdpPeers` (training/rank.py's `Peers`), which `run_stage` passes to
the runner with the rank's role (rank 0 the writer, the others followers):

- the ranks meet at rank 0's store: rank 0 opens a TCPStore on a port the OS gives it
  (two jobs sharing a node can never both take it) and publishes host and port in the
  stage folder (shared by every node, as the run directory must be), under the attempt's
  key, so a requeued job never reads an old address. Without a key (torchrun), MASTER_PORT
  is used as torch.distributed does (env://);
- every rank joins within the profile's `peer_timeout_s`, or the stage ends naming the
  ranks that did not, their nodes and logs (a broken environment on one node);
- a lost rank (its node, or its process) ends the stage within `peer_timeout_s`: every rank
  beats a heartbeat through the store and watches the others' (`PeerWatch`); a rank that
  fails says so in the store first. The survivors end with one line naming the lost rank
  and its node, leaving no process behind, instead of waiting out the collective timeout;

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
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from orchestrator.atomic import atomic_write_text
from orchestrator.errors import PeerLost, StageFailed
from orchestrator.training.devices import resolve_device
from orchestrator.training.rank import Peers, Role, Solo

logger = logging.getLogger(__name__)
DDP_REPORT = "ddp.json"
RENDEZVOUS_DIR = ".rendezvous"
# A collective's own timeout: long, since PeerWatch ends a stage whose peer is lost.
GROUP_TIMEOUT = datetime.timedelta(minutes=10)
EXIT_PEER_LOST = 1  # a rank that ends its process because a peer was lost
QUICK_VERDICT_S = 5.0  # after a collective failed: a heartbeat this stale is a lost rank


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_nodes() -> list[str]:
    """The nodes this stage's ranks run on, in rank order, each once (this node alone
    outside DDP)."""
    nodes = Layout.from_env().nodes
    here = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return list(dict.fromkeys(nodes)) if world_size() > 1 and nodes else [here]


@dataclass(frozen=True)
class Layout:
    """Where the ranks of this stage run, as the launcher exported it."""

    rank: int
    world: int
    local_rank: int
    master: str  # rank 0's host
    key: str | None  # this attempt's rendezvous key; None: env:// (torchrun)
    nodes: tuple[str, ...]  # the node of each rank
    logs: tuple[str, ...]  # the log of each rank (or one for all)

    @classmethod
    def from_env(cls) -> Layout:
        env = os.environ
        world = world_size()
        logs = json.loads(env.get("ORCH_RANK_LOGS", "[]") or "[]")
        return cls(rank=int(env.get("RANK", "0")), world=world,
                   local_rank=int(env.get("LOCAL_RANK", "0")),
                   master=env.get("MASTER_ADDR", "127.0.0.1"),
                   key=env.get("ORCH_RENDEZVOUS_KEY") or None,
                   nodes=tuple(filter(None, env.get("ORCH_RANK_NODES", "").split(","))),
                   logs=tuple(str(x) for x in logs))

    def node(self, rank: int) -> str:
        return self.nodes[rank] if rank < len(self.nodes) else "?"

    def log(self, rank: int) -> str | None:
        if len(self.logs) == self.world:
            return self.logs[rank]
        return self.logs[0] if self.logs else None

    def who(self, rank: int) -> str:
        return f"rank {rank} (node {self.node(rank)})"


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (ranks compare it)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


Record = Callable[[str], None]


@contextlib.contextmanager
def session(device: str = "auto", where: Path | None = None, peer_timeout_s: float = 60.0,
            record: Record | None = None) -> Iterator[Peers]:
    """This process's peers for one stage: `Solo` alone, else a DDP process group (opened
    here, torn down when the stage ends).

    `where`: the stage folder (the rendezvous file); `peer_timeout_s`: how long a rank may
    be silent, or late to join, before the stage ends; `record(line)`: how a lost peer is
    recorded (state.json), called by the writer, or by a follower when rank 0 is lost.

    Raises:
        PeerLost: a rank did not join, failed, or was lost (one line: rank, node, log).
    """
    if world_size() <= 1:
        yield Solo()
        return
    layout = Layout.from_env()
    watch: PeerWatch | None = None
    ok = False
    try:
        try:
            backend, store = _init_group(resolve_device(device), layout, where, peer_timeout_s)
        except PeerLost as err:  # a rank did not start: recorded as a lost one is
            if record is not None and (layout.rank == 0 or 0 in err.lost):
                record(str(err))
            raise
        if store is not None:
            watch = PeerWatch(store, layout, peer_timeout_s, record)
        yield DdpPeers(backend, layout)
        ok = True
    except BaseException as err:
        if watch is None or isinstance(err, PeerLost):
            raise
        watch.failed(f"{type(err).__name__}: {err}")  # the others' watches read it at once
        # a collective that broke: was it a peer that went? (else: this rank's own error)
        line = watch.explain() if collective_failure(err) else None
        if line is None:
            raise
        raise PeerLost(line) from err
    finally:
        if watch is not None:
            watch.stop(done=ok)
        if dist.is_available() and dist.is_initialized():
            if ok:  # every watch is stopped before rank 0 (the store) goes away
                dist.barrier()
            dist.destroy_process_group()


def collective_failure(err: BaseException) -> bool:
    """A collective's error, as when a peer's connection went (gloo raises RuntimeError):
    the session, not the trainer, says what happened (training/trainer.py)."""
    text = str(err)
    return isinstance(err, dist.DistError) or isinstance(err, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer",
                                  "Broken pipe", "gloo", "NCCL"))


def _init_group(device: torch.device, layout: Layout, where: Path | None,
                timeout_s: float) -> tuple[str, dist.TCPStore | None]:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # "cuda" then means this rank's GPU
        torch.cuda.set_device(layout.local_rank % torch.cuda.device_count())
    store = None
    if not dist.is_initialized():
        if layout.key is None or where is None:  # torchrun: MASTER_PORT is given
            dist.init_process_group(backend=backend, init_method="env://", timeout=GROUP_TIMEOUT)
        else:
            store = rendezvous(layout, where, timeout_s)
            dist.init_process_group(backend=backend, store=store, rank=layout.rank,
                                    world_size=layout.world, timeout=GROUP_TIMEOUT)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
    if cpus and device.type == "cpu":  # the ranks share the node's cores
        torch.set_num_threads(cpus)
    return backend, store


def rendezvous(layout: Layout, where: Path, timeout_s: float) -> dist.TCPStore:
    """The ranks' store: rank 0 opens it on a port the OS chooses and publishes its address
    under this attempt's key; every rank then joins it within `timeout_s`.

    Raises:
        PeerLost: a rank did not join in time (named with its node and log).
    """
    path = where / RENDEZVOUS_DIR / f"{layout.key}.json"
    timeout = datetime.timedelta(seconds=timeout_s)
    deadline = time.monotonic() + timeout_s
    if layout.rank == 0:
        store = dist.TCPStore(layout.master, 0, layout.world, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        atomic_write_text(path, json.dumps({"host": layout.master, "port": store.port,
                                            "pid": os.getpid()}))
    else:
        while not path.exists():
            if time.monotonic() > deadline:
                raise PeerLost(_not_started(layout, [0], timeout_s, path), [0])
            time.sleep(0.2)
        addr = json.loads(path.read_text())
        store = dist.TCPStore(addr["host"], int(addr["port"]), layout.world, is_master=False,
                              timeout=timeout)
    store.set(f"joined/{layout.rank}", layout.node(layout.rank))
    store.add("joined", 1)
    while store.add("joined", 0) < layout.world:
        if time.monotonic() > deadline:
            missing = [r for r in range(layout.world) if not store.check([f"joined/{r}"])]
            raise PeerLost(_not_started(layout, missing, timeout_s, path), missing)
        time.sleep(0.1)
    if layout.rank == 0:  # everyone has the address: the next attempt has its own key
        path.unlink(missing_ok=True)
    return store


def _not_started(layout: Layout, missing: list[int], timeout_s: float, path: Path) -> str:
    logs = sorted({log for r in missing if (log := layout.log(r))})
    return (f"{', '.join(layout.who(r) for r in missing)} did not join the stage within "
            f"{timeout_s:.0f} s (peer_timeout_s; rendezvous {path}): it could not start there"
            + (f"; its log: {', '.join(logs)}" if logs else ""))


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

    def __init__(self, backend: str, layout: Layout | None = None) -> None:
        self.backend = backend
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.node = layout.node(self.rank) if layout else socket.gethostname()
        self.seen: list[int] = []
        logger.info("rank %d of %d (%s) on node %s", self.rank, self.world, backend, self.node)

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
        mine = {"rank": self.rank, "host": socket.gethostname(), "node": self.node,
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


class PeerWatch:
    """Heartbeats through the ranks' store, and the verdict when a peer is lost.

    A thread beats this rank's counter every `every_s` and reads the others'. A peer is
    lost when its counter has not moved for `timeout_s` (5 s once this rank's own
    collective failed: the peer's process is then most likely gone), when it said in the
    store that it failed, or, for rank 0, when its store no longer answers (the store lives
    in rank 0's process). A rank that ended cleanly says so first and is not watched.

    On a verdict while the main thread waits in a collective that may never return, the
    watch ends the process itself: the line is recorded (state.json) and printed last, the
    rank's own children (loader workers) are killed, and it exits with EXIT_PEER_LOST.
    When the main thread's collective failed instead, it asks `explain()` and raises.
    """

    def __init__(self, store: dist.TCPStore, layout: Layout, timeout_s: float,
                 record: Record | None) -> None:
        self.layout, self.timeout_s, self._record = layout, timeout_s, record
        self.every_s = max(0.2, min(2.0, timeout_s / 10))
        # its own connection: the main thread's store may be busy in a collective
        self._store = dist.TCPStore(store.host, store.port, layout.world, is_master=False,
                                    timeout=datetime.timedelta(seconds=max(2.0, self.every_s * 3)))
        self._halt = threading.Event()
        self._explaining = threading.Event()
        self._decided = threading.Event()
        self.verdict: str | None = None
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)
        self._thread.start()

    def failed(self, why: str) -> None:
        """Tell the others that this rank fails (they stop at once, naming it)."""
        with contextlib.suppress(RuntimeError):  # rank 0's store may be gone already
            self._store.set(f"failed/{self.layout.rank}", why[:300])

    def explain(self) -> str | None:
        """After a collective failed: the verdict on the peers (waiting for it up to the
        timeout), or None when every peer is alive (the failure was something else)."""
        self._explaining.set()
        self._decided.wait(self.timeout_s + 2 * self.every_s)
        return self.verdict

    def stop(self, done: bool) -> None:
        if done:
            with contextlib.suppress(RuntimeError):
                self._store.set(f"done/{self.layout.rank}", "1")
        self._halt.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        me, lay = self.layout.rank, self.layout
        others = [r for r in range(lay.world) if r != me]
        last: dict[int, tuple[int, float]] = {r: (-1, time.monotonic()) for r in others}
        store_down_since: float | None = None
        while not self._halt.wait(self.every_s):
            now = time.monotonic()
            limit = QUICK_VERDICT_S if self._explaining.is_set() else self.timeout_s
            verdict: tuple[int, str] | None = None  # (the lost rank, what happened)
            try:
                self._store.add(f"hb/{me}", 1)
                for r in others:
                    if self._store.check([f"failed/{r}"]):
                        why = self._store.get(f"failed/{r}").decode(errors="replace")
                        verdict = (r, f"failed: {why}")
                        break
                    if self._store.check([f"done/{r}"]):
                        last[r] = (-2, now)
                        continue
                    beats = self._store.add(f"hb/{r}", 0)
                    if beats != last[r][0]:
                        last[r] = (beats, now)
                    elif now - last[r][1] > limit:
                        verdict = (r, f"was lost: no heartbeat for {now - last[r][1]:.0f} s")
                        break
                store_down_since = None
            except RuntimeError as err:  # DistNetworkError, DistStoreError: rank 0's store
                if me == 0:
                    continue
                store_down_since = store_down_since or now
                if now - store_down_since >= min(limit, 2 * self.every_s):
                    detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
                    verdict = (0, f"was lost: its store stopped answering ({detail})")
            if verdict is not None:
                self._decide(*verdict)
                return

    def _decide(self, lost: int, what: str) -> None:
        lay = self.layout
        line = (f"{lay.who(lost)} {what}; {lay.who(lay.rank)} ends the stage; "
                "`orchestrator resume` continues from last.pt")
        self.verdict = line
        # the writer records; a follower only when the writer itself is gone unannounced
        # (a writer that failed recorded its own error)
        if self._record is not None and (lay.rank == 0 or (lost == 0 and not what.startswith("failed"))):
            with contextlib.suppress(Exception):
                self._record(line)
        self._decided.set()
        if self._explaining.is_set():
            return  # the main thread raises PeerLost(line)
        # the main thread may wait in a collective for GROUP_TIMEOUT: end the process here
        logger.error("%s", line)
        print(line, file=sys.stderr, flush=True)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)
