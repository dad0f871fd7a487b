"""Build a run's plan (probe -> budget -> per-stage search) and write runs/<run>/plan.yaml."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from orchestrator.atomic import atomic_write_text
from orchestrator.config import (
    ENV_CLUSTER,
    REPO_ROOT,
    ClusterProfile,
    DeviceName,
    Plan,
    StagePlan,
    default_cluster,
    load_curriculum,
    plan_to_yaml,
    resolve_cluster,
    user_config_path,
)
from orchestrator.data.host_memory import raw_data_notice
from orchestrator.errors import ConfigError, PlanError
from orchestrator.plan_facts import (
    CalibrationRecord,
    CalibrationWrite,
    ClusterSource,
    DatasetRecord,
    GpuOption,
    PlanAssumptions,
    ProbeRecord,
)
from orchestrator.planning import calibration as cal
from orchestrator.planning.estimator import Budget, StepFactory
from orchestrator.planning.memory import DEFAULT_OVERHEADS
from orchestrator.planning.placement import plan_placed
from orchestrator.planning.pool import plan_curriculum
from orchestrator.planning.probe import host_budget_gb, probe, slurm_answers
from orchestrator.planning.schedule import (
    DatasetSize,
    batch_cap,
    derive_schedule,
    job_time_min,
    measure_dataset,
)
from orchestrator.planning.slice_size import fit_slice_to_data
from orchestrator.planning.verify import VERIFY_STEPS, verify_plan

logger = logging.getLogger(__name__)
HOST_SHARE = 0.8  # of available RAM, when planning for the CPU without --target-mem
GPU_SHARE = 0.95  # of the smallest GPU's free memory, without --target-mem


@dataclass(frozen=True)
class PlanRequest:
    curriculum: Path
    target_mem_gb: float | None = None
    device: DeviceName = "auto"
    cluster: str | None = None
    data_dir: Path | None = None
    run: str | None = None
    runs_dir: Path = Path("runs")
    calibrate: bool = True  # apply ratios from earlier `plan --verify` runs on this hardware
    dataset: DatasetSize | None = None  # the data planned for, instead of measuring data_dir
    # a mixed-GPU plan (planning/placement.py): the types to place stages on, and pins
    gpu_options: tuple[GpuOption, ...] = ()
    pins: tuple[tuple[str, str], ...] = ()  # (stage, the only type it may go to)


def parse_target_mem(text: str | None) -> float | None:
    """--target-mem as GB; 'abc', 0 or negative is a ConfigError."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--target-mem: expected a number of GB (e.g. 20), got {text!r}") from None
    if not 0 < value <= 16384:  # NaN, inf and 1e9 are typos, not budgets
        raise ConfigError(f"--target-mem: expected a positive number of GB up to 16384, got {text!r}")
    return value


@dataclass(frozen=True)
class DeviceChoice:
    device: Literal["cuda", "cpu"]
    budget_gb: float
    budget_source: str  # where the budget came from
    device_source: str  # why this device


def choose_budget(req: PlanRequest, p: ProbeRecord, cluster: ClusterProfile) -> DeviceChoice:
    """The device planned for and its budget, each with where it came from.

    `--device auto`: a GPU here; else the cluster profile's GPU when it has one (planning
    on a login node for the nodes the jobs will run on); else this machine's CPU.
    """
    device, why = req.device, f"--device {req.device}"
    if device == "auto":
        if p.gpus:
            device, why = "cuda", f"{p.gpus[0].name} here"
        elif cluster.gpus_per_node:
            device, why = "cuda", (f"no GPU here; cluster profile {cluster.name} has "
                                   f"{cluster.gpus_per_node} per node")
        else:
            device, why = "cpu", f"no GPU here, and cluster profile {cluster.name} has none"
    if req.target_mem_gb is not None:
        if device == "cuda" and p.gpus and req.target_mem_gb > min(g.total_gb for g in p.gpus):
            raise ConfigError(f"--target-mem: {req.target_mem_gb:g} GB is more than the GPU's "
                              f"{min(g.total_gb for g in p.gpus):.1f} GB")
        return DeviceChoice(device, req.target_mem_gb, "--target-mem", why)
    if device == "cuda":
        if p.gpus:
            return DeviceChoice("cuda", round(min(g.free_gb for g in p.gpus) * GPU_SHARE, 2),
                                f"{GPU_SHARE:.0%} of the free memory of {p.gpus[0].name}", why)
        if cluster.gpu_mem_gb:
            return DeviceChoice("cuda", cluster.gpu_mem_gb,
                                f"cluster profile {cluster.name}: gpu_mem_gb", why)
        raise ConfigError("--device cuda: no GPU here; give --target-mem GB or a cluster profile "
                          "with gpu_mem_gb")
    return DeviceChoice("cpu", round(host_budget_gb(p) * HOST_SHARE, 2),
                        f"{HOST_SHARE:.0%} of available RAM", why)


