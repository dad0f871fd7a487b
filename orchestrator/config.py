"""Typed, validated configs: stage, curriculum and plan (the public face of the config layer).

One loader per file kind is the only code that sees raw dicts; everything downstream
gets frozen pydantic models. A bad file raises `ConfigError` with one line per problem:
``stages/s1.yaml: unknown key 'lr_rate' (did you mean 'lr'?)``. The config layer's other
modules, re-exported here: knobs.py (the training fields a stage inherits),
model_options.py (the `model:` block, one options model per architecture),
cluster_config.py (cluster profiles, the user's default profile), plan_facts.py (a
plan's probe and assumptions) and config_io.py (reading YAML, one-line errors).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, model_validator

from orchestrator.cluster_config import (
    CLUSTERS_DIR,
    DEFAULT_TIME_MIN,
    ENV_CLUSTER,
    ENV_USER_CONFIG,
    ClusterProfile,
    ExecutorName,
    GpuType,
    StageResources,
    UserConfig,
    default_cluster,
    resolve_cluster,
    user_config_path,
)
from orchestrator.config_io import REPO_ROOT, StrictModel, parse_model, read_yaml, unknown_key
from orchestrator.errors import ConfigError
from orchestrator.knobs import TrainingKnobs
from orchestrator.model_options import LCNNOptions, ModelOptions, ResUNetOptions
from orchestrator.plan_facts import Placement, PlanAssumptions, ProbeRecord

__all__ = ["CLUSTERS_DIR", "DEFAULT_CURRICULUM", "DEFAULT_TIME_MIN", "ENV_CLUSTER",
           "ENV_USER_CONFIG", "REPO_ROOT", "ClusterProfile", "Curriculum", "CurriculumEntry",
           "DeviceName", "ExecutorName", "check_choice",
           "LCNNOptions", "ModelOptions", "Plan", "PlanAssumptions", "PlannerLimits",
           "Placement", "ProbeRecord", "ResUNetOptions", "StagePlan",
           "GpuType", "StageResources", "StageSpec", "UserConfig", "check_deep_supervision",
           "default_cluster", "load_curriculum", "load_plan", "load_stage", "parse_model",
           "plan_to_yaml", "read_yaml", "resolve_cluster", "unknown_key", "user_config_path"]

DEFAULT_CURRICULUM = REPO_ROOT / "stages" / "progressive.yaml"

# What --device takes: auto is the GPU where there is one (training/devices.py).
DeviceName = Literal["auto", "cuda", "cpu"]


def check_choice(flag: str, value: object, choices: Any) -> None:
    """For Python callers (the CLI's flags are checked by Typer): `value` must be one of
    the Literal type `choices`' values, e.g. `check_choice("--device", name, DeviceName)`.

    Raises:
        ConfigError: "--device: expected auto, cuda or cpu, got 'gpu'".
    """
    names = get_args(choices)
    if value not in names:
        raise ConfigError(f"{flag}: expected {', '.join(names[:-1])} or {names[-1]}, got {value!r}")


class PlannerLimits(StrictModel):
    """How far the planner may move a stage away from its curriculum values."""

    min_base_filters: int = Field(default=8, gt=0, description="Smallest base filter count to try.")
    min_input_vox: int = Field(default=32, gt=0, description="Smallest side of the input patch.")
    max_batch_size: int = Field(default=8, gt=0, description="Largest batch size to consider.")
    min_batch_size: int = Field(default=2, gt=0, description="Batch size the plan tries to keep.")


class StageSpec(TrainingKnobs):
    """One stage of the curriculum (a file under stages/); the loss, augmentation and
    schedule knobs come from `TrainingKnobs` (knobs.py)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Stage id, used in paths.")
    kind: Literal["seg3d", "lcnn"] = Field("seg3d", description=(
        "seg3d: a 3D model of the curriculum's family; lcnn: the 2D LCNN on slice stacks."))
    model: ModelOptions = Field(description=(
        "The network: arch (resunet3d or lcnn) and its options (see the model sections)."))
    input_size_vox: tuple[int, ...] = Field(description="Patch size (3 sides; 2 for LCNN).")
    base_filters: int = Field(16, gt=0, description="Channels of the first level; the planner "
                              "may lower it to fit (down to planner.min_base_filters).")
    batch_size: int = Field(2, gt=0, description="Starting batch size; the planner adjusts it.")
    max_epochs: int = Field(100, gt=0, description=(
        "Epochs of the stage; unset, `plan --data` derives it from the dataset."))
    iterations_per_epoch: int = Field(250, gt=0, description=(
        "Optimizer steps per epoch; unset, `plan --data` derives it from the dataset."))
    val_every_epochs: int = Field(1, gt=0, description="Validate on whole volumes every N epochs.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW (cosine schedule).")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW's decoupled weight decay.")
    warmup_epochs: int = Field(0, ge=0, description="Linear learning-rate warm-up before the cosine.")
    grad_clip_norm: float | None = Field(12.0, gt=0, description=(
        "Clip the gradients' global L2 norm to this; None: no clipping."))
    amp: bool = Field(True, description="Mixed precision (bf16 where supported).")
    amp_dtype: Literal["auto", "bf16", "fp16"] = Field("auto", description=(
        "With amp: auto takes bf16 where the device has it and fp16 (with a GradScaler) "
        "elsewhere; bf16 or fp16 asks for one."))
    lesion_fraction: float = Field(1 / 3, ge=0, le=1, description=(
        "Share of training patches centred on a lesion voxel (the rest anywhere in the volume)."))
    val_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "Share of subjects held out for validation (split by subject, seeded)."))
    augment: bool = Field(True, description=(
        "Flips, small rotations and scaling, intensity scale/shift, gamma and noise."))
    num_workers: int | None = Field(None, ge=0, description="None: from SLURM_CPUS_PER_TASK.")
    checkpoint_every_steps: int = Field(50, gt=0, description="Write last.pt this often.")
    seed: int = Field(0, description="Seed of the split, the sampler, augmentation and initialisation.")
    boundary_weight_start: float = Field(0.01, ge=0, le=1, description=(
        "3D: weight a of the boundary loss at epoch 0; the loss is (1 - a) x (GDL + Focal) "
        "+ a x Boundary."))
    boundary_weight_end: float = Field(0.3, ge=0, le=1, description=(
        "3D: a after boundary_ramp_epochs (0 and start 0: no boundary term)."))
    boundary_ramp_epochs: int = Field(50, ge=0, description="3D: epochs of a's linear ramp.")
    grad_accum_steps: int = Field(1, gt=0, description=(
        "Backward passes per optimizer step, each of batch_size samples (the planner fits "
        "batch_size; the effective batch is batch_size x grad_accum_steps)."))
    init_checkpoint: str | None = Field(None, description=(
        "Start from this checkpoint (any stage's final.pt or best.pt, through the hand-off) "
        "when the stage has no init_from: fine-tuning on another dataset. A relative path "
        "is taken from where `plan` runs."))
    freeze: Literal["encoder"] | None = Field(None, description=(
        "Fine-tuning: 'encoder' keeps the encoder's weights fixed (the model's "
        "`encoder_parameters()`); None trains everything."))
    alignment_weight: float = Field(0.1, ge=0, description="LCNN: weight of the alignment loss.")
    alignment_warmup_epochs: int = Field(3, ge=0, description="LCNN: epochs to reach that weight.")
    tensorboard: bool = Field(True, description=(
        "Write TensorBoard event files (runs/<run>/tensorboard/); false: none for this stage."))
    tensorboard_images_every_epochs: int = Field(5, ge=0, description=(
        "TensorBoard: a validation overlay image every N epochs (when it validates) and at the "
        "last; 0: none."))
    fit_input_to_data: bool = Field(True, description=(
        "LCNN, with `plan --data`: input_size_vox grows to hold the data's largest axial slice, "
        "padded up to the network's multiple, and the planner never shrinks it below that "
        "(no tissue is cropped away); false keeps input_size_vox (a centre crop)."))
    normalization: Literal["zscore", "dataset"] = Field("zscore", description=(
        "Image intensities: zscore, per volume over the nonzero voxels; dataset, (x - "
        "intensity_mean) / intensity_std with PNG slices scaled to [0, 1] first (the LCNN "
        "seed's 0.2162 / 0.1841); not with the HDF5 cache, which is z-scored already."))
    intensity_mean: float | None = Field(None, description="normalization dataset: the mean.")
    intensity_std: float | None = Field(None, gt=0, description="normalization dataset: the std.")
    dice_include_background: bool = Field(True, description=(
        "LCNN: the Dice term averages over every class; false leaves the background out."))
    class_weights: list[float] | None = Field(None, description=(
        "LCNN: weight of each class in the cross-entropy (one per class, background first); "
        "None: equal."))
    planner: PlannerLimits = Field(PlannerLimits(), description=(
        "How far the planner may move this stage (see PlannerLimits)."))

    @model_validator(mode="after")
    def _check(self) -> StageSpec:
        want = 2 if self.kind == "lcnn" else 3
        if len(self.input_size_vox) != want:
            raise ValueError(f"input_size_vox needs {want} sides for a {self.kind} stage")
        if self.normalization == "dataset" and (self.intensity_mean is None or self.intensity_std is None):
            raise ValueError("normalization dataset needs intensity_mean and intensity_std")
        if self.kind != "lcnn" and (self.class_weights is not None or not self.dice_include_background):
            raise ValueError("class_weights and dice_include_background are LCNN settings; the 3D "
                             "stages' loss is Generalized Dice + Focal + Boundary")
        classes = self.model.classes
        if self.class_weights is not None and (len(self.class_weights) != classes
                                               or min(self.class_weights) < 0):
            raise ValueError(f"class_weights needs {classes} weights >= 0 (one per class), "
                             f"got {self.class_weights}")
        return self


