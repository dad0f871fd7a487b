"""`orchestrator bench ddp`: samples per second of a stage with 1 rank against 2 ranks.

Each case runs the trainer's own path (`build_runner` in a `distributed.session`, then
`StageRunner.train_steps`: data, DDP step, all-reduce) in fresh processes of one CPU
thread each, at the same per-rank batch, so 2 ranks draw twice the samples per step:

- 1 rank: one process;
- 2 ranks: one process per rank, on two SLURM nodes (`srun --nodes=2`) where a cluster
  answers (the local one: n1 and n2), else two processes on this machine;

and reports samples per second of each, the scaling efficiency (2-rank samples/s over
twice the 1-rank's), and the share of a 2-rank step spent beyond the 1-rank step
(all-reduce and waiting for the slower rank), beside a direct measure: the median time
of one all-reduce of the model's gradients, over the 2-rank step.

Run as a module, it is one rank of a case (`python -m orchestrator.cli.bench.ddp worker`).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.atomic import atomic_write_text
from orchestrator.cli.bench.data import machine_info
from orchestrator.cli.bench.step import STAGE, _unplanned_plan
from orchestrator.config import load_plan, plan_to_yaml
from orchestrator.data.synth import synthesize_atlas
from orchestrator.launch.node import export_distributed_env
from orchestrator.training import distributed
from orchestrator.training.parts import build_runner
from orchestrator.training.rank import role_of

WARMUP_STEPS = 2


def bench_ddp(input_vox: int = 48, batch_size: int = 2, steps: int = 12, nodes: str = "auto",
              tmp_dir: Path | None = None) -> dict[str, Any]:
    """Samples/s of stage 1 with 1 and 2 ranks (one thread each); about a minute on 2 cores.

    Args:
        input_vox: side of the cubic patch; batch_size: samples per rank per step.
        steps: timed steps (after WARMUP_STEPS); nodes: "srun" (2 SLURM nodes), "local"
            (2 processes here) or "auto" (srun where `sinfo` answers).
        tmp_dir: where the data and the runs go (default: the system's temp; with srun it
            must be a folder every node sees, as a run directory is).

    Returns:
        {"bench": "ddp", "machine": {...}, "figures": {"samples_per_s_1_rank",
        "samples_per_s_2_ranks", "scaling_efficiency_ratio", "allreduce_share_ratio", ...}}.
    """
    launcher = _launcher(nodes)
    with tempfile.TemporaryDirectory(dir=tmp_dir or (Path.cwd() if launcher == "srun" else None),
                                     prefix=".bench-ddp-") as tmp:
        root = Path(tmp)
        synthesize_atlas(root / "data", subjects=3, shape_vox=(input_vox + 16,) * 3, seed=0)
        plan = _unplanned_plan(root, input_vox, batch_size)
        cases = {}
        for name in ("one", "two"):  # each case its own run: neither resumes the other
            case = plan.model_copy(update={"run": f"bench-ddp-{name}"})
            atomic_write_text(case.run_dir / "plan.yaml", plan_to_yaml(case))
            cases[name] = case.run_dir / "plan.yaml"
        one = _run_case(cases["one"], root / "one", 1, "local", steps)
        two = _run_case(cases["two"], root / "two", 2, launcher, steps)
    step1, step2 = one[0]["step_s"], max(r["step_s"] for r in two)
    sps1 = batch_size / step1
    sps2 = 2 * batch_size / step2
    allreduce_s = statistics.median(r["allreduce_s"] for r in two)
    figures = {"samples_per_s_1_rank": sps1, "samples_per_s_2_ranks": sps2,
               "speedup_ratio": sps2 / sps1, "scaling_efficiency_ratio": sps2 / (2 * sps1),
               "step_s_1_rank": step1, "step_s_2_ranks": step2,
               "allreduce_share_ratio": max(0.0, 1 - step1 / step2),
               "allreduce_alone_s": allreduce_s, "allreduce_alone_share_ratio": allreduce_s / step2,
               "params": float(one[0]["params"]), "input_vox": input_vox,
               "batch_per_rank": batch_size, "steps": steps}
    return {"bench": "ddp",
            "machine": {**machine_info(torch.__version__), "stage": STAGE, "threads_per_rank": 1,
                        "two_ranks_on": sorted({r["node"] for r in two}), "launcher": launcher},
            "figures": {k: round(float(v), 4) for k, v in figures.items()}}


def _launcher(nodes: str) -> str:
    if nodes != "auto":
        return nodes
    if shutil.which("srun") is None:
        return "local"
    try:
        ok = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True,
                            timeout=5).stdout.split()
    except (subprocess.SubprocessError, OSError):
        return "local"
    return "srun" if ok and sum(int(n) for n in ok if n.isdigit()) >= 2 else "local"


def _run_case(plan_path: Path, out: Path, ranks: int, launcher: str, steps: int) -> list[dict]:
    out.mkdir(parents=True)
    worker = [sys.executable, "-m", "orchestrator.cli.bench.ddp", "worker", str(plan_path),
              str(out), str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if launcher == "srun" and ranks > 1:
        cmd = ["srun", f"--nodes={ranks}", f"--ntasks={ranks}", "--ntasks-per-node=1",
               "--cpus-per-task=1", "--mem=2G", "--time=10", "--kill-on-bad-exit=1", *worker]
        procs = [subprocess.Popen(cmd, env=env, cwd=Path.cwd())]
    else:
        procs = []
        for rank in range(ranks):
            rank_env = {**env, "WORLD_SIZE": str(ranks), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "MASTER_ADDR": "127.0.0.1", "ORCH_RENDEZVOUS_KEY": f"bench.{os.getpid()}.{ranks}",
                        "ORCH_RANK_NODES": ",".join(["local"] * ranks)}
            procs.append(subprocess.Popen(worker, env=rank_env))
    codes = [p.wait(timeout=900) for p in procs]
    if any(codes):
        raise RuntimeError(f"bench ddp: the {ranks}-rank case exited {codes} ({launcher})")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _worker(plan_path: Path, out: Path, steps: int) -> None:
    """One rank: the stage's runner in a DDP session, timed over `steps` steps."""
    export_distributed_env()  # under srun: this task's rank
    torch.set_num_threads(1)
    with distributed.session("cpu", out, 120.0) as peers:
        runner = build_runner(load_plan(plan_path), STAGE, "cpu", role=role_of(peers.rank),
                              peers=peers)
        runner.start()
        runner.train_steps(max_steps=WARMUP_STEPS)
        t0 = time.perf_counter()
        runner.train_steps(max_steps=WARMUP_STEPS + steps)
        step_s = (time.perf_counter() - t0) / steps
        allreduce_s = 0.0
        if peers.world > 1:  # the gradients' all-reduce alone, as DDP sends it (fp32, summed)
            grads = torch.zeros(runner.sp.params or 1)
            times = []
            for _ in range(10):
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(grads)
                times.append(time.perf_counter() - t)
            allreduce_s = statistics.median(times)
        node = os.environ.get("SLURMD_NODENAME") or "local"
        atomic_write_text(out / f"rank{peers.rank}.json", json.dumps(
            {"rank": peers.rank, "node": node, "step_s": step_s, "allreduce_s": allreduce_s,
             "params": runner.sp.params}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        _worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -m orchestrator.cli.bench.ddp worker PLAN OUT STEPS")
