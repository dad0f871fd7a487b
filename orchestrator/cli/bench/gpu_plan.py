"""Sections 1-3 of `bench gpu` (see bench_gpu.py): plan, verify, step time.

They plan the curriculum (stages/progressive.yaml; at the quick sizes one 16^3 stage) at
20 GB and at the device's own size, then run the 20 GB plan's stages as `plan --verify`
does (a fresh process each), and time `TrainStep` for each in this process.
"""
from __future__ import annotations

import functools
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import models
from orchestrator.cli.bench.gpu_run import GpuBench, Skipped, free_device_memory
from orchestrator.config import DEFAULT_CURRICULUM, REPO_ROOT, Plan, StagePlan
from orchestrator.planning import planner
from orchestrator.planning.nvml import NvmlSampler
from orchestrator.planning.plan_file import PlanRequest, make_plan, write_plan
from orchestrator.planning.verify import verify_plan
from orchestrator.training.step import TrainStep, sdm_placeholder
from orchestrator.training.step import estimation_step as step_factory  # the planner's step

WORKER = "orchestrator.training.trial"


def quick_curriculum(tmp: Path, patch_vox: int) -> Path:
    """Stage 1 at a tiny size, three levels deep (as stages/demo.yaml shrinks the curriculum)."""
    stage = REPO_ROOT / "stages" / "stage1_basic_cnn.yaml"
    path = tmp / "bench-quick.yaml"
    path.write_text(
        f"name: bench-quick\nstages:\n  - file: {stage}\noverrides:\n"
        f"  input_size_vox: [{patch_vox}, {patch_vox}, {patch_vox}]\n  base_filters: 4\n"
        "  model: {levels: 3}\n"
        "  batch_size: 2\n  val_fraction: 0.34\n"
        f"  planner: {{min_base_filters: 4, min_input_vox: {patch_vox}, max_batch_size: 2, "
        "min_batch_size: 2}\n")
    return path


def _say_stage(b: GpuBench, label: str, stage: str) -> None:
    b.say(f"      {label}: {stage}")


def plan_section(b: GpuBench) -> dict[str, Any]:
    """Plan every stage at 20 GB and at the device's own size, each from a cold estimate
    cache (as a user's `plan` runs); one budget failing leaves the other's figures."""
    quick = b.sizes.quick_patch_vox
    curriculum = quick_curriculum(b.tmp, quick) if quick else DEFAULT_CURRICULUM
    figures: dict[str, float] = {}
    plans: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for label, gb in (("20gb", 20.0), ("own", None)):
        req = PlanRequest(curriculum=curriculum, target_mem_gb=gb, device=b.device,
                          cluster="local", run=f"bench-gpu-{label}", runs_dir=b.runs_dir,
                          calibrate=False)
        planner.clear_estimate_cache()
        t0 = time.perf_counter()
        try:
            plan = make_plan(req, step_factory,
                             progress=functools.partial(_say_stage, b, label))
        except Exception as err:  # noqa: BLE001 -- the other budget still counts
            errors[label] = b.failure(err)
            continue
        figures[f"plan_{label}_s"] = time.perf_counter() - t0
        figures[f"plan_{label}_budget_gb"] = plan.budget_gb
        plans[label] = {"budget_gb": plan.budget_gb, "budget_source": plan.assumptions.budget_source,
                        "estimates": planner.estimates_run(),
                        "stages": [_stage_row(sp) for sp in plan.stages]}
        if label == "20gb":
            b.plan20, b.plan20_path = plan, write_plan(plan)
    return {"figures": figures, "errors": errors, "curriculum": str(curriculum), "plans": plans}


def _stage_row(sp: StagePlan) -> dict[str, Any]:
    return {"name": sp.name, "input_size_vox": list(sp.input_size_vox), "base_filters": sp.base_filters,
            "batch_size": sp.batch_size, "checkpointing": sp.checkpointing, "amp": sp.amp,
            "params": sp.params, "predicted_gb": sp.predicted_gb, "train_gb": sp.train_gb}


def need_plan(b: GpuBench) -> tuple[Plan, Path]:
    if b.plan20 is None or b.plan20_path is None:
        raise Skipped("no 20 GB plan (section 1 failed)")
    return b.plan20, b.plan20_path


