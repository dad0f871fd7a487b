"""A plan of the tiny curriculum at the stages' own numbers, without running the planner.

For tests of launching and training, where what the planner would choose is not under
test: `make_tiny_plan` (conftest.py) measures every stage first, about 10 s on 2 cores.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO, TINY_CURRICULUM
from waiting import wait_for

from orchestrator.atomic import atomic_write_text
from orchestrator.config import Plan, StagePlan, load_curriculum, plan_to_yaml, resolve_cluster


def quick_tiny_plan(runs_dir: Path, data: Path, run: str = "tiny", cluster: str = "local",
                    stage_updates: dict[str, Any] | None = None,
                    **cluster_updates: Any) -> tuple[Plan, Path]:
    """Write runs_dir/run/plan.yaml; `stage_updates` change every stage's spec (e.g. max_epochs)."""
    _, stages = load_curriculum(TINY_CURRICULUM)
    planned = []
    for spec, init in stages:
        spec = spec.model_copy(update=stage_updates or {})
        planned.append(StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=init,
                                 input_size_vox=spec.input_size_vox, base_filters=spec.base_filters,
                                 batch_size=spec.batch_size, checkpointing=False, amp=spec.amp,
                                 params=0, predicted_gb=0.0,
                                 reasons=["test plan: the stage's own numbers, not planned"]))
    profile = resolve_cluster(cluster)[0].model_copy(update=cluster_updates)
    plan = Plan(run=run, created="2026-11-22T00:00:00+0000", device="cpu", budget_gb=2.0,
                data_dir=str(Path(data).resolve()), runs_dir=str(Path(runs_dir).resolve()),
                curriculum=str(TINY_CURRICULUM), cluster=profile, probe={}, stages=planned)
    path = plan.run_dir / "plan.yaml"
    atomic_write_text(path, plan_to_yaml(plan))
    return plan, path


def one_stage_curriculum(folder: Path, name: str = "one") -> Path:
    """Stage 1 alone at test scale (32^3, 4 filters, fp32, batch 2): for tests about
    something other than the stages (the device, --explain)."""
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nstages:\n  - file: {REPO / 'stages' / 'stage1_basic_cnn.yaml'}\n"
                    "overrides:\n  input_size_vox: [32, 32, 32]\n  base_filters: 4\n  amp: false\n"
                    "  planner: {min_base_filters: 4, min_input_vox: 32, max_batch_size: 2, "
                    "min_batch_size: 2}\n")
    return path


def children(pid: int) -> list[int]:
    """The process ids of `pid`'s children (a stage's DataLoader workers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def start_stage_with_workers(plan: Plan, path: Path, stage: str,
                             env: dict[str, str] | None = None) -> tuple[subprocess.Popen, list[int]]:
    """`orchestrator run-stage` in a subprocess, once it wrote last.pt and its DataLoader
    workers run (the stage needs `num_workers` > 0): (the process, its workers' ids)."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run-stage", "--plan", str(path),
                             "--stage", stage], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    last = plan.run_dir / stage / "checkpoints" / "last.pt"
    workers = wait_for(lambda: last.exists() and children(proc.pid), 120,
                       f"{last} and a DataLoader worker", every_s=0.1, proc=proc)
    return proc, workers
