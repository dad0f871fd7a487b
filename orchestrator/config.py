"""Typed, validated configs: stage, curriculum, cluster profile and plan.

One loader per file kind is the only code that sees raw dicts; everything downstream
gets frozen pydantic models. A bad file raises `ConfigError` with one line per problem:
``stages/s1.yaml: unknown key 'lr_rate' (did you mean 'lr'?)``.
"""
from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import ConfigError
from orchestrator.knobs import TrainingKnobs

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CURRICULUM = REPO_ROOT / "stages" / "progressive.yaml"
CLUSTERS_DIR = REPO_ROOT / "envs" / "clusters"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlannerLimits(_Strict):
    """How far the planner may move a stage away from its curriculum values."""

    min_base_filters: int = Field(8, gt=0, description="Smallest base filter count to try.")
    min_input_vox: int = Field(32, gt=0, description="Smallest side of the input patch.")
    max_batch_size: int = Field(8, gt=0, description="Largest batch size to consider.")
    min_batch_size: int = Field(2, gt=0, description="Batch size the plan tries to keep.")


class StageSpec(TrainingKnobs):
    """One stage of the curriculum (a file under stages/); the loss, augmentation and
    schedule knobs come from `TrainingKnobs` (knobs.py)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Stage id, used in paths.")
    kind: Literal["seg3d", "lcnn"] = Field("seg3d", description=(
        "seg3d: a 3D model of the curriculum's family; lcnn: the 2D LCNN on slice stacks."))
    model: dict[str, Any] = Field(description="arch plus the model constructor's options.")
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
        if "arch" not in self.model:
            raise ValueError("model needs an 'arch' key (e.g. arch: resunet3d)")
        if self.normalization == "dataset" and (self.intensity_mean is None or self.intensity_std is None):
            raise ValueError("normalization dataset needs intensity_mean and intensity_std")
        if self.kind != "lcnn" and (self.class_weights is not None or not self.dice_include_background):
            raise ValueError("class_weights and dice_include_background are LCNN settings; the 3D "
                             "stages' loss is Generalized Dice + Focal + Boundary")
        classes = int(self.model.get("num_classes", 2))
        if self.class_weights is not None and (len(self.class_weights) != classes
                                               or min(self.class_weights) < 0):
            raise ValueError(f"class_weights needs {classes} weights >= 0 (one per class), "
                             f"got {self.class_weights}")
        return self


class CurriculumEntry(_Strict):
    file: str = Field(description="Stage YAML, relative to the curriculum file.")
    init_from: str | None = Field("previous", description="'previous', a stage name or null.")
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "Stage fields set for this stage only, over the stage YAML (model keys merge)."))


class Curriculum(_Strict):
    """Order of the stages and their hand-off (stages/progressive.yaml)."""

    name: str = Field(description="The curriculum's name.")
    stages: list[CurriculumEntry] = Field(min_length=1, description=(
        "The 3D stages in order; each starts from its init_from stage's final.pt."))
    lcnn: list[CurriculumEntry] = Field(default_factory=list, description=(
        "LCNN runs, submitted beside the chain (`--no-lcnn` leaves them out)."))
    overrides: dict[str, Any] = Field(default_factory=dict, description="Applied to every stage.")
    handoff_noise_std: float = Field(1e-3, ge=0, description=(
        "Std of the noise added to widened (Net2Net) channels so copies can diverge."))


class StageResources(_Strict):
    """One stage's own job resources in a cluster profile (`stages: {NAME: {...}}`); what it
    leaves out comes from the profile's top level."""

    partition: str | None = Field(None, description="sbatch --partition for this stage.")
    qos: str | None = Field(None, description="sbatch --qos for this stage.")
    constraint: str | None = Field(None, description="sbatch --constraint for this stage.")
    gres: str | None = Field(None, description="sbatch --gres for this stage, e.g. gpu:a100:1.")
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per node for this stage.")
    cpus_per_task: int | None = Field(None, gt=0, description="CPUs per task for this stage.")
    mem_gb: float | None = Field(None, gt=0, description="Host memory per node for this stage.")
    time_min: int | None = Field(None, gt=0, description="Time limit of this stage's job.")


DEFAULT_TIME_MIN = 60  # a stage's time limit when neither the profile nor the plan gives one


