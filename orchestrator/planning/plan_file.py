"""Build a run's plan (probe -> budget -> per-stage search) and write runs/<run>/plan.yaml."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from orchestrator.config import ClusterProfile, Plan, load_curriculum, plan_to_yaml, resolve_cluster
from orchestrator.errors import ConfigError, PlanError
from orchestrator.planning.memory import DEFAULT_OVERHEADS
from orchestrator.planning.planner import Budget, StepFactory, plan_curriculum
from orchestrator.planning.probe import Probe, host_budget_gb, probe
from orchestrator.runs.atomic import atomic_write_text

logger = logging.getLogger(__name__)
HOST_SHARE = 0.8  # of available RAM, when planning for the CPU without --target-mem
GPU_SHARE = 0.95  # of the smallest GPU's free memory, without --target-mem


@dataclass(frozen=True)
class PlanRequest:
    curriculum: Path
    target_mem_gb: float | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cluster: str | None = None
    data_dir: Path | None = None
    run: str | None = None
    runs_dir: Path = Path("runs")


def parse_target_mem(text: str | None) -> float | None:
    """--target-mem as GB; 'abc', 0 or negative is a ConfigError."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--target-mem: expected a number of GB (e.g. 20), got {text!r}") from None
    if not value > 0:
        raise ConfigError(f"--target-mem: expected a positive number of GB, got {text!r}")
    return value


def choose_budget(req: PlanRequest, p: Probe, cluster: ClusterProfile) -> tuple[str, float, str]:
    """(device, budget GB, where the budget came from)."""
    device = req.device
    if device == "auto":
        device = "cuda" if p.gpus or cluster.gpus_per_node else "cpu"
    if req.target_mem_gb is not None:
        if device == "cuda" and p.gpus and req.target_mem_gb > min(g.total_gb for g in p.gpus):
            raise ConfigError(f"--target-mem: {req.target_mem_gb:g} GB is more than the GPU's "
                              f"{min(g.total_gb for g in p.gpus):.1f} GB")
        return device, req.target_mem_gb, "--target-mem"
    if device == "cuda":
        if p.gpus:
            return device, round(min(g.free_gb for g in p.gpus) * GPU_SHARE, 2), \
                f"{GPU_SHARE:.0%} of the free memory of {p.gpus[0].name}"
        if cluster.gpu_mem_gb:
            return device, cluster.gpu_mem_gb, f"cluster profile {cluster.name}: gpu_mem_gb"
        raise ConfigError("--device cuda: no GPU here; give --target-mem GB or a cluster profile "
                          "with gpu_mem_gb")
    return device, round(host_budget_gb(p) * HOST_SHARE, 2), f"{HOST_SHARE:.0%} of available RAM"


def make_plan(req: PlanRequest, step_factory: StepFactory,
              progress: Callable[[str], None] | None = None) -> Plan:
    """Probe, choose the budget and plan every stage (nothing is written).

    Raises:
        ConfigError: a bad curriculum, stage or cluster file, or a bad flag value.
        PlanError: a stage cannot fit the budget.
    """
    cur, stages = load_curriculum(req.curriculum)
    cluster, _cluster_path = resolve_cluster(req.cluster)
    if req.data_dir is not None and not Path(req.data_dir).is_dir():
        raise ConfigError(f"--data: {req.data_dir} is not a directory")
    p = probe()
    device, budget_gb, source = choose_budget(req, p, cluster)
    overheads = DEFAULT_OVERHEADS[device]
    budget = Budget(budget_gb, overheads, cuda_target=device == "cuda")
    planned = plan_curriculum(stages, budget, step_factory, progress=progress)
    assumptions = {"budget_source": source, "overheads": overheads.as_dict(),
                   "estimate": "peak live tensors of 2 real training steps on fake tensors"
                               + (", CUDA autocast dtypes emulated" if device == "cuda" else "")}
    if device == "cuda" and not p.gpus:
        assumptions["gpu"] = "no GPU here: planning for one (bf16 autocast assumed)"
    name = req.run or time.strftime("run-%Y%m%d-%H%M%S")
    return Plan(run=name, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), device=device,
                budget_gb=budget_gb, data_dir=str(Path(req.data_dir).resolve()) if req.data_dir else None,
                runs_dir=str(Path(req.runs_dir).resolve()), curriculum=str(Path(req.curriculum).resolve()),
                cluster=cluster, probe=p.as_dict(), assumptions=assumptions,
                handoff_noise_std=cur.handoff_noise_std, stages=planned)


def write_plan(plan: Plan) -> Path:
    """Write runs/<run>/plan.yaml atomically; refuses to overwrite a run that was submitted."""
    path = plan.run_dir / "plan.yaml"
    if (plan.run_dir / "state.json").exists():
        raise PlanError(f"{plan.run_dir}: run already submitted; choose another --run name")
    atomic_write_text(path, plan_to_yaml(plan))
    return path
