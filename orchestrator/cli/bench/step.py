"""`orchestrator bench step`: the trainer's training step against a bare PyTorch loop.

Both run the same model (stage 1 of the curriculum, same initial weights), the same batch
and the same objective (forward + loss under the same autocast) on this machine's GPU
where there is one (`--device`), else its CPU:

- trainer: what `StageRunner.train_steps` runs per batch (`OomFallback.step` around
  `StageRunner._one_step`: `TrainStep`, the cosine schedule, the loss bookkeeping);
- step: `TrainStep` alone (finite-loss check, GradScaler, gradient clipping, AdamW): the
  one step the trainer, the planner's estimate and `plan --verify` run;
- bare: `loss.backward(); opt.step(); opt.zero_grad()`.

The objective is the stage's (GDL + Focal + Boundary, deep supervision where the model
has it), so what differs is only what the trainer wraps around it.

Blocks of steps alternate (trainer, step, bare, trainer, ...) so that the machine's load
hits all alike; the figures are medians over blocks, and the ratios are over bare.
Data loading is not in either figure (see `bench data`).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

import models
from orchestrator.atomic import atomic_write_text
from orchestrator.cli.bench.data import machine_info
from orchestrator.config import (
    DEFAULT_CURRICULUM,
    Plan,
    StagePlan,
    load_curriculum,
    plan_to_yaml,
    resolve_cluster,
)
from orchestrator.data.synth import synthesize_atlas
from orchestrator.training.parts import build_runner
from orchestrator.training.step import TrainStep

STAGE = "stage1_basic_cnn"


def bench_step(input_vox: int = 64, batch_size: int = 2, steps: int = 6, blocks: int = 5,
               tmp_dir: Path | None = None, device: str = "auto") -> dict:
    """Median seconds per step of the trainer, of `TrainStep` and of a bare loop (about a
    minute and a half on 2 cores).

    Args:
        input_vox: side of the cubic patch.
        batch_size: samples per step.
        steps: steps per timed block; blocks: timed blocks of each kind.
        tmp_dir: where the synthetic data and the run go (default: the system's temp).
        device: auto (the GPU where there is one), cuda or cpu.

    Returns:
        {"bench": "step", "machine": {...}, "figures": {"trainer_step_s", "train_step_s",
        "bare_step_s", "trainer_vs_bare_ratio", "train_step_vs_bare_ratio", ...}}.
    """
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="bench-step-") as tmp:
        root = Path(tmp)
        synthesize_atlas(root / "data", subjects=3, shape_vox=(input_vox + 16,) * 3, seed=0)
        plan = _unplanned_plan(root, input_vox, batch_size)
        runner = build_runner(plan, STAGE, device)
        dev = runner.device
        runner.start()
        loader = torch.utils.data.DataLoader(runner.dataset, batch_size=batch_size)
        batch = next(iter(loader))
        sp = runner.sp
        bare_model = models.build_model(sp.spec.model.arch, **sp.model_kwargs())
        bare_model.load_state_dict(runner.model.state_dict())
        bare_model.to(dev).train()
        bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=sp.spec.lr,
                                     weight_decay=sp.spec.weight_decay)
        step_model = models.build_model(sp.spec.model.arch, **sp.model_kwargs())
        step_model.load_state_dict(runner.model.state_dict())
        step_model.to(dev).train()
        step_opt = torch.optim.AdamW(step_model.parameters(), lr=sp.spec.lr,
                                     weight_decay=sp.spec.weight_decay)
        train_step = TrainStep.for_stage(sp.spec, dev.type, sp.amp, synchronize=True)
        objective, amp_dtype = runner.objective, runner.amp_dtype
        x, y = batch["image"].to(dev), batch["label"].to(dev)
        sdm = batch["sdm"].to(dev) if "sdm" in batch else None

        def trainer_step() -> None:
            runner.oom.step(runner._one_step, batch)
            runner.progress.step_in_epoch += 1
            runner.progress.global_step += 1
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def step_only() -> None:
            train_step(step_model, step_opt, x, y, sdm=sdm, epoch=0)

        def bare_step() -> None:
            loss = objective(bare_model, x, y, amp_dtype, dev.type, 0, sdm=sdm)
            loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        runner.model.train()
        kinds = (("trainer", trainer_step), ("step", step_only), ("bare", bare_step))
        for _, fn in kinds:  # warm-up: allocator, oneDNN kernels
            fn()
            fn()
        times: dict[str, list[float]] = {name: [] for name, _ in kinds}
        for _ in range(blocks):
            for name, fn in kinds:
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                times[name].append((time.perf_counter() - t0) / steps)
    trainer_s, bare_s = statistics.median(times["trainer"]), statistics.median(times["bare"])
    step_s = statistics.median(times["step"])
    figures = {"trainer_step_s": trainer_s, "bare_step_s": bare_s, "train_step_s": step_s,
               "trainer_vs_bare_ratio": trainer_s / bare_s, "train_step_vs_bare_ratio": step_s / bare_s,
               "trainer_step_min_s": min(times["trainer"]), "bare_step_min_s": min(times["bare"]),
               "input_vox": input_vox, "batch_size": batch_size, "params": sp.params,
               "amp": float(amp_dtype is not None)}
    return {"bench": "step", "machine": {**machine_info(torch.__version__), "stage": STAGE,
                                         "device": str(dev),
                                         "threads": torch.get_num_threads()},
            "figures": {k: round(float(v), 4) for k, v in figures.items()}}


def _unplanned_plan(root: Path, input_vox: int, batch_size: int):  # noqa: ANN202
    """A one-stage plan of stage 1 at the given size (the planner is not what is timed)."""
    _, stages = load_curriculum(DEFAULT_CURRICULUM)
    spec = next(s for s, _ in stages if s.name == STAGE)
    spec = spec.model_copy(update={"input_size_vox": (input_vox,) * 3, "batch_size": batch_size,
                                   "num_workers": 0, "augment": False})
    sp = StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=None,
                   input_size_vox=spec.input_size_vox, base_filters=spec.base_filters,
                   batch_size=batch_size, checkpointing=False, amp=spec.amp, params=0,
                   predicted_gb=0.0, reasons=["bench step: the stage's own numbers"])
    with torch.device("meta"):
        params = sum(p.numel() for p in models.build_model(spec.model.arch,
                                                           **sp.model_kwargs()).parameters())
    sp = sp.model_copy(update={"params": params})
    plan = Plan(run="bench-step", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), device="cpu",
                budget_gb=1.0, data_dir=str(root / "data"), runs_dir=str(root / "runs"),
                curriculum=str(DEFAULT_CURRICULUM), cluster=resolve_cluster("local")[0], probe={},
                stages=[sp])
    atomic_write_text(plan.run_dir / "plan.yaml", plan_to_yaml(plan))
    return plan
