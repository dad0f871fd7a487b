"""`orchestrator bench status`: how long `status` takes over many runs on disk.

It writes `n_runs` realistic runs into a temporary folder (the real curriculum's
plan.yaml, a state.json with SLURM job ids, metrics.csv with one row per epoch, final.pt
for the stages that finished; a mix of completed, running, failed and pending runs) and
times `collect_status` and the command line (`python -m orchestrator status`, a fresh
process: import, read, render) in three SLURM situations:

- `unavailable`: no sacct (not installed, or failing): the on-disk state is shown;
- `rate_limited`: sacct answered less than `SACCT_MIN_INTERVAL_S` ago: its cached answer
  is used and sacct is not called;
- `live`: one real batched sacct call (only where sacct is installed).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import (
    DEFAULT_CURRICULUM,
    Plan,
    StagePlan,
    load_curriculum,
    plan_to_yaml,
    resolve_cluster,
)
from orchestrator.launch.sacct import SACCT_MIN_INTERVAL_S, rate_limited_sacct, sacct_states
from orchestrator.planning.probe import usable_cpus
from orchestrator.runs import state as run_state
from orchestrator.runs.status import collect_status

EPOCHS = 100
JOB_ID_BASE = 900_000  # ids no real job has on a test cluster: sacct answers with nothing


def _plan_yaml(run: str, runs_dir: Path) -> str:
    """The real curriculum's stages, planned with fixed plausible numbers (no estimation)."""
    _, stages = load_curriculum(DEFAULT_CURRICULUM)
    cluster, _ = resolve_cluster("generic-slurm")
    planned = [StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=init,
                         input_size_vox=spec.input_size_vox, base_filters=spec.base_filters,
                         batch_size=spec.batch_size, checkpointing=i >= 2, amp=True,
                         params=int(0.5e6 * 3**i), predicted_gb=6.0 + 4 * i,
                         reasons=[f"fits {20} GB at batch {spec.batch_size}",
                                  "gradient checkpointing: activations exceed the budget"])
               for i, (spec, init) in enumerate(stages)]
    probe = {"gpus": [{"name": "NVIDIA A100-SXM4-40GB", "total_gb": 40.0, "free_gb": 39.4,
                          "bf16": True}],
             "gpu_error": None, "host_total_gb": 512.0, "host_available_gb": 480.0, "cpus": 64,
             "slurm": {"job_id": "123456", "partition": "gpu"}}
    plan = Plan(run=run, created="2026-11-22T10:00:00+0000", device="cuda", budget_gb=20.0,
                data_dir="/data/ATLAS_2", runs_dir=str(runs_dir), curriculum=str(DEFAULT_CURRICULUM),
                cluster=cluster, probe=probe, assumptions={"budget_source": "--target-mem"},
                stages=planned)
    return plan_to_yaml(plan)


def _metrics_csv(epochs: int) -> str:
    rows = ["epoch,train_loss,lr,val_dice,val_subjects,seconds,peak_mem_gb,peak_reserved_gb"]
    rows += [f"{e},{1.2 / e:.6f},{1e-3 / e:.3e},{0.6 * e / epochs:.6f},131,812.4,17.9,19.2"
             for e in range(1, epochs + 1)]
    return "\n".join(rows) + "\n"