class CurriculumEntry(StrictModel):
    file: str = Field(description="Stage YAML, relative to the curriculum file.")
    init_from: str | None = Field("previous", description="'previous', a stage name or null.")
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "Stage fields set for this stage only, over the stage YAML (model keys merge)."))


class Curriculum(StrictModel):
    """Order of the stages and their hand-off (stages/progressive.yaml)."""

    name: str = Field(description="The curriculum's name.")
    stages: list[CurriculumEntry] = Field(min_length=1, description=(
        "The 3D stages in order; each starts from its init_from stage's final.pt."))
    lcnn: list[CurriculumEntry] = Field(default_factory=list, description=(
        "LCNN runs, submitted beside the chain (`--no-lcnn` leaves them out)."))
    overrides: dict[str, Any] = Field(default_factory=dict, description="Applied to every stage.")
    handoff_noise_std: float = Field(1e-3, ge=0, description=(
        "Std of the noise added to widened (Net2Net) channels so copies can diverge."))


class StagePlan(StrictModel):
    """The planner's decision for one stage, with the resolved spec it applies to."""

    name: str
    kind: Literal["seg3d", "lcnn"]
    spec: StageSpec
    init_from: str | None
    input_size_vox: tuple[int, ...]
    base_filters: int
    batch_size: int
    checkpointing: bool
    amp: bool
    params: int
    predicted_gb: float = Field(description="The stage's peak: max(training step, validation).")
    train_gb: float | None = Field(None, description="Predicted peak of a training step.")
    val_gb: float | None = Field(None, description="Predicted peak of validating a whole volume.")
    measured_gb: float | None = None
    calibration_ratio: float | None = Field(
        None, description="measured/predicted of an earlier `plan --verify`, applied to predicted_gb.")
    measurement: dict[str, Any] | None = Field(
        None, description="`plan --verify`: what was measured, how, and the ratio.")
    fresh_tensors: dict[str, Any] | None = Field(None, description=(
        "Set when the stage has fewer base filters than the stage it starts from and nothing "
        "at those fits: the tensors the hand-off re-initialises (planning/floors.py)."))
    time_estimate_min: int | None = Field(
        None, description="`plan --verify`: the stage's job time from its measured step time.")
    placement: Placement | None = Field(None, description=(
        "A mixed-GPU plan: the GPU type the stage was planned for and runs on, and why."))
    reasons: list[str] = Field(default_factory=list)

    def model_kwargs(self) -> dict[str, Any]:
        """The model constructor's options as planned (arch removed)."""
        kw = self.spec.model.constructor_kwargs()
        kw.update(base_filters=self.base_filters, checkpointing=self.checkpointing)
        if self.kind == "seg3d":  # the position embedding's grid follows the planned input
            kw["input_size_vox"] = list(self.input_size_vox)
        return kw


