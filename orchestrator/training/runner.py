"""The runner of one stage: its parts, and the loop that trains them (start, steps, epochs).

`training/parts.py` builds a `StageRunner` from its parts (model, data, optimizer and
step, the rank's role and peers); `trainer.run_stage` drives it to the end. What a DDP
rank does differently is not an override here: the role (`rank.Writer` or
`rank.Follower`) does or skips every write, and the peers (`rank.Solo` or
`distributed.DdpPeers`) share the samples and agree on stops, losses and rows.
Start: this stage's `last.pt` (a requeue), else the `init_from` stage's `final.pt`
through the hand-off, else the stage's `init_checkpoint` (fine-tuning) through the same
hand-off, else fresh.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import Plan, StagePlan
from orchestrator.data.host_memory import bound_volume_cache
from orchestrator.data.intensity import Normalization, load_normalised
from orchestrator.data.sources import training_orientation
from orchestrator.errors import CheckpointError, StageFailed
from orchestrator.runs import state as run_state
from orchestrator.training import checkpoints as ck
from orchestrator.training.continuity import aux_ramp_steps, validate_handoff
from orchestrator.training.display import StepDisplay
from orchestrator.training.handoff import checked_transfer
from orchestrator.training.loader import batches, epoch_loader, num_workers
from orchestrator.training.memory_guard import OomFallback
from orchestrator.training.metrics_log import peak_memory_gb
from orchestrator.training.rank import Peers, Role
from orchestrator.training.recovery import refuse_lost_progress
from orchestrator.training.run_model import RunModel
from orchestrator.training.step import TrainStep
from orchestrator.training.tensorboard_log import log_epoch, wrap_batches
from orchestrator.training.validation import validate

logger = logging.getLogger(__name__)
MAX_BAD_STEPS = 20


@dataclass
class Progress:
    """Where a stage is; restored from last.pt on a requeue."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_dice: float = -1.0
    bad_steps: int = 0
    epoch_loss_sum: float = 0.0  # running loss of the epoch, so a resumed epoch's row is exact
    epoch_loss_steps: int = 0


@dataclass
class StageData:
    """The stage's subjects and how it reads them."""

    train_recs: list[Any]
    val_recs: list[Any]
    dataset: Any  # PatchDataset or SliceStackDataset: pure in (seed, epoch, i)
    normalization: Normalization
    predict: Callable[..., Any]  # a whole volume's prediction, for validation


@dataclass
class Optimization:
    """How the stage's weights change: the step, the optimizer and its schedule."""

    train_step: TrainStep
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step_batch: int  # samples per step: batch_size x grad_accum_steps


def stage_dir(plan: Plan, stage: str) -> Path:
    return plan.run_dir / stage


