"""Build a stage's runner from its parts: the model, the data, the optimizer and step,
and the rank's role and peers (training/rank.py) for checkpoint and state I/O.

`build_runner(plan, stage)` is a process training alone (the writer, no peers);
`trainer.run_stage` passes a DDP rank's role and peers.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import cast

import torch

import models
from orchestrator.config import Plan, StagePlan
from orchestrator.data.dataset import PatchDataset
from orchestrator.data.folds import split_records
from orchestrator.data.intensity import Normalization
from orchestrator.data.slices import SliceStackDataset
from orchestrator.data.sources import discover_subjects
from orchestrator.errors import CheckpointError
from orchestrator.training.devices import resolve_device
from orchestrator.training.lr_schedule import lr_factor
from orchestrator.training.memory_guard import limit_gpu_memory
from orchestrator.training.rank import Peers, Role, Solo, Writer
from orchestrator.training.runner import Optimization, StageData, StageRunner
from orchestrator.training.step import TrainStep
from orchestrator.training.validation import volume_predictor

logger = logging.getLogger(__name__)


def build_runner(plan: Plan, stage: str, device: str = "auto", *, role: Role | None = None,
                 peers: Peers | None = None) -> StageRunner:
    """The runner of `stage`: one process's share of its training, not yet started.

    Args:
        plan: the loaded plan.
        stage: the stage's name in the plan.
        device: auto (CUDA where there is a GPU), cuda or cpu.
        role: who writes (default: this process, `rank.Writer`).
        peers: who else trains the stage (default: nobody, `rank.Solo`).

    Raises:
        CheckpointError: the plan names no data directory.
    """
    role, peers = role or Writer(), peers or Solo()
    sp = plan.stage(stage)
    dev = resolve_device(device)  # the GPU where there is one
    torch.manual_seed(sp.spec.seed)
    model = models.build_model(sp.spec.model.arch, **sp.model_kwargs()).to(dev)
    train_step = TrainStep.for_stage(sp.spec, dev.type, sp.amp, agree=peers.agree_loss)
    optimization = _optimization(sp, model, train_step, ddp_lr_factor(
        plan.cluster.ddp_lr_scaling, peers.world), handed_off=bool(
        sp.init_from or sp.spec.init_checkpoint))
    data = _data(plan, sp, optimization.step_batch * peers.world, train_step, dev)
    # GPU only: the plan's budget binds the allocator; an OOM in the first steps falls
    # back (checkpointing, then accumulation) and is recorded (training/memory_guard.py)
    limit = limit_gpu_memory(plan.budget_gb, plan.assumptions.overheads.context_gb
                             if plan.assumptions.overheads else 0.0, dev)
    if limit:
        logger.info("%s: %s", stage, limit)
    return StageRunner(plan, sp, dev, model, data, optimization, role, peers)


def ddp_lr_factor(rule: str, ranks: int) -> float:
    """The learning rate's factor under DDP over `ranks` ranks (the profile's
    `ddp_lr_scaling`): 1 (none), sqrt(ranks) or ranks (linear)."""
    return {"none": 1.0, "sqrt": math.sqrt(ranks), "linear": float(ranks)}[rule]


def _optimization(sp: StagePlan, model: torch.nn.Module, train_step: TrainStep,
                  lr_factor_ddp: float, handed_off: bool) -> Optimization:
    """AdamW over the trainable parameters (an encoder frozen by `freeze`), the learning
    rate schedule, and the step: grad_accum_steps backward passes of batch_size samples.
    `lr_factor_ddp` scales the stage's rate (and its floor) under DDP."""
    spec = sp.spec
    if spec.freeze == "encoder":
        models.freeze_encoder(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if lr_factor_ddp != 1.0:
        logger.info("%s: learning rate %.3g x %.3g (DDP, ddp_lr_scaling)", spec.name, spec.lr,
                    lr_factor_ddp)
    opt = torch.optim.AdamW(trainable, lr=spec.lr * lr_factor_ddp, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(spec, handed_off))
    return Optimization(train_step, opt, sched, sp.batch_size * spec.grad_accum_steps)


def _data(plan: Plan, sp: StagePlan, epoch_batch: int, train_step: TrainStep,
          device: torch.device) -> StageData:
    """The stage's train/validation split (a CV fold's where the plan has one) and its
    training dataset of `epoch_batch` x iterations_per_epoch samples (DDP: every rank's)."""
    spec = sp.spec
    if plan.data_dir is None:
        raise CheckpointError(f"plan {plan.run}: no data directory (plan with --data DIR)")
    records = discover_subjects(Path(plan.data_dir))
    train_recs, val_recs = split_records(records, plan.val_subjects, spec.val_fraction, spec.seed)
    dataset = _training_dataset(sp, train_recs, epoch_batch, train_step.needs_sdm)
    normalization = Normalization.of_stage(spec)  # z-score or the dataset's mean/std
    dataset.normalization = normalization
    predict = volume_predictor(spec.kind, sp.model_kwargs(), sp.input_size_vox, device,
                               train_step.amp_dtype)
    return StageData(train_recs, val_recs, dataset, normalization, predict)


def _training_dataset(sp: StagePlan, records: list, epoch_batch: int,
                      with_sdm: bool) -> PatchDataset | SliceStackDataset:
    """3D patches for the 3D family (with their signed distance maps for the boundary loss),
    2T+1 slice stacks for LCNN; both pure in (seed, epoch, i)."""
    spec = sp.spec
    samples = spec.iterations_per_epoch * epoch_batch
    augment = spec.augment_strength if spec.augment else 0.0
    size = sp.input_size_vox  # the datasets check its length (2D slices, 3D patches)
    if sp.kind == "lcnn":
        return SliceStackDataset(records, spec.model.input_channels,
                                 cast(tuple[int, int], tuple(size)), samples,
                                 lesion_fraction=spec.lesion_fraction, seed=spec.seed,
                                 augment=augment)
    return PatchDataset(records, cast(tuple[int, int, int], tuple(size)), samples,
                        lesion_fraction=spec.lesion_fraction, seed=spec.seed, augment=augment,
                        with_sdm=with_sdm)