def placed_choice(req: PlanRequest) -> DeviceChoice:
    """A mixed-GPU plan: CUDA, each stage's budget its type's memory (the largest shown)."""
    types = ", ".join(o.describe() for o in sorted(req.gpu_options, key=lambda o: o.mem_gb))
    return DeviceChoice("cuda", max(o.mem_gb for o in req.gpu_options),
                        "each stage's GPU type's memory (placement); the largest shown",
                        f"the cluster's GPU types: {types}")


def cpu_plan_notice(req: PlanRequest, choice: DeviceChoice, cluster_source: str,
                    slurm_answers: Callable[[], bool]) -> str | None:
    """What `plan` says first when it plans for this machine's CPU on a machine where SLURM
    answers (a login node, where a GPU plan was most likely meant); None otherwise."""
    if req.device != "auto" or choice.device != "cpu" or not slurm_answers():
        return None
    return (f"planning for this machine's CPU ({choice.device_source}; profile from "
            f"{cluster_source}), though SLURM answers here: to plan for the cluster's GPUs use "
            f"--cluster NAME (a profile with gpus_per_node; set it once with {ENV_CLUSTER} or "
            f"`cluster:` in {user_config_path()}) or --device cuda --target-mem GB")


def make_plan(req: PlanRequest, step_factory: StepFactory,
              progress: Callable[[str], None] | None = None,
              notice: Callable[[str], None] | None = None) -> Plan:
    """Probe, choose the budget and plan every stage (nothing is written).

    With `req.data_dir`, the dataset caps each stage's batch and sets the epochs and
    iterations the stage YAML leaves out (planning/schedule.py). Ratios recorded by an
    earlier `plan --verify` on this hardware calibrate the predictions.

    Raises:
        ConfigError: a bad curriculum, stage, cluster or calibration file, or a bad flag.
        DataError: the data folder holds no usable subjects.
        PlanError: a stage cannot fit the budget.
    """
    cur, stages = load_curriculum(req.curriculum)
    cluster_source = "--cluster" if req.cluster else default_cluster()[1]
    cluster, cluster_path = resolve_cluster(req.cluster)
    cluster.check_stage_names(str(cluster_path), [s.name for s, _ in stages])
    if req.data_dir is not None and not Path(req.data_dir).is_dir():
        raise ConfigError(f"--data: {req.data_dir} is not a directory")
    ds = measure_dataset(Path(req.data_dir)) if req.data_dir is not None else req.dataset
    fitted = [(fit_slice_to_data(s, ds.largest_shape_vox if ds else None), init) for s, init in stages]
    stages, slice_reasons = [(s, init) for (s, _), init in fitted], {s.name: r for (s, r), _ in fitted if r}
    p = probe()
    choice = placed_choice(req) if req.gpu_options else choose_budget(req, p, cluster)
    device, budget_gb, source = choice.device, choice.budget_gb, choice.budget_source
    said = cpu_plan_notice(req, choice, cluster_source, slurm_answers)
    if said and notice:
        notice(said)  # before the stages are planned: the command's first line
    overheads = DEFAULT_OVERHEADS[device]
    cal_path = cal.calibration_path() if req.calibrate else None
    hardware = cal.hardware_key(device, p)
    ratios = cal.load_ratios(cal_path, hardware, [s for s, _ in stages])
    budget = Budget(budget_gb, overheads, cuda_target=device == "cuda", calibration=ratios)
    if ds is not None and ds.largest_shape_vox:  # validation slides over the largest volume
        budget.val_volume_vox = tuple(ds.largest_shape_vox)
    caps = {s.name: batch_cap(s, ds) for s, _ in stages} if ds else None
    if req.gpu_options:
        def budget_for(gb: float) -> Budget:
            return Budget(gb, overheads, cuda_target=True, calibration=ratios,
                          val_volume_vox=tuple(budget.val_volume_vox))
        planned = plan_placed(stages, list(req.gpu_options), budget_for, step_factory, caps,
                              dict(req.pins), progress=progress)
    else:
        planned = plan_curriculum(stages, budget, step_factory, caps, progress=progress)
    planned = [sp.model_copy(update={"reasons": [slice_reasons[sp.name], *sp.reasons]})
               if sp.name in slice_reasons else sp for sp in planned]
    if ds is not None:
        planned = [_with_schedule(sp, ds) for sp in planned]
        said_raw = _raw_data_notice(ds, planned, cluster.cpus_per_task) if req.data_dir else None
        if said_raw and notice:
            notice(said_raw)
    assumptions = PlanAssumptions(
        budget_source=source, device_source=choice.device_source,
        val_volume_vox=tuple(budget.val_volume_vox),
        overheads=overheads,
        cluster=ClusterSource(file=_shown_path(cluster_path), chosen_by=cluster_source,
                              set=sorted(cluster.model_fields_set)),
        estimate="peak live tensors of a real training step (optimizer state present) on fake "
                 "tensors" + (", CUDA autocast dtypes emulated" if device == "cuda" else ""),
        calibration=CalibrationRecord(
            file=str(cal_path) if cal_path else None, hardware=hardware,
            applied={k: round(v[0], 4) for k, v in ratios.items()},
            fingerprints={s.name: cal.stage_fingerprint(s) for s, _ in stages}),
        dataset=DatasetRecord(root=ds.root, subjects=len(ds.records),
                              voxels=sum(ds.voxels.values())) if ds is not None else None,
        gpu="no GPU here: planning for one (bf16 autocast assumed)"
            if device == "cuda" and not p.gpus else None,
        device_notice=said)
    name = req.run or time.strftime("run-%Y%m%d-%H%M%S")
    return Plan(run=name, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), device=device,
                budget_gb=budget_gb, data_dir=str(Path(req.data_dir).resolve()) if req.data_dir else None,
                runs_dir=str(Path(req.runs_dir).resolve()), curriculum=str(Path(req.curriculum).resolve()),
                cluster=cluster, probe=p, assumptions=assumptions,
                handoff_noise_std=cur.handoff_noise_std, stages=planned)


