"""Cluster profiles (envs/clusters/*.yaml) and the user's default profile.

Where and how a stage's job runs: the profile's top level, its per-stage `stages:`
entries, and which profile is used without --cluster (ORCHESTRATOR_CLUSTER, else the user
config file, else `local`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from orchestrator.config_io import REPO_ROOT, StrictModel, parse_model, read_yaml
from orchestrator.errors import ConfigError

CLUSTERS_DIR = REPO_ROOT / "envs" / "clusters"

# Where jobs run: SLURM through submitit, processes on this machine, or in this process.
ExecutorName = Literal["slurm", "local", "debug"]


class StageResources(StrictModel):
    """One stage's own job resources in a cluster profile (`stages: {NAME: {...}}`); what it
    leaves out comes from the profile's top level."""

    partition: str | None = Field(None, description="sbatch --partition for this stage.")
    qos: str | None = Field(None, description="sbatch --qos for this stage.")
    constraint: str | None = Field(None, description="sbatch --constraint for this stage.")
    gres: str | None = Field(None, description="sbatch --gres for this stage, e.g. gpu:a100:1.")
    gpu_type: str | None = Field(None, description=(
        "Pin this stage to a GPU type of the inventory (a mixed-GPU plan places the others)."))
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per node for this stage.")
    cpus_per_task: int | None = Field(None, gt=0, description="CPUs per task for this stage.")
    mem_gb: float | None = Field(None, gt=0, description="Host memory per node for this stage.")
    time_min: int | None = Field(None, gt=0, description="Time limit of this stage's job.")


class GpuType(StrictModel):
    """One GPU type the site names in its GRES (`gpu:TYPE:N`), in a profile's `gpu_types:`;
    a bare number is its memory (`a100_80g: 80`)."""

    mem_gb: float = Field(gt=0, description="The GPU's memory in GB (what `plan` fits a stage to).")
    partition: str | None = Field(None, description=(
        "The partition that has this type, used where `sinfo` does not answer (a laptop)."))
    gpus_per_node: int = Field(1, gt=0, description=(
        "GPUs of this type a node, used where `sinfo` does not answer."))

    @model_validator(mode="before")
    @classmethod
    def _bare_number(cls, value: object) -> object:
        return {"mem_gb": value} if isinstance(value, int | float) else value


DEFAULT_TIME_MIN = 60  # a stage's time limit when neither the profile nor the plan gives one