class Plan(StrictModel):
    """runs/<run>/plan.yaml: everything a stage job needs, resolved once."""

    run: str
    created: str
    device: Literal["cpu", "cuda"]
    budget_gb: float
    data_dir: str | None
    runs_dir: str
    curriculum: str
    cluster: ClusterProfile
    probe: ProbeRecord = ProbeRecord()  # frozen: one shared default is safe
    assumptions: PlanAssumptions = PlanAssumptions()
    handoff_noise_std: float = 1e-3
    stages: list[StagePlan]
    fold: int | None = Field(None, ge=0, description="Cross-validation fold this plan trains.")
    val_subjects: list[str] | None = Field(
        None, description="The fold's validation subjects; None: split by val_fraction.")

    def stage(self, name: str) -> StagePlan:
        for st in self.stages:
            if st.name == name:
                return st
        raise ConfigError(f"plan {self.run}: no stage {name!r} (stages: {[s.name for s in self.stages]})")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run


# --------------------------------------------------------------------------- loading


def check_deep_supervision(spec: StageSpec, source: Path | str) -> None:
    """deep_supervision_weights holds one weight per output of the model.

    Raises:
        ConfigError: the count differs from deep_supervision_heads + 1.
    """
    weights, heads = spec.deep_supervision_weights, getattr(spec.model, "deep_supervision_heads", None)
    if weights is not None and heads is not None and len(weights) != heads + 1:
        raise ConfigError(f"{source}: deep_supervision_weights: {len(weights)} values; expected "
                          f"{heads + 1} (the full-resolution output and {heads} auxiliary heads)")


