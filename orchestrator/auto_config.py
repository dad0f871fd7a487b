"""The progressive guide's entry point, answered by this project's planner.

The guide's scripts run unchanged:

    from orchestrator.auto_config import create_auto_config

    config = create_auto_config(target_memory_gb=20).generate_complete_config(dataset_size=655)
    config["stages"]["stage1_basic_cnn"]["batch_size"]

Behind it is `orchestrator.api.plan` (the planner `orchestrator plan` runs) for a GPU by
default (`device="cuda"`: the guide sizes GPU jobs, even from a login node without one),
on a dataset of `dataset_size` ATLAS R2.0-size subjects (197 x 233 x 189 voxels), the
same as `orchestrator plan --device cuda --target-mem 20 --data` a tree of that many.
Nothing is written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.api import plan
from orchestrator.config import DEFAULT_CURRICULUM, DeviceName, Plan, StagePlan
from orchestrator.data.records import SubjectRecord
from orchestrator.errors import ConfigError
from orchestrator.planning.schedule import DatasetSize

ATLAS_SHAPE_VOX = (197, 233, 189)


def atlas_like_dataset(n_subjects: int, shape_vox: tuple[int, int, int] = ATLAS_SHAPE_VOX) -> Any:
    """A `DatasetSize` of `n_subjects` subjects of `shape_vox` voxels (no files behind it).

    Raises:
        ConfigError: `n_subjects` is below 1.
    """
    if int(n_subjects) < 1:
        raise ConfigError(f"dataset_size: {n_subjects}; expected at least 1 subject")
    records = [SubjectRecord(f"sub-{i:04d}", "ses-1", Path(f"sub-{i:04d}_T1w.nii.gz"),
                             Path(f"sub-{i:04d}_mask.nii.gz")) for i in range(int(n_subjects))]
    voxels = {f"{r.subject}/{r.session}": math.prod(shape_vox) for r in records}
    return DatasetSize(f"<{n_subjects} ATLAS-size subjects>", records, voxels, tuple(shape_vox))


def stage_choices(sp: StagePlan) -> dict[str, Any]:
    """What the guide's configs hold per stage, from one planned stage."""
    return {"model": sp.spec.model.arch, "kind": sp.kind,
            "input_size": list(sp.input_size_vox), "base_filters": sp.base_filters,
            "batch_size": sp.batch_size, "gradient_checkpointing": sp.checkpointing,
            "mixed_precision": sp.amp, "epochs": sp.spec.max_epochs,
            "iterations_per_epoch": sp.spec.iterations_per_epoch, "params": sp.params,
            "predicted_gb": sp.predicted_gb, "init_from": sp.init_from, "reasons": list(sp.reasons)}


@dataclass
class AutoConfig:
    """A memory budget and a device, ready to plan the curriculum for a dataset size."""

    target_memory_gb: float | None = 20.0
    device: DeviceName = "cuda"
    curriculum: Path = DEFAULT_CURRICULUM
    cluster: str | None = None
    last_plan: Plan | None = None

    def plan(self, dataset_size: int | None = None,
             subject_shape_vox: tuple[int, int, int] = ATLAS_SHAPE_VOX) -> Plan:
        """The planner's `Plan` for `dataset_size` subjects of `subject_shape_vox` voxels
        (None: no dataset, as `plan` without --data)."""
        ds = atlas_like_dataset(dataset_size, subject_shape_vox) if dataset_size is not None else None
        self.last_plan = plan(self.target_memory_gb, device=self.device,
                              curriculum=self.curriculum, cluster=self.cluster, write=False,
                              dataset=ds, run="auto-config")
        return self.last_plan

    def generate_complete_config(self, dataset_size: int | None = 655,
                                 subject_shape_vox: tuple[int, int, int] = ATLAS_SHAPE_VOX
                                 ) -> dict[str, Any]:
        """Per stage: input size, base filters, batch size, checkpointing, AMP, epochs and
        iterations per epoch (plus model, parameters, predicted GB and the reasons).

        Args:
            dataset_size: training + validation subjects (655: ATLAS R2.0's labelled set).
            subject_shape_vox: each subject's image size (ATLAS R2.0's by default).

        Returns:
            {"device", "target_memory_gb", "dataset_size", "stages": {name: choices},
            "order": [stage names, the chain first, then the LCNN runs]}.

        Raises:
            ConfigError: a bad budget, device or curriculum.
            PlanError: a stage cannot fit the budget.
        """
        p = self.plan(dataset_size, subject_shape_vox)
        return {"device": p.device, "target_memory_gb": p.budget_gb, "dataset_size": dataset_size,
                "order": [s.name for s in p.stages],
                "stages": {s.name: stage_choices(s) for s in p.stages}}


def create_auto_config(target_memory_gb: float | None = 20.0, device: DeviceName = "cuda",
                       curriculum: str | Path = DEFAULT_CURRICULUM,
                       cluster: str | None = None) -> AutoConfig:
    """The guide's factory: an `AutoConfig` for this budget (GB per stage) and device.

    `device="cuda"` plans for a GPU of `target_memory_gb` (the guide's case, here or from a
    login node); "auto" chooses as `orchestrator plan` does (a GPU here, else the cluster
    profile's, else the CPU); "cpu" plans for the CPU.
    """
    return AutoConfig(target_memory_gb, device, Path(curriculum), cluster)
