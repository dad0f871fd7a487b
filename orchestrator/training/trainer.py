"""Run one stage of a plan: patch training, validation Dice, checkpoints, metrics.

`run_stage(plan_path, stage)` is the one entry point `launch/` calls; it runs the same
in-process, on the local executor and under SLURM. Start: this stage's `last.pt` (a
requeue), else the `init_from` stage's `final.pt` through the hand-off, else the stage's
`init_checkpoint` (fine-tuning) through the same hand-off, else fresh.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from orchestrator.atomic import atomic_write_text
from orchestrator.config import Plan, StagePlan, load_plan
from orchestrator.data.host_memory import bound_volume_cache
from orchestrator.data.intensity import Normalization, load_normalised
from orchestrator.data.sources import training_orientation
from orchestrator.errors import CheckpointError, StageFailed
from orchestrator.runs import state as run_state
from orchestrator.training import checkpoints as ck
from orchestrator.training.continuity import aux_ramp_steps, validate_handoff
from orchestrator.training.devices import resolve_device
from orchestrator.training.display import StepDisplay
from orchestrator.training.interrupt import leave_signals_to_the_trainer
from orchestrator.training.lr_schedule import lr_factor
from orchestrator.training.memory_guard import OomFallback, limit_gpu_memory
from orchestrator.training.metrics_log import MetricsLog, peak_memory_gb
from orchestrator.training.recovery import loader_failure, refuse_lost_progress, remove_stale_temp_files
from orchestrator.training.run_model import RunModel
from orchestrator.training.step import TrainStep
from orchestrator.training.tensorboard_log import close_board, log_epoch, wrap_batches
from orchestrator.training.validation import validate, volume_predictor

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


def stage_dir(plan: Plan, stage: str) -> Path:
    return plan.run_dir / stage


def _num_workers(sp: StagePlan) -> int:
    if sp.spec.num_workers is not None:
        return sp.spec.num_workers
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))
    return max(0, min(4, cpus - 1))


WORKER_TIMEOUT_S = 300  # a batch that takes longer means a worker hung


def _batches(loader: DataLoader, stage: str) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches; a DataLoader worker that died (the kernel's OOM killer, a
    segfault) or hung is a StageFailed saying what to change, not a hang or a bare
    RuntimeError. An exception raised in the dataset keeps its own type (e.g. DataError)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as err:
            failed = loader_failure(err, stage)
            if failed is not None:
                raise failed from err
            raise
        yield batch


def _training_dataset(sp: StagePlan, records: list, step_batch: int,
                      with_sdm: bool) -> torch.utils.data.Dataset:
    """3D patches for the 3D family (with their signed distance maps for the boundary loss),
    2T+1 slice stacks for LCNN; both pure in (seed, epoch, i)."""
    spec = sp.spec
    common = {"samples_per_epoch": spec.iterations_per_epoch * step_batch,
              "lesion_fraction": spec.lesion_fraction, "seed": spec.seed,
              "augment": spec.augment_strength if spec.augment else 0.0}
    if sp.kind == "lcnn":
        from orchestrator.data.slices import SliceStackDataset

        return SliceStackDataset(records, spec.model.input_channels,
                                 tuple(sp.input_size_vox), **common)
    from orchestrator.data.dataset import PatchDataset

    return PatchDataset(records, tuple(sp.input_size_vox), with_sdm=with_sdm, **common)


class StageRunner:
    """Holds the objects of one stage's training; `run()` trains it to the end."""

    is_writer = True  # writes files and displays progress (a DDP rank other than 0 does not)
    display: StepDisplay | None = None
    _last_recorded = False  # state.json names last.pt once this process wrote it
    aux_ramp_steps = 0  # > 0: deep-supervision heads new from the hand-off ramp in over these
    orientation: str | None = None  # the training images' axis codes (predict checks them)

    def __init__(self, plan: Plan, stage: str, device: str = "auto") -> None:
        import models
        from orchestrator.data.folds import split_records
        from orchestrator.data.sources import discover_subjects

        self.plan, self.sp = plan, plan.stage(stage)
        self.dir = stage_dir(plan, stage)
        self.ckpt_dir = self.dir / "checkpoints"
        self.device = resolve_device(device)  # the GPU where there is one
        spec = self.sp.spec
        torch.manual_seed(spec.seed)
        self.model = models.build_model(spec.model.arch, **self.sp.model_kwargs()).to(self.device)
        if plan.data_dir is None:
            raise CheckpointError(f"plan {plan.run}: no data directory (plan with --data DIR)")
        records = discover_subjects(Path(plan.data_dir))
        self.train_recs, self.val_recs = split_records(records, plan.val_subjects,  # a CV fold's
                                                       spec.val_fraction, spec.seed)
        # one step for every device (training/step.py): a step is grad_accum_steps
        # backward passes of batch_size samples each
        self.train_step = TrainStep.for_stage(spec, self.device.type, self.sp.amp)
        self.step_batch = self.sp.batch_size * spec.grad_accum_steps
        self.dataset = _training_dataset(self.sp, self.train_recs, self.step_batch,
                                         self.train_step.needs_sdm)
        self.normalization = Normalization.of_stage(spec)  # z-score or the dataset's mean/std
        self.dataset.normalization = self.normalization
        if spec.freeze == "encoder":
            for p in self.model.encoder_parameters():
                p.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
        handed_off = bool(self.sp.init_from or spec.init_checkpoint)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(spec, handed_off))
        self.amp_dtype = self.train_step.amp_dtype
        self.scaler = self.train_step.scaler
        self.predict = volume_predictor(spec.kind, self.sp.model_kwargs(), self.sp.input_size_vox,
                                        self.device, self.amp_dtype)
        self.progress = Progress()
        self.log = MetricsLog(self.dir)
        # the run's model (runs/<run>/best.pt): the 3D chain's best epoch over all stages
        self.run_model = RunModel(plan.run_dir) if self.is_writer and self.sp.kind == "seg3d" else None
        # GPU only: the plan's budget binds the allocator; an OOM in the first steps falls
        # back (checkpointing, then accumulation) and is recorded (training/memory_guard.py)
        limit = limit_gpu_memory(plan.budget_gb, plan.assumptions.overheads.context_gb
                                 if plan.assumptions.overheads else 0.0, self.device)
        if limit:
            logger.info("%s: %s", stage, limit)
        self.oom = OomFallback(self)

    @property
    def objective(self) -> Any:
        """The stage's forward + loss (the step's; DDP wraps it)."""
        return self.train_step.objective

    # ------------------------------------------------------------------ start / save
    def start(self) -> str:
        """Load last.pt, or hand off from init_from's final.pt (or init_checkpoint), or start
        fresh; say which.

        Raises:
            CheckpointError: state.json says the stage got somewhere (an epoch, or a last.pt
                written) but last.pt is gone: starting over would be silent data loss; the
                message names the file and `resume --fresh`, which starts over on purpose.
                Also a checkpoint that is unreadable, refused or of another model family.
        """
        try:
            return self._start()
        finally:
            self.aux_ramp_steps = aux_ramp_steps(self.dir / "handoff.json", self.sp.spec)

    def _start(self) -> str:
        last = self.ckpt_dir / "last.pt"
        entry = run_state.read_state(self.plan.run_dir)["stages"].get(self.sp.name, {})
        fresh = bool(entry.get("fresh_requested"))
        if self.is_writer:
            remove_stale_temp_files([self.dir, self.ckpt_dir], self.sp.name)
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
        if self.is_writer and self.log.rows:  # rows of an attempt whose last.pt is gone
            self.log.truncate_after(-1)
        if self.is_writer and self.sp.init_from:
            how += validate_handoff(self)
        if fresh:
            if self.is_writer:  # a kill before the next last.pt must not resume the old one
                last.unlink(missing_ok=True)
                (self.ckpt_dir / "final.pt").unlink(missing_ok=True)
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
        from orchestrator.training.handoff import checked_transfer

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
        atomic_write_text(self.dir / "handoff.json", json.dumps(report, indent=2))
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
        atomic_write_text(self.dir / "split.json", json.dumps(split, indent=2))

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
        ck.save_checkpoint(last, self.payload(full=True))
        if not self._last_recorded:  # from now on a missing last.pt is lost progress
            self.record(last_checkpoint=str(last))
            self._last_recorded = True

    def save_final(self, path: Path) -> None:
        ck.save_checkpoint(path, self.payload(full=False))

    def record(self, counter: str | None = None, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the stage's state.json entry (incrementing `counter`, if given).

        The writes of a stage go through these methods: a DDP rank other than 0 skips them.
        """
        if counter:
            return run_state.bump_stage(self.plan.run_dir, self.sp.name, counter, **fields)
        return run_state.update_stage(self.plan.run_dir, self.sp.name, **fields)

    def sample_indices(self, start: int) -> Iterable[int]:
        """This epoch's sample indices from position `start` (a DDP rank takes its share)."""
        return range(start, len(self.dataset))

    # ------------------------------------------------------------------ loop
    def train_steps(self, max_steps: int | None = None,
                    stop: Callable[[], bool] | None = None) -> bool:
        """Train the current epoch from the saved position; False if stopped early
        (`max_steps` reached, or `stop()` became true: checked between steps)."""
        spec, pr = self.sp.spec, self.progress
        self.dataset.set_epoch(pr.epoch)
        start = pr.step_in_epoch * self.step_batch
        workers = _num_workers(self.sp)
        if getattr(self, "cache_bound", None) is None:  # once: the job's memory bounds each
            own = self.plan.cluster.stages.get(self.sp.name)  # worker's volume cache
            step_gb = (self.sp.train_gb or self.sp.predicted_gb) if self.device.type == "cpu" else 0
            self.cache_bound = bound_volume_cache(self.dataset, (own and own.mem_gb) or
                                                  self.plan.cluster.mem_gb, workers, step_gb)
            logger.info("%s: %s", self.sp.name, self.cache_bound.describe())
        loader = DataLoader(self.dataset, batch_size=self.step_batch, drop_last=True,
                            sampler=self.sample_indices(start), num_workers=workers,
                            persistent_workers=False, timeout=WORKER_TIMEOUT_S if workers else 0,
                            worker_init_fn=leave_signals_to_the_trainer if workers else None)
        self.model.train()
        if self.display:
            self.display.epoch(pr.epoch, pr.step_in_epoch)
        for batch in wrap_batches(self, _batches(loader, self.sp.name)):  # timed for TensorBoard
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
        result = self.train_step(self.model, self.opt, x, y, sdm=sdm, epoch=self.progress.epoch)
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
        pr, spec = self.progress, self.sp.spec
        mean_loss = pr.epoch_loss_sum / max(1, pr.epoch_loss_steps)
        row: dict[str, Any] = {"epoch": pr.epoch + 1, "train_loss": round(mean_loss, 6),
                               "lr": self.sched.get_last_lr()[0]}
        if (pr.epoch + 1) % spec.val_every_epochs == 0 or pr.epoch + 1 == spec.max_epochs:
            row.update(validate(self.model, self.val_recs, self.predict, self.load))
        row["seconds"] = round(seconds, 2)
        row.update(peak_memory_gb(self.device))
        pr.epoch += 1
        pr.step_in_epoch = pr.epoch_loss_steps = 0
        pr.epoch_loss_sum = 0.0
        improved = row.get("val_dice", -1.0) > pr.best_dice
        if improved:
            pr.best_dice = row["val_dice"]
        self.log.write_row(row)
        log_epoch(self, row)  # TensorBoard: runs/<run>/tensorboard/ (training/tensorboard_log.py)
        if improved:  # before last.pt: a kill in between trains and validates the epoch again
            ck.save_checkpoint(self.ckpt_dir / "best.pt", self.payload(full=False))
            if self.run_model is not None:
                self.run_model.offer(self.sp.name, pr.epoch, pr.best_dice,
                                     lambda: self.payload(full=False))
        self.save_last()
        return row


def run_stage(plan_path: Path | str, stage: str, max_steps: int | None = None,
              stop: Callable[[], bool] | None = None, device: str = "auto") -> dict[str, Any]:
    """Train one stage of the plan at `plan_path` to its end.

    A stage whose final.pt exists is complete and is not trained again. `stop()` is
    checked between steps (see `interrupt.StopFlag`); when it turns true, or after
    `max_steps` (tests), last.pt is written and the stage returns with "final": None.
    `device`: auto (CUDA where there is a GPU), cuda or cpu.

    Returns:
        {"stage", "best_dice", "epochs", "final": path or None, "start": how it started,
        "interrupted": bool}.
    """
    plan = load_plan(Path(plan_path))
    final = stage_dir(plan, stage) / "checkpoints" / "final.pt"
    again = run_state.read_state(plan.run_dir)["stages"].get(stage, {}).get("fresh_requested")
    if final.exists() and plan.stage(stage) and not again:
        done = ck.load_checkpoint(final)
        logger.info("%s: already complete (%s)", stage, final)
        entry = run_state.read_state(plan.run_dir)["stages"].get(stage, {})
        if entry.get("state") != run_state.COMPLETED and os.environ.get("RANK", "0") == "0":
            run_state.update_stage(plan.run_dir, stage, state=run_state.COMPLETED,  # killed
                                   final=str(final), error=None)  # between final.pt and this
        return {"stage": stage, "best_dice": done.get("best_dice", -1.0), "epochs": None,
                "final": str(final), "start": "already complete", "interrupted": False}
    from orchestrator.training.distributed import stage_runner  # DDP when WORLD_SIZE > 1

    runner = stage_runner(plan, stage, device)
    how = runner.start()
    logger.info("%s: %s (%s, %d torch threads)", stage, how, runner.device, torch.get_num_threads())
    entry = runner.record("attempts", state=run_state.RUNNING,
                          started=run_state.now_iso(), start=how, pid=os.getpid(),
                          host=socket.gethostname(),
                          max_epochs=runner.sp.spec.max_epochs, error=None)
    if entry.get("slurm_job_id") is None and os.environ.get("SLURM_JOB_ID"):
        runner.record(slurm_job_id=os.environ["SLURM_JOB_ID"])
    spec = runner.sp.spec
    display = StepDisplay(stage, spec.iterations_per_epoch, spec.max_epochs)
    try:
        with display if runner.is_writer else contextlib.nullcontext():
            runner.display = display if runner.is_writer else None
            return _train_to_end(runner, final, max_steps, stop, how)
    except Exception as err:  # state.json must not say RUNNING for a stage that stopped
        failed = loader_failure(err, stage)
        shown = failed or err
        runner.record(state=run_state.FAILED, ended=run_state.now_iso(),
                      error=f"{type(shown).__name__}: {shown}"[:500])
        if failed is not None:
            raise failed from err
        raise


def _train_to_end(runner: StageRunner, final: Path, max_steps: int | None,
                  stop: Callable[[], bool] | None, how: str) -> dict[str, Any]:
    stage, spec, pr = runner.sp.name, runner.sp.spec, runner.progress
    while pr.epoch < spec.max_epochs:
        t0 = time.perf_counter()
        if not runner.train_steps(max_steps, stop):
            runner.save_last()
            runner.record(state=run_state.INTERRUPTED, epoch=pr.epoch, best_dice=pr.best_dice)
            logger.info("%s: stopped at epoch %d step %d; last.pt written", stage, pr.epoch,
                        pr.step_in_epoch)
            return {"stage": stage, "best_dice": pr.best_dice, "epochs": pr.epoch,
                    "final": None, "start": how, "interrupted": True}
        row = runner.end_epoch(time.perf_counter() - t0)
        logger.info("%s epoch %d/%d loss %.4f val_dice %s", stage, pr.epoch, spec.max_epochs,
                    row["train_loss"], row.get("val_dice"))
        runner.record(epoch=pr.epoch, best_dice=pr.best_dice, peak_mem_gb=row.get("peak_mem_gb"),
                      epoch_s=row["seconds"])  # status's ETA
        epoch_ended = getattr(stop, "epoch_ended", None)  # StopFlag: is the time limit near?
        if epoch_ended is not None and pr.epoch < spec.max_epochs:
            epoch_ended(row["seconds"])  # if so, the next train_steps stops before its first step
        if _early_stop(spec.early_stop_patience_epochs, runner.log.val_dices()):
            logger.info("%s: early stop (no val Dice gain in %d epochs)", stage,
                        spec.early_stop_patience_epochs)
            break
    runner.save_final(final)
    close_board(runner)
    runner.record(state=run_state.COMPLETED, ended=run_state.now_iso(),
                  final=str(final), epoch=pr.epoch, best_dice=pr.best_dice)
    return {"stage": stage, "best_dice": pr.best_dice, "epochs": pr.epoch, "final": str(final),
            "start": how, "interrupted": False}


def _early_stop(patience: int | None, dices: list[float]) -> bool:
    if not patience or len(dices) <= patience:
        return False
    return max(dices[-patience:]) <= max(dices[:-patience])