def verify_section(b: GpuBench) -> dict[str, Any]:
    """`plan --verify` of the 20 GB plan, with NVML sampled while each trial runs."""
    plan, path = need_plan(b)
    with NvmlSampler() as sampler:
        def progress(name: str) -> None:
            b.say(f"      {name} ({b.sizes.verify_steps} steps in a fresh process)")
            sampler.mark(name)

        verified = verify_plan(plan, path, WORKER, b.sizes.verify_steps, progress=progress)
    figures: dict[str, float] = {}
    errors: dict[str, str] = {}
    stages: dict[str, Any] = {}
    for sp in verified.stages:
        m = stages[sp.name] = dict(sp.measurement or {})
        if "error" in m:
            errors[sp.name] = m["error"]
            continue
        key = f"verify_{sp.name}"
        figures.update({f"{key}_predicted_gb": m["predicted_gb"], f"{key}_measured_gb": m["peak_gb"],
                        f"{key}_ratio": m["ratio"], f"{key}_tensor_ratio": m["tensor_ratio"]})
        if b.device == "cuda" and sp.name in sampler.segments:
            m["nvml"] = sampler.segments[sp.name].summary(exclude_pid=os.getpid())
            figures.update(nvml_figures(key, m["nvml"], m["predicted_gb"]))
        if m.get("nvml_used_gb") is not None:  # NVML read by the trial itself at its end
            figures[f"{key}_nvml_trial_gb"] = m["nvml_used_gb"]
    return {"figures": figures, "errors": errors, "stages": stages,
            "nvml": sampler.error or "sampled every 20 ms while each trial ran"}


def nvml_figures(key: str, nvml: dict[str, Any], predicted_gb: float) -> dict[str, float]:
    """NVML's peak for a trial: its own process where NVML lists it, else what the GPU's
    used memory grew by while it ran (`nvml["compared"]` says which)."""
    nvml["compared"] = "process_peak_gb" if nvml["process_peak_gb"] is not None else "device_delta_gb"
    gb = nvml[nvml["compared"]]
    return {f"{key}_nvml_gb": gb, f"{key}_nvml_ratio": gb / predicted_gb}


def step_section(b: GpuBench) -> dict[str, Any]:
    """Each stage's steady step at its planned size and precision: `TrainStep` alone."""
    plan, _ = need_plan(b)
    figures: dict[str, float] = {}
    errors: dict[str, str] = {}
    stages: dict[str, Any] = {}
    for sp in plan.stages:
        b.say(f"      {sp.name} ({b.sizes.step_steps} steps after 2 warm-up)")
        try:
            stages[sp.name] = r = time_train_step(sp, b.device, b.sizes.step_steps)
        except Exception as err:  # noqa: BLE001 -- the other stages still run
            errors[sp.name] = b.failure(err)
            continue
        finally:
            free_device_memory(b.device)
        if r["skipped_steps"]:
            errors[sp.name] = f"{r['skipped_steps']} of {r['steps']} steps skipped (non-finite)"
        vox = sp.batch_size * math.prod(sp.input_size_vox)
        figures.update({f"step_{sp.name}_s": r["step_s"],
                        f"step_{sp.name}_samples_per_s": sp.batch_size / r["step_s"],
                        f"step_{sp.name}_mvox_per_s": vox / r["step_s"] / 1e6})
    return {"figures": figures, "errors": errors, "stages": stages,
            "how": f"TrainStep (synchronised) on a random batch of the planned shape: median of "
                   f"{b.sizes.step_steps} steps after 2 warm-up"}


def time_train_step(sp: StagePlan, device: str, steps: int) -> dict[str, Any]:
    """Seconds per `TrainStep` of a planned stage on `device` (the model, AdamW and a random
    batch of the planned shape built here; nothing else on the clock)."""
    dev = torch.device(device)
    step = TrainStep.for_stage(sp.spec, dev.type, sp.amp, micro=1, synchronize=True)
    torch.manual_seed(sp.spec.seed)
    net = models.build_model(sp.spec.model.arch, **sp.model_kwargs()).to(dev).train()
    adamw = torch.optim.AdamW(net.parameters(), lr=sp.spec.lr, weight_decay=sp.spec.weight_decay)
    channels = sp.spec.model.input_channels
    images = torch.randn(sp.batch_size, channels, *sp.input_size_vox, device=dev)
    labels = torch.randint(0, 2, (sp.batch_size, *sp.input_size_vox), device=dev)
    maps = sdm_placeholder(step, images)
    seconds, skipped = [], 0
    for k in range(steps + 2):  # two warm-up steps: kernel selection, AdamW state, allocator
        t0 = time.perf_counter()
        result = step(net, adamw, images, labels, sdm=maps)
        if k >= 2:
            seconds.append(time.perf_counter() - t0)
            skipped += result.skipped is not None
    return {"step_s": statistics.median(seconds), "steps": steps, "skipped_steps": skipped,
            "batch_size": sp.batch_size, "input_size_vox": list(sp.input_size_vox),
            "amp_dtype": str(step.amp_dtype or "float32 (no AMP)")}