class StageRunner:
    """The objects of one stage's training, built by `parts.build_runner`; the loop's steps."""

    display: StepDisplay | None = None
    _last_recorded = False  # state.json names last.pt once this process wrote it
    aux_ramp_steps = 0  # > 0: deep-supervision heads new from the hand-off ramp in over these
    orientation: str | None = None  # the training images' axis codes (predict checks them)
    cache_bound: Any = None  # the volume cache's bound, set at the first epoch

    def __init__(self, plan: Plan, sp: StagePlan, device: torch.device, model: torch.nn.Module,
                 data: StageData, optimization: Optimization, role: Role, peers: Peers) -> None:
        self.plan, self.sp, self.device, self.model = plan, sp, device, model
        self.role, self.peers = role, peers
        self.dir = stage_dir(plan, sp.name)
        self.ckpt_dir = self.dir / "checkpoints"
        self.train_recs, self.val_recs = data.train_recs, data.val_recs
        self.dataset, self.normalization, self.predict = data.dataset, data.normalization, data.predict
        self.train_step, self.opt, self.sched = (optimization.train_step, optimization.opt,
                                                 optimization.sched)
        self.step_batch = optimization.step_batch
        self.amp_dtype, self.scaler = self.train_step.amp_dtype, self.train_step.scaler
        self.forward_model = model  # what the step runs: the model, or its DDP after start()
        self.progress = Progress()
        self.log = role.metrics_log(self.dir)
        # the run's model (runs/<run>/best.pt): the 3D chain's best epoch over all stages
        self.run_model = RunModel(plan.run_dir) if role.writes and sp.kind == "seg3d" else None
        self.oom = OomFallback(self)

    @property
    def is_writer(self) -> bool:
        """Writes files and displays progress (a DDP rank other than 0 does not)."""
        return self.role.writes

    @property
    def objective(self) -> Any:
        """The stage's forward + loss (the step's)."""
        return self.train_step.objective

    # ------------------------------------------------------------------ start
    def start(self) -> str:
        """Load last.pt, or hand off from init_from's final.pt (or init_checkpoint), or start
        fresh; say which. Then the peers attach to the loaded model (DDP broadcasts rank 0's
        weights).

        Raises:
            CheckpointError: state.json says the stage got somewhere (an epoch, or a last.pt
                written) but last.pt is gone: starting over would be silent data loss; the
                message names the file and `resume --fresh`, which starts over on purpose.
                Also a checkpoint that is unreadable, refused or of another model family.
        """
        try:
            how = self._start()
        finally:
            self.aux_ramp_steps = aux_ramp_steps(self.dir / "handoff.json", self.sp.spec)
        self.forward_model = self.peers.attach(self.model)
        return how

    def _start(self) -> str:
        last = self.ckpt_dir / "last.pt"
        entry = run_state.read_state(self.plan.run_dir)["stages"].get(self.sp.name, {})
        fresh = bool(entry.get("fresh_requested"))
        self.role.remove_stale_temp_files([self.dir, self.ckpt_dir], self.sp.name)
        self.orientation = training_orientation(self.train_recs)
        if last.exists() and not fresh:
            return self._resume(last)
        if not fresh:
            refuse_lost_progress(last, entry, self.plan, self.sp.name)
        how = self._handoff() if (self.sp.init_from or self.sp.spec.init_checkpoint) else \
            "fresh start (no last.pt, no init_from)"
        self._write_split()
        if self.run_model is not None:  # status marks a stage that ends below this
            self.record(run_model_before=self.run_model.record)
        if self.log.rows:  # rows of an attempt whose last.pt is gone (a follower's are not on disk)
            self.log.truncate_after(-1)
        if self.role.writes and self.sp.init_from:
            how += validate_handoff(self)
        if fresh:  # a kill before the next last.pt must not resume the old one
            self.role.remove(last, self.ckpt_dir / "final.pt")
            self.record(fresh_requested=None)
            how = f"{how}; started over on purpose (resume --fresh)"
        return how

    def _resume(self, last: Path) -> str:
        ckpt = ck.load_checkpoint(last)
        arch = self.sp.spec.model.arch
        if ckpt["arch"] != arch:
            raise CheckpointError(f"{last}: a {ckpt['arch']} checkpoint; stage {self.sp.name} "
                                  f"trains {arch}")
        if "progress" not in ckpt:
            raise CheckpointError(f"{last}: weights only, no training state; expected the "
                                  "last.pt a stage writes")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.progress = Progress(**ckpt["progress"])
            ck.set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{last}: does not match stage {self.sp.name} of the plan "
                                  f"({type(err).__name__}: {first})") from None
        self.log.truncate_after(self.progress.epoch)
        return f"resumed from {last} (epoch {self.progress.epoch}, step {self.progress.step_in_epoch})"

    def _handoff(self) -> str:
        if not self.role.writes:  # the peers' attach() brings rank 0's weights
            return f"hand-off from {self.sp.init_from}: weights received from rank 0"
        if self.sp.init_from:
            src = stage_dir(self.plan, self.sp.init_from) / "checkpoints" / "final.pt"
            field = f"init_from {self.sp.init_from}"
        else:
            src = Path(str(self.sp.spec.init_checkpoint))
            field = "init_checkpoint"
        ckpt = ck.load_checkpoint(src)
        probe = (1, self.model_input_channels(), *ckpt["input_size_vox"])
        self.model.cpu()
        report = checked_transfer(ckpt, src, f"{field}; stage {self.sp.name}", self.model,
                                  self.sp.spec.model.arch, probe, self.plan.handoff_noise_std,
                                  self.sp.spec.seed)
        self.model.to(self.device)
        report = {"from": self.sp.init_from or ckpt.get("stage"), "checkpoint": str(src), **report}
        self.role.write_text(self.dir / "handoff.json", json.dumps(report, indent=2))
        return (f"hand-off from {report['from']} ({src}), max output diff "
                f"{report['max_output_diff']:.2e}")

    def load(self, rec: Any) -> Any:
        """A subject loaded and normalised as this stage trains on it."""
        return load_normalised(rec, self.normalization)

    def model_input_channels(self) -> int:
        return self.sp.spec.model.input_channels

    def _write_split(self) -> None:
        split = {"train": [r.subject + "/" + r.session for r in self.train_recs],
                 "val": [r.subject + "/" + r.session for r in self.val_recs]}
        self.role.write_text(self.dir / "split.json", json.dumps(split, indent=2))

    # ------------------------------------------------------------------ writes (the role's)
    def payload(self, full: bool) -> dict[str, Any]:
        p: dict[str, Any] = {"stage": self.sp.name, "arch": self.sp.spec.model.arch,
                             "model_kwargs": self.sp.model_kwargs(),
                             "input_size_vox": list(self.sp.input_size_vox),
                             "model": self.model.state_dict(), "best_dice": self.progress.best_dice,
                             "orientation": self.orientation,
                             "normalization": self.normalization.as_dict()}
        if full:
            p.update(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                     scaler=self.scaler.state_dict(), progress=self.progress.__dict__.copy(),
                     rng=ck.rng_state())
        return p

    def save_last(self) -> None:
        last = self.ckpt_dir / "last.pt"
        self.role.save_checkpoint(last, lambda: self.payload(full=True))
        if not self._last_recorded:  # from now on a missing last.pt is lost progress
            self.record(last_checkpoint=str(last))
            self._last_recorded = True

    def save_final(self, path: Path) -> None:
        """Every process holds the same weights (the peers check), then final.pt.

        Raises:
            StageFailed: DDP ranks ended with different weights.
        """
        self.peers.settle(self.model, self.dir, self.sp.name, self.role)
        self.role.save_checkpoint(path, lambda: self.payload(full=False))
        self.peers.barrier()

    def record(self, counter: str | None = None, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the stage's state.json entry (incrementing `counter`, if given);
        a follower writes nothing."""
        return self.role.record(self.plan.run_dir, self.sp.name, counter, **fields)

    # ------------------------------------------------------------------ loop
    def train_steps(self, max_steps: int | None = None,
                    stop: Callable[[], bool] | None = None) -> bool:
        """Train the current epoch from the saved position; False if stopped early
        (`max_steps` reached, or `stop()` became true on any process: checked between steps)."""
        spec, pr = self.sp.spec, self.progress
        stop = self.peers.any_stops(stop)
        self.dataset.set_epoch(pr.epoch)
        workers = num_workers(self.sp)
        if self.cache_bound is None:  # once: the job's memory bounds each worker's volume cache
            own = self.plan.cluster.stages.get(self.sp.name)
            step_gb = (self.sp.train_gb or self.sp.predicted_gb) if self.device.type == "cpu" else 0
            self.cache_bound = bound_volume_cache(self.dataset, (own and own.mem_gb) or
                                                  self.plan.cluster.mem_gb, workers, step_gb)
            logger.info("%s: %s", self.sp.name, self.cache_bound.describe())
        indices = self.peers.share(pr.step_in_epoch * self.step_batch, len(self.dataset))
        loader = epoch_loader(self.dataset, self.step_batch, indices, workers)
        self.model.train()
        if self.display:
            self.display.epoch(pr.epoch, pr.step_in_epoch)
        for batch in wrap_batches(self, batches(loader, self.sp.name)):  # timed for TensorBoard
            if (max_steps is not None and pr.global_step >= max_steps) or (stop and stop()):
                return False
            self.oom.step(self._one_step, batch)  # = self._one_step(batch) on the CPU
            pr.step_in_epoch += 1
            pr.global_step += 1
            if self.display:
                mean = pr.epoch_loss_sum / pr.epoch_loss_steps if pr.epoch_loss_steps else None
                self.display.step(pr.epoch, pr.step_in_epoch, mean)
            if pr.step_in_epoch % spec.checkpoint_every_steps == 0:
                self.save_last()
        return True

    def _one_step(self, batch: dict[str, torch.Tensor]) -> None:
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        sdm = batch["sdm"].to(self.device, non_blocking=True) if "sdm" in batch else None
        if self.aux_ramp_steps:  # new deep-supervision heads join gradually (see start())
            self.objective.set_aux_scale(min(1.0, self.progress.global_step / self.aux_ramp_steps))
        result = self.train_step(self.forward_model, self.opt, x, y, sdm=sdm,
                                 epoch=self.progress.epoch)
        if result.skipped:
            self._skip_step(result.skipped)
            return
        self.sched.step()
        self.progress.bad_steps = 0
        self.progress.epoch_loss_sum += float(result.loss)
        self.progress.epoch_loss_steps += 1

    def _skip_step(self, what: str) -> None:
        """A non-finite loss or gradient (the step was dropped); too many in a row stop
        the stage."""
        self.progress.bad_steps += 1
        logger.warning("%s: non-finite %s at step %d, step skipped", self.sp.name, what,
                       self.progress.global_step)
        if self.progress.bad_steps >= MAX_BAD_STEPS:
            raise StageFailed(f"stage {self.sp.name}: {MAX_BAD_STEPS} non-finite steps in a "
                              "row; lower lr or disable amp in the stage YAML")

    def end_epoch(self, seconds: float) -> dict[str, Any]:
        """The epoch's metrics row (validated by the writer, shared with the followers);
        best.pt when it improved, then last.pt."""
        pr, spec = self.progress, self.sp.spec
        mean_loss = pr.epoch_loss_sum / max(1, pr.epoch_loss_steps)
        row: dict[str, Any] = {"epoch": pr.epoch + 1, "train_loss": round(mean_loss, 6),
                               "lr": self.sched.get_last_lr()[0]}
        if self.role.writes and ((pr.epoch + 1) % spec.val_every_epochs == 0
                                 or pr.epoch + 1 == spec.max_epochs):
            row.update(validate(self.model, self.val_recs, self.predict, self.load))
        row["seconds"] = round(seconds, 2)
        row.update(peak_memory_gb(self.device))
        pr.epoch += 1
        pr.step_in_epoch = pr.epoch_loss_steps = 0
        pr.epoch_loss_sum = 0.0
        improved = row.get("val_dice", -1.0) > pr.best_dice
        if improved:
            pr.best_dice = row["val_dice"]
        row, pr.best_dice = self.peers.agree_row(row, pr.best_dice)  # the writer's, everywhere
        self.log.write_row(row)
        log_epoch(self, row)  # TensorBoard: runs/<run>/tensorboard/ (training/tensorboard_log.py)
        if improved:  # before last.pt: a kill in between trains and validates the epoch again
            self.role.save_checkpoint(self.ckpt_dir / "best.pt", lambda: self.payload(full=False))
            if self.run_model is not None:
                self.run_model.offer(self.sp.name, pr.epoch, pr.best_dice,
                                     lambda: self.payload(full=False))
        self.save_last()
        return row

    # ------------------------------------------------------------------ memory_guard.Fallible
    @property
    def stage_name(self) -> str:
        return self.sp.name

    def turn_on_checkpointing(self) -> bool:
        """Gradient checkpointing on; False where it is on already (or the model has none)."""
        if getattr(self.model, "checkpointing", True):
            return False
        self.model.checkpointing = True  # type: ignore[assignment]  # a flag of models/
        return True

    def split_backward(self) -> int | None:
        """Twice the step's accumulation (the same batch, hence the same data order and
        resume); the new number of backward passes, or None when a pass is one sample."""
        if self.train_step.micro * 2 > self.step_batch:
            return None
        self.train_step.micro *= 2
        return self.train_step.micro

    def drop_gradients(self) -> None:
        self.opt.zero_grad(set_to_none=True)
