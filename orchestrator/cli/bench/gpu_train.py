"""The sections of `bench gpu` that train (see bench_gpu.py): fp16, oom, loader.

Each runs stage 1 of the bench's 20 GB plan through the trainer (`StageRunner`,
`run_stage`) on synthetic ATLAS-size subjects from the HDF5 cache, in a run of its own
(a one-stage copy of the plan with the data and a short schedule).
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.atomic import atomic_write_text
from orchestrator.cli.bench.gpu_plan import need_plan
from orchestrator.cli.bench.gpu_run import GpuBench, Skipped
from orchestrator.config import Plan, load_plan, plan_to_yaml
from orchestrator.data.cache import build_cache
from orchestrator.data.synth import synthesize_atlas
from orchestrator.planning.verify import plan_overheads, predicted_tensor_gb
from orchestrator.runs.state import read_state
from orchestrator.training.checkpoints import load_checkpoint
from orchestrator.training.loader import num_workers
from orchestrator.training.metrics_log import MetricsLog
from orchestrator.training.parts import build_runner
from orchestrator.training.trainer import run_stage, stage_dir

OOM_SHARE = 0.5  # of the planned step's live tensors: the budget of the oom section


def data_dir(b: GpuBench) -> Path:
    """The HDF5 cache of the bench's synthetic subjects (made once, on first use).

    Raises:
        Exception: what making them raised (again for every section that needs them).
    """
    if isinstance(b.data_cache, BaseException):
        raise b.data_cache
    if b.data_cache is None:
        n, shape = b.sizes.subjects, b.sizes.subject_vox
        b.say(f"      synthesising {n} subjects of {'x'.join(map(str, shape))} and caching them")
        try:
            t0 = time.perf_counter()
            synthesize_atlas(b.tmp / "atlas", subjects=n, shape_vox=shape, seed=0)
            synth_s = time.perf_counter() - t0
            report = build_cache(b.tmp / "atlas")
        except Exception as err:
            b.data_cache = err
            raise
        b.data_cache = report.out
        b.doc["data"] = {"subjects": n, "shape_vox": list(shape), "synth_s": round(synth_s, 2),
                         "cache_s": round(report.seconds, 2), "cache": str(report.out)}
    return b.data_cache


def train_plan(b: GpuBench, run: str, steps: int, budget_gb: float | None = None,
               max_epochs: int = 1, val_every_epochs: int = 1,
               num_workers: int | None = 0, amp_dtype: str = "auto") -> tuple[Plan, Path]:
    """A one-stage copy of the 20 GB plan's first stage, with data and `steps` per epoch."""
    plan, _ = need_plan(b)
    sp = plan.stages[0]
    spec = sp.spec.model_copy(update={"iterations_per_epoch": steps, "max_epochs": max_epochs,
                                      "val_every_epochs": val_every_epochs, "warmup_epochs": 0,
                                      "num_workers": num_workers, "checkpoint_every_steps": 10**6,
                                      "amp_dtype": amp_dtype})
    amp = {"amp": True} if amp_dtype != "auto" else {}  # a dtype asked for: AMP on
    sp = sp.model_copy(update={"spec": spec, "init_from": None, **amp})
    plan = plan.model_copy(update={"run": f"bench-gpu-{run}", "stages": [sp],
                                   "data_dir": str(data_dir(b)),
                                   "budget_gb": budget_gb if budget_gb is not None else plan.budget_gb})
    path = plan.run_dir / "plan.yaml"
    atomic_write_text(path, plan_to_yaml(plan))
    return load_plan(path), path  # read back: what a job would run


def fp16_section(b: GpuBench) -> dict[str, Any]:
    """Stage 1 through the trainer with fp16 autocast and a GradScaler: the stage asks for
    it (`amp_dtype: fp16`, what `auto` gives on a GPU without bf16)."""
    steps = b.sizes.fp16_steps
    plan, _ = train_plan(b, "fp16", steps, amp_dtype="fp16")
    runner = build_runner(plan, plan.stages[0].name, device=b.device)
    runner.start()
    first_scale = runner.scaler.get_scale()
    t0 = time.perf_counter()
    runner.train_steps(max_steps=steps)
    seconds = time.perf_counter() - t0
    pr, scale = runner.progress, runner.scaler.get_scale()
    mean_loss = pr.epoch_loss_sum / pr.epoch_loss_steps if pr.epoch_loss_steps else float("nan")
    errors = {}
    if pr.global_step != steps or pr.epoch_loss_steps != steps:
        errors["steps"] = (f"{pr.global_step} steps run, {pr.epoch_loss_steps} with a finite loss; "
                           f"expected {steps}")
    if not math.isfinite(mean_loss):
        errors["loss"] = f"mean loss {mean_loss}"
    figures = {"fp16_steps": pr.global_step, "fp16_finite_loss_steps": pr.epoch_loss_steps,
               "fp16_mean_loss": mean_loss, "fp16_scale": scale,
               "fp16_scale_halvings": math.log2(first_scale / scale) if scale > 0 else float("nan"),
               "fp16_s_per_step": seconds / max(1, pr.global_step)}
    return {"figures": figures, "errors": errors, "amp_dtype": str(runner.train_step.amp_dtype),
            "scaler_enabled": runner.scaler.is_enabled(), "device": str(runner.device),
            "batch_size": runner.step_batch, "input_size_vox": list(runner.sp.input_size_vox),
            "how": "StageRunner.train_steps of a stage with amp_dtype fp16: GradScaler enabled"}