def load_stage(path: Path, overrides: dict[str, Any] | None = None) -> StageSpec:
    """Load a stage YAML, apply curriculum overrides (a dict merged one level deep)."""
    data = read_yaml(path)
    if isinstance(data, dict) and overrides:
        data = _merge(data, overrides)
    spec = parse_model(StageSpec, data, path)
    check_deep_supervision(spec, path)
    return spec


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **val}
        else:
            out[key] = val
    return out


def load_curriculum(path: Path) -> tuple[Curriculum, list[tuple[StageSpec, str | None]]]:
    """Load a curriculum and its stages, resolving 'previous' into stage names.

    Returns:
        The curriculum and, in order, (stage spec, init_from stage name or None) for the
        progressive stages followed by the LCNN runs (which never inherit).

    Raises:
        ConfigError: a file is missing or invalid, a stage name repeats, or init_from
            names a stage that does not come earlier.
    """
    path = Path(path)
    cur = parse_model(Curriculum, read_yaml(path), path)
    out: list[tuple[StageSpec, str | None]] = []
    seen: list[str] = []
    for group, entries in (("stages", cur.stages), ("lcnn", cur.lcnn)):
        for i, entry in enumerate(entries):
            spec = load_stage(path.parent / entry.file, _merge(cur.overrides, entry.overrides))
            if spec.name in seen:
                raise ConfigError(f"{path}: {group}.{i}: stage name {spec.name!r} used twice")
            init = entry.init_from
            if group == "lcnn" or init is None:
                init = None
            elif init == "previous":
                prev = [s for s, _ in out if s.kind == "seg3d"]
                init = prev[-1].name if prev else None
            elif init not in seen:
                raise ConfigError(
                    f"{path}: {group}.{i}.init_from: {init!r} is not an earlier stage ({seen})")
            if spec.init_checkpoint and init:
                raise ConfigError(
                    f"{path}: {group}.{i}: stage {spec.name!r} has init_checkpoint and starts from "
                    f"stage {init!r}; expected one of them (set init_from: null)")
            if spec.init_checkpoint:
                spec = spec.model_copy(
                    update={"init_checkpoint": str(Path(spec.init_checkpoint).resolve())})
            out.append((spec, init))
            seen.append(spec.name)
    return cur, out


def load_plan(path: Path) -> Plan:
    """Read runs/<run>/plan.yaml back."""
    return parse_model(Plan, read_yaml(Path(path)), path)


def plan_to_yaml(plan: Plan) -> str:
    return yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False, width=100)