def _raw_data_notice(ds: DatasetSize, planned: list[StagePlan], cpus: int) -> str | None:
    """`plan --data` on raw NIfTI: once, what the HDF5 cache would save per epoch."""
    first = next((sp for sp in planned if sp.kind == "seg3d"), None)
    if first is None or not ds.voxels:
        return None
    workers = first.spec.num_workers if first.spec.num_workers is not None else min(4, cpus - 1)
    samples = first.spec.iterations_per_epoch * first.batch_size * first.spec.grad_accum_steps
    return raw_data_notice(ds.root, ds.records, sum(ds.voxels.values()) / len(ds.voxels),
                           samples, workers)


def _shown_path(path: Path) -> str:
    """The profile's path as a user would type it: relative to the checkout if inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(Path(path).resolve())


def _with_schedule(sp: StagePlan, ds: DatasetSize) -> StagePlan:
    update, reasons = derive_schedule(sp.spec, sp.input_size_vox, sp.batch_size, ds)
    if not update:
        return sp
    return sp.model_copy(update={"spec": sp.spec.model_copy(update=update),
                                 "reasons": [*sp.reasons, *reasons]})


def verify_and_calibrate(plan: Plan, plan_path: Path, worker: str,
                         progress: Callable[[str], None] | None = None,
                         steps: int | None = None) -> Plan:
    """Measure every stage (`verify.verify_plan`), rewrite plan.yaml with the results and
    record the measured/predicted ratios for later plans on this hardware.

    Raises:
        PlanError: a GPU plan on a machine without a GPU.
        ConfigError: the calibration file exists but is not one.
    """
    plan = verify_plan(plan, plan_path, worker, steps or VERIFY_STEPS, progress=progress)
    plan = plan.model_copy(update={"stages": [_with_time(s) for s in plan.stages]})
    info = plan.assumptions.calibration or CalibrationRecord()
    path, hardware = cal.calibration_path(), info.hardware
    ok = {cal.entry_name(s.name, s.checkpointing): {
              "stage": s.name, "ratio": s.measurement["uncalibrated_ratio"],
              "measured_gb": s.measured_gb,
                   "predicted_gb": s.measurement["uncalibrated_predicted_gb"],
                   "method": s.measurement["method"],
                   "config": {"input_size_vox": list(s.input_size_vox), "batch_size": s.batch_size,
                              "base_filters": s.base_filters, "checkpointing": s.checkpointing,
                              "amp": s.amp}}
          for s in plan.stages if s.measurement and "error" not in s.measurement}
    specs = {s.name: s.spec for s in plan.stages}
    if path is not None and hardware and ok:
        cal.record_ratios(path, hardware, ok, specs, info.fingerprints)
        info = info.model_copy(update={"recorded": CalibrationWrite(file=str(path), stages=sorted(ok))})
    plan = plan.model_copy(update={
        "assumptions": plan.assumptions.model_copy(update={"calibration": info})})
    atomic_write_text(plan_path, plan_to_yaml(plan))
    return plan


def _with_time(sp: StagePlan) -> StagePlan:
    """The stage's job time from its measured step (used where the profile sets none)."""
    step_s = (sp.measurement or {}).get("step_s")
    if not step_s:
        return sp
    minutes, how = job_time_min(sp.spec, float(step_s))
    return sp.model_copy(update={"time_estimate_min": minutes,
                                 "reasons": [*sp.reasons, f"job time {minutes} min: {how}"]})


def write_plan(plan: Plan) -> Path:
    """Write runs/<run>/plan.yaml atomically; refuses to overwrite a run that was submitted."""
    path = plan.run_dir / "plan.yaml"
    if (plan.run_dir / "state.json").exists():
        raise PlanError(f"{plan.run_dir}: run already submitted; choose another --run name")
    atomic_write_text(path, plan_to_yaml(plan))
    return path