def oom_section(b: GpuBench) -> dict[str, Any]:
    """Stage 1 with its planned numbers under about half the memory its step needs.

    On a CPU (and at the quick sizes) the same run goes, so the CPU test covers it, and the
    section is skipped: a CPU has no allocator limit, and a quick stage fits in any limit
    the trainer sets.
    """
    plan20, _ = need_plan(b)
    sp20 = plan20.stages[0]
    overheads = plan_overheads(plan20)
    tensor_gb = predicted_tensor_gb(plan20, sp20)
    budget_gb = overheads.context_gb + overheads.workspace_gb + OOM_SHARE * tensor_gb
    steps = b.sizes.oom_steps
    plan, path = train_plan(b, "oom", steps, budget_gb=round(budget_gb, 3))
    stage = plan.stages[0].name
    run_stage(path, stage, max_steps=steps, device=b.device)
    entry = read_state(plan.run_dir)["stages"].get(stage, {})
    fallbacks = entry.get("memory_fallback") or []
    done = load_checkpoint(stage_dir(plan, stage) / "checkpoints" / "last.pt")["progress"]["global_step"]
    ran = (f"the same run here did {done} of {steps} steps under {budget_gb:.2f} GB with "
           f"{len(fallbacks)} fallbacks")
    if b.device != "cuda":
        raise Skipped(f"needs CUDA: a CPU has no allocator limit to set (there an allocation failure "
                      f"is the kernel's OOM killer, not an exception); {ran}")
    if b.doc["quick"]:
        raise Skipped(f"needs the full sizes: the trainer's allocator limit is at least 1 % of the "
                      f"GPU, more than the quick stage's {tensor_gb:.3f} GB of tensors; {ran}")
    errors = {}
    if not fallbacks:
        errors["fallback"] = (f"no out-of-memory error: the planned step (predicted "
                              f"{tensor_gb:.2f} GB of tensors) ran within {budget_gb:.2f} GB")
    if done != steps:
        errors["steps"] = f"{done} steps done; expected {steps}"
    figures = {"oom_budget_gb": budget_gb, "oom_planned_tensor_gb": tensor_gb,
               "oom_fallbacks": len(fallbacks), "oom_steps_done": done}
    return {"figures": figures, "errors": errors, "memory_fallback": fallbacks,
            "batch_size": sp20.batch_size, "input_size_vox": list(sp20.input_size_vox),
            "state": {k: entry.get(k) for k in ("state", "attempts", "error")}}


def loader_section(b: GpuBench) -> dict[str, Any]:
    """One short epoch of stage 1 through `run_stage`; then its loader alone, and the
    trainer's step alone on one batch already loaded (what the GPU consumes)."""
    steps = b.sizes.epoch_steps
    # two epochs with validation every second one: the first ends without validation, and
    # max_steps stops the second before its first step
    plan, path = train_plan(b, "loader", steps, max_epochs=2, val_every_epochs=2, num_workers=None)
    sp = plan.stages[0]
    run_stage(path, sp.name, max_steps=steps, device=b.device)
    rows = MetricsLog(stage_dir(plan, sp.name)).rows
    if not rows:
        raise RuntimeError(f"{sp.name}: no epoch row in metrics.csv after {steps} steps")
    epoch_s = float(rows[0]["seconds"])
    runner = build_runner(plan, sp.name, device=b.device)
    workers, batch = num_workers(sp), runner.step_batch
    loader = torch.utils.data.DataLoader(runner.dataset, batch_size=batch, drop_last=True,
                                         num_workers=workers, persistent_workers=False)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t_first = time.perf_counter()
    rest = sum(1 for _ in it)
    loader_s = time.perf_counter() - t_first
    step_s = _trainer_step_s(runner, first, b.sizes.step_steps)
    figures = {"loader_num_workers": workers, "loader_batch_size": batch,
               "loader_samples_per_s": rest * batch / max(loader_s, 1e-9),
               "loader_first_batch_s": t_first - t0,
               "gpu_step_s": step_s, "gpu_samples_per_s": batch / step_s,
               "epoch_steps": steps, "epoch_s": epoch_s, "epoch_samples_per_s": steps * batch / epoch_s}
    figures["loader_vs_gpu_ratio"] = figures["loader_samples_per_s"] / figures["gpu_samples_per_s"]
    figures["loader_keeps_up"] = float(figures["loader_vs_gpu_ratio"] >= 1.0)
    return {"figures": figures, "input_size_vox": list(sp.input_size_vox), "device": str(runner.device),
            "augment": sp.spec.augment, "data": b.doc["data"],
            "how": (f"loader: batches 2..{steps} of an epoch, {workers} workers; gpu: the trainer's "
                    f"step on one loaded batch, median of {b.sizes.step_steps} after 2 warm-up; "
                    "epoch: the first epoch's seconds in metrics.csv (loader and steps together)")}


def _trainer_step_s(runner: Any, batch: dict[str, Any], steps: int) -> float:
    """Median seconds of the trainer's step (`OomFallback.step(_one_step)`, as
    `train_steps` runs it) on one batch, after two warm-up steps."""
    runner.model.train()
    times = []
    for k in range(steps + 2):
        t0 = time.perf_counter()
        runner.oom.step(runner._one_step, batch)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