class ClusterProfile(_Strict):
    """Where and how jobs run (envs/clusters/*.yaml)."""

    name: str = Field(description="The profile's name (shown by plan and status).")
    executor: Literal["slurm", "local", "debug"] = Field("slurm", description=(
        "slurm: sbatch through submitit; local: processes on this machine; debug: in-process."))
    partition: str | None = Field(None, description="sbatch --partition; None: the site's default.")
    account: str | None = Field(None, description="sbatch --account (many sites require one).")
    qos: str | None = Field(None, description="sbatch --qos, e.g. normal or preemptible.")
    constraint: str | None = Field(None, description="sbatch --constraint: a node feature, e.g. a100.")
    gpus_per_node: int = Field(0, ge=0, description=(
        "--gpus-per-node; with none here, plan on a login node plans for this GPU."))
    gres: str | None = Field(None, description="--gres (e.g. gpu:a100:1), for sites without --gpus.")
    gpu_mem_gb: float | None = Field(None, gt=0, description="Plan for this GPU from a login node.")
    cpus_per_task: int = Field(2, gt=0, description="CPUs per task: the loader's workers + 1.")
    tasks_per_node: int = Field(1, gt=0, description="More than 1 task runs DistributedDataParallel "
                                "(one task per GPU; gloo on CPU). The plan's batch is per task.")
    nodes: int = Field(1, gt=0, description="Nodes per stage job (DDP across nodes).")
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

    def check_stage_names(self, where: str, stage_names: list[str]) -> None:
        """Every `stages:` entry must name a stage of the curriculum.

        Raises:
            ConfigError: one names no stage (the message lists the stages there are).
        """
        for name in self.stages:
            if name not in stage_names:
                raise ConfigError(f"{where}: stages.{name}: no stage {name!r} in the curriculum; "
                                  f"expected one of {', '.join(stage_names)}")


class StagePlan(_Strict):
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
    reasons: list[str] = Field(default_factory=list)

    def model_kwargs(self) -> dict[str, Any]:
        """The model constructor's options as planned (arch removed)."""
        kw = {k: v for k, v in self.spec.model.items() if k != "arch"}
        kw.update(base_filters=self.base_filters, checkpointing=self.checkpointing)
        if self.kind == "seg3d":  # the position embedding's grid follows the planned input
            kw["input_size_vox"] = list(self.input_size_vox)
        return kw


class Plan(_Strict):
    """runs/<run>/plan.yaml: everything a stage job needs, resolved once."""

    run: str
    created: str
    device: Literal["cpu", "cuda"]
    budget_gb: float
    data_dir: str | None
    runs_dir: str
    curriculum: str
    cluster: ClusterProfile
    probe: dict[str, Any]
    assumptions: dict[str, Any] = Field(default_factory=dict)
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


def unknown_key(source: Path | str, shown: str, key: str, valid: list[str]) -> str:
    """`file: unknown key 'x' (did you mean 'y'?)`, or the valid keys when none is close."""
    # a shared prefix ('lr_rate' -> 'lr') beats string similarity ('lr_rate' -> 'val_fraction')
    prefixed = sorted((v for v in valid if key.startswith(v) or v.startswith(key)), key=len)
    hint = prefixed[-1:] or difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    extra = f" (did you mean {hint[0]!r}?)" if hint else f" (valid: {', '.join(sorted(valid))})"
    return f"{source}: unknown key {shown!r}{extra}"


def _format_error(path: Path | str, err: ValidationError, fields: set[str]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(unknown_key(path, loc, str(e["loc"][-1]), sorted(fields)))
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{path}: {loc or 'file'}: {e['msg']}{got_s}")
    return "; ".join(lines)


def parse_model(cls: type[BaseModel], data: Any, source: Path | str) -> Any:
    """Validate `data` as `cls`; a failure becomes one ConfigError line naming `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, set(cls.model_fields))) from None


def read_yaml(path: Path) -> Any:
    """Read a YAML file; a missing or malformed file is a ConfigError naming it."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None


def check_model_options(spec: StageSpec, source: Path | str) -> None:
    """Reject model options the constructor does not take, before any job runs."""
    import models  # local: keeps `orchestrator.config` light for the CLI

    kwargs = {k: v for k, v in spec.model.items() if k != "arch"}
    try:
        cls = models.model_class(spec.model["arch"])
    except ValueError as err:
        raise ConfigError(f"{source}: model.arch: {err}") from None
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    for key in kwargs:
        if key not in params:
            raise ConfigError(unknown_key(source, f"model.{key}", key, valid))
    weights = spec.deep_supervision_weights
    param = params.get("deep_supervision_heads")
    heads = kwargs.get("deep_supervision_heads", param.default if param else None)
    if weights is not None and heads is not None and len(weights) != heads + 1:
        raise ConfigError(f"{source}: deep_supervision_weights: {len(weights)} values; expected "
                          f"{heads + 1} (the full-resolution output and {heads} auxiliary heads)")


def load_stage(path: Path, overrides: dict[str, Any] | None = None) -> StageSpec:
    """Load a stage YAML, apply curriculum overrides (a dict merged one level deep)."""
    data = read_yaml(path)
    if isinstance(data, dict) and overrides:
        data = _merge(data, overrides)
    spec = parse_model(StageSpec, data, path)
    check_model_options(spec, path)
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


ENV_CLUSTER = "ORCHESTRATOR_CLUSTER"  # the user's default cluster profile (name or file)
ENV_USER_CONFIG = "ORCHESTRATOR_CONFIG"  # the user config file (default below)


class UserConfig(_Strict):
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


def load_plan(path: Path) -> Plan:
    """Read runs/<run>/plan.yaml back."""
    return parse_model(Plan, read_yaml(Path(path)), path)


def plan_to_yaml(plan: Plan) -> str:
    return yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False, width=100)