def make_runs(runs_dir: Path, n_runs: int = 50) -> list[str]:
    """Write `n_runs` runs; returns every SLURM job id recorded in their state.json."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan_text = _plan_yaml("RUN", runs_dir)
    stage_names = [s["name"] for s in yaml.safe_load(plan_text)["stages"]]
    metrics = _metrics_csv(EPOCHS)
    ids: list[str] = []
    for r in range(n_runs):
        run = f"run-{r:03d}"
        rd = runs_dir / run
        rd.mkdir()
        (rd / "plan.yaml").write_text(plan_text.replace("run: RUN", f"run: {run}", 1))
        # of every 10 runs: 6 complete, 2 running stage 3, 1 failed in stage 2, 1 pending
        kind = r % 10
        done = len(stage_names) if kind < 6 else 2 if kind < 8 else 1 if kind == 8 else 0
        now = run_state.RUNNING if kind in (6, 7) else run_state.FAILED if kind == 8 else None
        stages: dict[str, Any] = {}
        for i, name in enumerate(stage_names):
            job = str(JOB_ID_BASE + r * 10 + i)
            ids.append(job)
            st = (run_state.COMPLETED if i < done else now if i == done and now
                  else run_state.PENDING)
            stages[name] = {"job_id": job, "slurm_job_id": job, "state": st, "attempts": 1,
                            "requeues": int(i == 2), "epoch": EPOCHS if i < done else 37 * (i == done),
                            "max_epochs": EPOCHS, "best_dice": 0.6 if i <= done else None,
                            "peak_mem_gb": 17.9, "stdout": f"/logs/{run}/{job}/{job}_0_log.out",
                            "stderr": f"/logs/{run}/{job}/{job}_0_log.err",
                            "submitted": "2026-11-22T10:00:00+0000", "updated": "2026-11-22T11:00:00+0000"}
            if st == run_state.FAILED:
                stages[name]["error"] = "RuntimeError: CUDA out of memory"
            if i <= done and st != run_state.PENDING:
                (rd / name / "checkpoints").mkdir(parents=True)
                (rd / name / "metrics.csv").write_text(metrics)
                (rd / name / "checkpoints" / "last.pt").write_bytes(b"\0" * 1024)
            if i < done:
                (rd / name / "checkpoints" / "final.pt").write_bytes(b"\0" * 1024)
        state = {"run": run, "executor": "slurm", "submitted": "2026-11-22T10:00:00+0000",
                 "stages": stages}
        (rd / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    return ids


def _best_and_median(fn: Callable[[], Any], repeats: int,
                     before: Callable[[], Any] | None = None) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        if before:  # untimed
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _no_sacct_path() -> str:
    """PATH without the folder holding sacct: the command line then finds no SLURM."""
    where = shutil.which("sacct")
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(f for f in folders if not where or Path(f) != Path(where).parent)


def bench_status(n_runs: int = 50, repeats: int = 5, tmp_dir: Path | None = None) -> dict[str, Any]:
    """Time `status` over `n_runs` runs (about 20 s on 2 cores).

    Returns:
        {"bench": "status", "machine": {...}, "figures": {name: number}}: seconds (best and
        median of `repeats`) of `collect_status` and of the command line, per situation.
    """
    fig: dict[str, float] = {"runs": n_runs}
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="bench-status-") as tmp:
        runs_dir = Path(tmp) / "runs"
        ids = make_runs(runs_dir, n_runs)
        fig["job_ids"] = len(ids)
        doc = collect_status(runs_dir, None, lambda _ids: None)
        assert len(doc["runs"]) == n_runs and doc["slurm"] != "ok"
        fig["collect_unavailable_best_s"], fig["collect_unavailable_median_s"] = _best_and_median(
            lambda: collect_status(runs_dir, None, lambda _ids: None), repeats)
        def refresh() -> None:  # a fresh cached answer (or a recorded failure) of sacct
            rate_limited_sacct(runs_dir, min_interval_s=0)(ids)

        fig["collect_rate_limited_best_s"], fig["collect_rate_limited_median_s"] = _best_and_median(
            lambda: collect_status(runs_dir, None, rate_limited_sacct(runs_dir)), repeats, refresh)
        if shutil.which("sacct"):
            fig["collect_live_sacct_best_s"], fig["collect_live_sacct_median_s"] = _best_and_median(
                lambda: collect_status(runs_dir, None, sacct_states), repeats)
        cli = [sys.executable, "-m", "orchestrator", "status", "--runs-dir", str(runs_dir)]
        no_sacct = {**os.environ, "PATH": _no_sacct_path()}
        for name, argv, env in (("cli_unavailable", cli, no_sacct),
                                ("cli_unavailable_json", [*cli, "--json"], no_sacct),
                                ("cli_one_run_unavailable", [*cli[:4], "run-000", *cli[4:]], no_sacct),
                                ("cli_rate_limited", cli, dict(os.environ))):
            def call(argv: list[str] = argv, env: dict[str, str] = env) -> None:
                subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)
            best, median = _best_and_median(call, repeats,
                                            refresh if name == "cli_rate_limited" else None)
            fig[f"{name}_best_s"], fig[f"{name}_median_s"] = best, median
        fig["sacct_min_interval_s"] = SACCT_MIN_INTERVAL_S
    return {"bench": "status", "machine": _machine(),
            "figures": {k: round(float(v), 4) for k, v in fig.items()}}


def _machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "platform": platform.platform(),
            "python": platform.python_version(), "sacct": shutil.which("sacct")}