class ClusterProfile(StrictModel):
    """Where and how jobs run (envs/clusters/*.yaml)."""

    name: str = Field(description="The profile's name (shown by plan and status).")
    executor: ExecutorName = Field("slurm", description=(
        "slurm: sbatch through submitit; local: processes on this machine; debug: in-process."))
    partition: str | None = Field(None, description="sbatch --partition; None: the site's default.")
    account: str | None = Field(None, description="sbatch --account (many sites require one).")
    qos: str | None = Field(None, description="sbatch --qos, e.g. normal or preemptible.")
    constraint: str | None = Field(None, description="sbatch --constraint: a node feature, e.g. a100.")
    gpus_per_node: int = Field(0, ge=0, description=(
        "--gpus-per-node; with none here, plan on a login node plans for this GPU."))
    gres: str | None = Field(None, description="--gres (e.g. gpu:a100:1), for sites without --gpus.")
    gpu_mem_gb: float | None = Field(None, gt=0, description="Plan for this GPU from a login node.")
    gpu_types: dict[str, GpuType] = Field(default_factory=dict, description=(
        "GPU types by the name the site's GRES gives them, with their memory (`a100_80g: 80`, "
        "or `{mem_gb: 80, partition: gpu-a100}`), over the built-in table of common cards; "
        "`orchestrator doctor` prints the inventory and names a type with no known memory."))
    cpus_per_task: int = Field(2, gt=0, description="CPUs per task: the loader's workers + 1.")
    tasks_per_node: int = Field(1, gt=0, description="More than 1 task runs DistributedDataParallel "
                                "(one task per GPU; gloo on CPU). The plan's batch is per task.")
    nodes: int = Field(1, gt=0, description="Nodes per stage job (DDP across nodes: "
                       "tasks_per_node tasks on each; the ranks meet at the first node).")
    ddp_lr_scaling: Literal["none", "sqrt", "linear"] = Field("none", description=(
        "DDP: the stage's learning rate times 1, sqrt(ranks) or ranks. Each rank draws the "
        "plan's batch, so a step averages ranks x batch samples; AdamW at these batches "
        "trains well unscaled, sqrt suits Adam at many ranks, linear is SGD's rule."))
    peer_timeout_s: float = Field(60, gt=0, description=(
        "DDP: how long a rank may be silent (its node or process lost) or late to start "
        "before the stage ends, naming the rank, its node and log; `resume` continues."))
    mem_gb: float = Field(8, gt=0, description="Host memory per node; bounds the loader's caches.")
    time_min: int | None = Field(None, gt=0, description=(
        "Time limit of each stage's job; unset: the plan's estimate from `plan --verify` "
        f"(steps x measured step time, with margin), else {DEFAULT_TIME_MIN} min."))
    stages: dict[str, StageResources] = Field(default_factory=dict, description=(
        "Per-stage resources by stage name, over the values above (e.g. a longer time or a "
        "bigger GPU for stage 4)."))
    setup: list[str] = Field(default_factory=list, description="Shell lines run before a job.")
    preempt_signal: str = Field("USR2", description=(
        "Signal SLURM sends before the time limit or on preemption; the stage stops and requeues."))
    signal_grace_s: int = Field(120, ge=0, description=(
        "How long before the time limit the signal comes (sbatch --signal)."))
    max_requeues: int = Field(3, ge=0, description="Requeues (time limit, preemption) before FAILED.")
    tensorboard: bool = Field(True, description=(
        "Write TensorBoard event files for every stage run under this profile; false: none."))
    train_device: Literal["auto", "cpu"] = Field("auto", description=(
        "cpu: train every stage on the CPU, a plan made for CUDA too (a test cluster whose GPU "
        "GRES has no GPU behind it); auto: the plan's device, and a CUDA plan refuses to start "
        "where no GPU is visible."))

    def check_stage_names(self, where: str, stage_names: list[str]) -> None:
        """Every `stages:` entry must name a stage of the curriculum.

        Raises:
            ConfigError: one names no stage (the message lists the stages there are).
        """
        for name in self.stages:
            if name not in stage_names:
                raise ConfigError(f"{where}: stages.{name}: no stage {name!r} in the curriculum; "
                                  f"expected one of {', '.join(stage_names)}")


ENV_CLUSTER = "ORCHESTRATOR_CLUSTER"  # the user's default cluster profile (name or file)
ENV_USER_CONFIG = "ORCHESTRATOR_CONFIG"  # the user config file (default below)


class UserConfig(StrictModel):
    """~/.config/orchestrator/config.yaml: the user's defaults."""

    cluster: str | None = Field(None, description=(
        "Cluster profile used when --cluster is not given (a name under envs/clusters/ or a "
        "YAML file); ORCHESTRATOR_CLUSTER overrides it."))


def user_config_path() -> Path:
    env = os.environ.get(ENV_USER_CONFIG, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".config" / "orchestrator" / "config.yaml"


def default_cluster() -> tuple[str, str]:
    """The cluster profile used without --cluster, and where that choice came from:
    ORCHESTRATOR_CLUSTER, else `cluster:` in the user config file, else 'local'.

    Raises:
        ConfigError: the user config file exists but is not valid.
    """
    env = os.environ.get(ENV_CLUSTER, "").strip()
    if env:
        return env, f"${ENV_CLUSTER}"
    path = user_config_path()
    if path.is_file():
        cfg = parse_model(UserConfig, read_yaml(path) or {}, path)
        if cfg.cluster:
            return cfg.cluster, str(path)
    return "local", "the default"


def resolve_cluster(name_or_file: str | None) -> tuple[ClusterProfile, Path]:
    """A cluster profile by name (envs/clusters/NAME.yaml) or by path; without one, the
    user's default (`default_cluster`)."""
    ref = name_or_file or default_cluster()[0]
    path = Path(ref).expanduser()
    if not path.suffix:
        path = CLUSTERS_DIR / f"{ref}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))
            raise ConfigError(f"--cluster: no profile {ref!r} (known: {', '.join(known)})")
    return parse_model(ClusterProfile, read_yaml(path), path), path
