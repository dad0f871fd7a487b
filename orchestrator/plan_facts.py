"""What a plan was made from: the hardware probe and the assumptions, as plan.yaml holds them.

`Plan.probe` is a `ProbeRecord` (what planning/probe.py's `probe()` returns) and
`Plan.assumptions` a `PlanAssumptions`. The field names are the keys plan.yaml has always
had, so a plan written before these were typed loads unchanged; every field a plan from
an older version (or a test's hand-made plan) may lack has a default. `GpuOption` is what
mixed-GPU placement chooses from (one GPU type as the inventory found it), and `Placement`
what it chose; both live here so that the inventory and the command line need no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_serializer

from orchestrator.config_io import StrictModel


class GpuRecord(StrictModel):
    """One GPU the probe saw."""

    index: int = 0
    name: str
    total_gb: float
    free_gb: float
    bf16: bool | None = Field(default=None, description="Compute capability >= 8.0; None in a "
                              "plan written before the probe recorded it.")


@dataclass(frozen=True)
class GpuOption:
    """A GPU type a stage may be placed on, as the inventory found it."""

    gpu_type: str
    mem_gb: float
    partition: str | None = None
    gpus_per_node: int = 1
    idle_gpus: int = 0
    start_s: float | None = None  # seconds to the expected start (sbatch --test-only)

    def describe(self) -> str:
        return f"{self.gpu_type} ({self.mem_gb:g} GB)"


class Placement(StrictModel):
    """Where a stage of a mixed-GPU plan runs: the GPU type chosen, why, and every type
    considered with the stage's predicted peak there (None: nothing fits)."""

    gpu_type: str
    mem_gb: float = Field(description="The type's memory: the stage's budget.")
    partition: str | None = Field(None, description="The type's partition (None: the default).")
    gpus_per_node: int = Field(1, description="GPUs of the type each of its nodes has.")
    reason: str
    considered: dict[str, float | None] = Field(default_factory=dict, description=(
        "Each type considered: the stage's predicted GB there, None where nothing fits."))
    replanned: str | None = Field(None, description=(
        "Set at start-up when the job found another GPU than planned: what it got and the "
        "stage's new numbers."))


class ProbeRecord(StrictModel):
    """The machine `plan` ran on: GPUs (nvidia-ml-py), host RAM and CPUs, SLURM variables."""

    gpus: list[GpuRecord] = Field(default_factory=list)
    host_total_gb: float = 0.0
    host_available_gb: float = 0.0
    cpus: int = 1
    slurm: dict[str, str] = Field(default_factory=dict)
    gpu_error: str | None = None

    def gpus_text(self) -> str:
        """`NVIDIA A100 40 GB, ...`, or `none (why)`."""
        return ", ".join(f"{g.name} {g.total_gb:.0f} GB" for g in self.gpus) or f"none ({self.gpu_error})"


class OverheadsRecord(StrictModel):
    """Memory outside a step's live tensors that the estimate added (planning/memory.py)."""

    alloc_fraction: float  # caching allocator's reserved/allocated gap (or CPU fragmentation)
    workspace_gb: float  # cuDNN/cuBLAS workspace; 0 on CPU
    context_gb: float  # CUDA context + handles, or the CPU process's baseline RSS

    def total_gb(self, tensor_bytes: int) -> float:
        """A step's memory: its live tensors' bytes plus these overheads."""
        return tensor_bytes / 2**30 * (1 + self.alloc_fraction) + self.workspace_gb + self.context_gb


class ClusterSource(StrictModel):
    """Which cluster profile the plan used, and which keys its file set."""

    file: str | None = None
    chosen_by: str | None = None
    set: list[str] = Field(default_factory=list)


class CalibrationWrite(StrictModel):
    """`plan --verify`: where the measured/predicted ratios were recorded."""

    file: str
    stages: list[str]


class CalibrationRecord(StrictModel):
    """The ratios of earlier `plan --verify` runs the plan applied, and what it recorded."""

    file: str | None = None
    hardware: str | None = None
    applied: dict[str, float] = Field(default_factory=dict)
    fingerprints: dict[str, str] = Field(default_factory=dict)
    recorded: CalibrationWrite | None = None


class DatasetRecord(StrictModel):
    """`plan --data`: the dataset measured."""

    root: str
    subjects: int
    voxels: int


class PlanAssumptions(StrictModel):
    """Where the budget came from and what the estimate assumed (plan.yaml `assumptions:`)."""

    budget_source: str | None = None
    device_source: str | None = None
    val_volume_vox: tuple[int, ...] | None = None
    overheads: OverheadsRecord | None = None
    cluster: ClusterSource | None = None
    estimate: str | None = None
    calibration: CalibrationRecord | None = None
    dataset: DatasetRecord | None = None
    gpu: str | None = Field(default=None, description="What was assumed of a GPU planned for from elsewhere.")
    device_notice: str | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: Any) -> dict[str, Any]:
        # keys with no value are left out, as plan.yaml wrote them before they were typed
        return {k: v for k, v in handler(self).items() if v is not None}
