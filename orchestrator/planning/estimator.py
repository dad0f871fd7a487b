"""What one stage's configurations need: the planner's vocabulary (a configuration, the
budget, the stage's model) and its estimates.

`StageEstimator` predicts the GB of a (configuration, batch) of one stage: the real
training step on fake tensors (planning/memory.py), memoised, with overheads and
calibration applied; validation's peak beside it. Each configuration's model lives in one
`FakeStep` session that serves every batch size and validation. The live-tensor bytes are
also kept per process (`_TENSOR_BYTES`), keyed by everything an estimate depends on, so
that plans made in one process and its forked workers (planning/pool.py) share them.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

import models
from orchestrator.config import StageSpec
from orchestrator.plan_facts import OverheadsRecord
from orchestrator.planning.calibration import entry_name
from orchestrator.planning.memory import (
    ATLAS_SHAPE_VOX,
    FakeStep,
    StepFn,
)

logger = logging.getLogger(__name__)


class StepFactory(Protocol):
    """Makes the real training step of a stage (the planner does not import training/)."""

    def __call__(self, spec: StageSpec, amp: bool) -> StepFn: ...


@dataclass(frozen=True)
class Candidate:
    input_size_vox: tuple[int, ...]
    base_filters: int
    checkpointing: bool

    def describe(self) -> str:
        return (f"{fmt_size(self.input_size_vox)}, base filters {self.base_filters}, "
                f"{'checkpointing' if self.checkpointing else 'no checkpointing'}")


@dataclass
class Budget:
    target_gb: float
    overheads: OverheadsRecord
    cuda_target: bool
    # calibration entry (stage, with or without checkpointing: `calibration.entry_name`)
    # -> (measured/predicted ratio from an earlier `plan --verify`, where from)
    calibration: dict[str, tuple[float, str]] = field(default_factory=dict)
    val_volume_vox: tuple[int, ...] = ATLAS_SHAPE_VOX  # what validation slides its window over


def build_stage_model(spec: StageSpec, base_filters: int, checkpointing: bool,
                      input_size_vox: tuple[int, ...] | None = None) -> nn.Module:
    kwargs = spec.model.constructor_kwargs()
    kwargs.update(base_filters=base_filters, checkpointing=checkpointing)
    if input_size_vox is not None and spec.kind == "seg3d":  # the transformer's token grid
        kwargs["input_size_vox"] = list(input_size_vox)
    model = models.build_model(spec.model.arch, **kwargs)
    if spec.freeze == "encoder":  # as the trainer fine-tunes: no gradients, no AdamW state
        models.freeze_encoder(model)
    return model


def build_stage_model_meta(spec: StageSpec, base_filters: int | None = None,
                           input_size_vox: tuple[int, ...] | None = None) -> nn.Module:
    with torch.device("meta"):
        return build_stage_model(spec, base_filters or spec.base_filters, False, input_size_vox)


def _in_channels(spec: StageSpec) -> int:
    return spec.model.input_channels


def _shapes(spec: StageSpec, size: tuple[int, ...], batch: int) -> tuple[tuple, tuple]:
    return (batch, _in_channels(spec), *size), (batch, *size)


def fmt_size(size: Any) -> str:
    return "x".join(str(s) for s in size)

def amp_allowed(spec: StageSpec, size: tuple[int, ...], multiple: int, cuda_target: bool) -> bool:
    """AMP as the stage asks, except on the CPU with a 2-voxel bottleneck side: there
    oneDNN's bf16 conv3d weight gradient is garbage (torch 2.13; docs/known-issues.md)."""
    if not spec.amp:
        return False
    return cuda_target or spec.kind != "seg3d" or all(s // multiple != 2 for s in size)


# Live-tensor bytes by (step factory, stage spec, candidate, batch, CUDA emulation) and,
# for validation, by ("val", stage spec, window, filters, volume, AMP, CUDA): an estimate
# is a pure function of these, so plans made in one process (and its forked workers,
# which send theirs back: planning/pool.py) share them.
# With each training step's entry goes its session's batch-free bytes, under (_FREE,) + key
# (`StageEstimator.train_gb_at_least`).
_TENSOR_BYTES: dict[tuple, int] = {}
_FREE = "batch-free"
# The optimizer step's rise by its parameters (memory.FakeStep): shared by the sessions of
# every stage's configurations in this process.
_OPT_RISES: dict[tuple, int] = {}


def clear_estimate_cache() -> None:
    _TENSOR_BYTES.clear()
    _OPT_RISES.clear()


def estimates_run() -> int:
    """Step and validation estimates run since the cache was last cleared (here and in
    worker processes, which send theirs back; keys differ between stages, so none is
    counted twice)."""
    return sum(1 for key in _TENSOR_BYTES if key[0] != _FREE)


def add_estimates(entries: dict[tuple, int]) -> None:
    """Take in the estimates a worker process ran (planning/pool.py)."""
    _TENSOR_BYTES.update(entries)


def known_keys() -> set[tuple]:
    """The keys of every estimate this process knows (`estimates_since`)."""
    return set(_TENSOR_BYTES)


def estimates_since(known: set[tuple]) -> dict[tuple, int]:
    """The estimates run since `known_keys()` returned `known` (a job's, which a worker
    process sends back to the parent's cache)."""
    return {k: v for k, v in _TENSOR_BYTES.items() if k not in known}


def known_estimates() -> dict[tuple, int]:
    """A copy of every estimate this process knows (sent with a job to a worker forked
    before they were run: planning/pool.py)."""
    return dict(_TENSOR_BYTES)


def surely_live_bytes(build_model: Callable[[], nn.Module], x_shape: tuple[int, ...],
                      y_shape: tuple[int, ...], low_precision: bool, round_to: int = 512) -> int:
    """A lower bound of a training step's peak live-tensor bytes (as `FakeStep.peak`
    counts them) without running the step: what is surely live when the forward pass
    ends, from one forward pass on the meta device (no fake tensors; a small fraction of
    an estimate's time). That is the parameters and buffers, AdamW's two moments of every
    trainable parameter (held from the second step on), the batch, and the input of every
    convolution and linear layer with a trainable weight, which autograd saves for the
    weight's gradient: its own storage, or under autocast (`low_precision`) a 16-bit copy,
    counted once per storage. Valid for a model without checkpointing (which frees those
    inputs); 0 where the forward pass cannot run on the meta device.
    """
    def rounded(nbytes: int) -> int:
        return -(-nbytes // round_to) * round_to

    saved: dict[int, int] = {}  # storage -> bytes kept for its saved inputs
    keep: list[torch.Tensor] = []  # the inputs, so that no storage id is reused

    def hook(mod: nn.Module, args: tuple) -> None:
        w = getattr(mod, "weight", None)
        if (isinstance(w, torch.Tensor) and w.requires_grad and args
                and isinstance(args[0], torch.Tensor)):
            t = args[0]
            keep.append(t)
            size = t.numel() * (2 if low_precision else t.element_size())
            key = t.untyped_storage()._cdata
            saved[key] = max(saved.get(key, 0), size)

    try:
        with torch.device("meta"):
            model = build_model().train()
            x = torch.empty(x_shape)
        handles = [m.register_forward_pre_hook(hook) for m in model.modules()
                   if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
    except Exception:  # noqa: BLE001  (a bound is an optimisation: none is no harm)
        return 0
    saved.pop(x.untyped_storage()._cdata, None)  # the batch is counted below
    held = sum(rounded(p.numel() * p.element_size()) * (3 if p.requires_grad else 1)
               for p in model.parameters())
    held += sum(rounded(b.numel() * b.element_size()) for b in model.buffers())
    batch = rounded(math.prod(x_shape) * 4) + rounded(math.prod(y_shape) * 8)
    return held + batch + sum(rounded(n) for n in saved.values())


class StageEstimator:
    """Memoised predicted GB of (candidate, batch) for one stage, calibrated if known.

    Each candidate's model lives in one `FakeStep` session: estimates at other batch sizes
    and validation's reuse it (no rebuild; the optimizer step's rise measured once)."""

    def __init__(self, spec: StageSpec, budget: Budget, step_factory: StepFactory,
                 multiple: int) -> None:
        self.spec, self.budget, self.multiple = spec, budget, multiple
        self.steps = {amp: step_factory(spec, amp) for amp in {spec.amp, False}}
        self._key = (step_factory, spec.model_dump_json(), budget.cuda_target)
        self._memo: dict[tuple, float] = {}
        self._sessions: dict[Candidate, FakeStep] = {}

    def emulate_cuda(self, cand: Candidate) -> bool:
        """CUDA autocast's fp32 ops are emulated at the function level, which checkpoint's
        recomputation in backward does not see (its metadata check fails): checkpointed
        candidates are estimated with CPU autocast dtypes."""
        return self.budget.cuda_target and not cand.checkpointing

    def amp(self, cand: Candidate) -> bool:
        return amp_allowed(self.spec, cand.input_size_vox, self.multiple, self.budget.cuda_target)

    def session(self, cand: Candidate) -> FakeStep:
        """The candidate's model and optimizer on fake tensors (built once)."""
        if cand not in self._sessions:
            self._sessions[cand] = FakeStep(
                lambda: build_stage_model(self.spec, cand.base_filters, cand.checkpointing,
                                          cand.input_size_vox),
                self.budget.cuda_target, cuda_dtypes=self.emulate_cuda(cand), rises=_OPT_RISES)
        return self._sessions[cand]

    def surely_over(self, cand: Candidate, batch: int) -> bool:
        """Whether the training step surely needs more than the budget, from a lower bound
        of its bytes that costs no estimate (`memory.surely_live_bytes`): only for a 3D
        candidate without checkpointing, calibrated as its estimate would be."""
        if self.spec.kind != "seg3d" or cand.checkpointing:
            return False
        x_shape, y_shape = _shapes(self.spec, cand.input_size_vox, batch)
        low = surely_live_bytes(
            lambda: build_stage_model(self.spec, cand.base_filters, False, cand.input_size_vox),
            x_shape, y_shape, self.amp(cand))
        gb = self.budget.overheads.total_gb(low) * self.ratio(cand)
        logger.debug("%s %s bs=%d: at least %.3f GB", self.spec.name, cand.describe(), batch, gb)
        return gb > self.budget.target_gb

    def _step_key(self, cand: Candidate, batch: int) -> tuple:
        """A training step's key in `_TENSOR_BYTES`."""
        return (*self._key, cand, batch, self.emulate_cuda(cand))

    def raw_gb(self, cand: Candidate, batch: int) -> float:
        """Predicted GB before calibration: live tensors x (1 + alloc) + workspace + context."""
        key = (cand, batch)
        if key not in self._memo:
            shared = self._step_key(cand, batch)
            if shared not in _TENSOR_BYTES:
                t0 = time.perf_counter()
                x_shape, y_shape = _shapes(self.spec, cand.input_size_vox, batch)
                session = self.session(cand)
                _TENSOR_BYTES[shared] = session.peak(x_shape, y_shape, self.steps[self.amp(cand)])
                _TENSOR_BYTES[(_FREE,) + shared] = session.batch_free_bytes()
                logger.debug("%s %s bs=%d: %.3f GB tensors (%.1fs)", self.spec.name,
                             cand.describe(), batch, _TENSOR_BYTES[shared] / 1024**3,
                             time.perf_counter() - t0)
            self._memo[key] = self.budget.overheads.total_gb(_TENSOR_BYTES[shared])
        return self._memo[key]

    def train_gb_at_least(self, cand: Candidate, batch: int) -> tuple[float, int] | None:
        """(a lower bound of the training step's GB at `batch`, the smaller batch it comes
        from), from the largest smaller batch of this candidate already estimated; None
        without one. Each moment's live bytes are a batch-free part plus a part in
        proportion to the batch (activations, their gradients, the batch itself), so
        peak(b) >= peak(a) + (peak(a) - free) * (b - a) / a, with `free` an upper bound
        of the batch-free part (`FakeStep.batch_free_bytes`). Measured on every stage of
        the curriculum at its own input, one sample more, CPU and CUDA: 0.79-0.99 of the
        estimate (0.64 on a 48^3 input, where the slack outweighs the activations); never
        above it (docs/benchmarks.md)."""
        for a in range(batch - 1, 0, -1):
            key = self._step_key(cand, a)
            tensors, free = _TENSOR_BYTES.get(key), _TENSOR_BYTES.get((_FREE,) + key)
            if tensors is not None and free is not None:
                low = tensors + max(0, tensors - free) * (batch - a) / a
                return self.budget.overheads.total_gb(int(low)) * self.ratio(cand), a
        return None

    def train_gb(self, cand: Candidate, batch: int) -> float:
        """Predicted GB of a training step, calibrated if measured."""
        return self.raw_gb(cand, batch) * self.ratio(cand)

    def gb(self, cand: Candidate, batch: int, exact: bool = False) -> float:
        """The stage's predicted peak: the training step's or validation's, the higher.

        Validation is estimated only where the training step fits (or with `exact`): a
        training step over the budget already rejects the configuration, and its GB is
        then a lower bound of the peak."""
        train = self.train_gb(cand, batch)
        if self.spec.kind != "seg3d" or (train > self.budget.target_gb and not exact):
            return train
        return max(train, self.val_gb(cand))

    def calibration(self, cand: Candidate) -> tuple[float, str] | None:
        """(measured/predicted, where from) of this kind of configuration, if measured."""
        return self.budget.calibration.get(entry_name(self.spec.name, cand.checkpointing))

    def ratio(self, cand: Candidate) -> float:
        known = self.calibration(cand)
        return known[0] if known else 1.0

    def val_gb(self, cand: Candidate) -> float:
        """Predicted GB of validating the largest volume with this candidate's window
        (sliding window, no gradients; parameters and optimizer state held)."""
        amp = self.amp(cand)
        key = ("val", self._key[1], cand.input_size_vox, cand.base_filters,
               tuple(self.budget.val_volume_vox), amp, self.budget.cuda_target)
        if key not in _TENSOR_BYTES:
            # the same window and filters hold the same tensors, with or without checkpointing
            twin = Candidate(cand.input_size_vox, cand.base_filters, not cand.checkpointing)
            twins = [c for c in (cand, twin) if c in self._sessions]
            session = self._sessions[twins[0]] if twins else self.session(cand)
            _TENSOR_BYTES[key] = session.eval_peak(
                cand.input_size_vox, self.budget.val_volume_vox, _in_channels(self.spec),
                torch.bfloat16 if amp else None)
        return self.budget.overheads.total_gb(_TENSOR_BYTES[key]) * self.ratio(cand)

    def fits(self, cand: Candidate, batch: int) -> bool:
        return self.gb(cand, batch) <= self.budget.target_gb

    def estimated(self, cand: Candidate, batch: int) -> bool:
        """Whether this (candidate, batch) has been estimated (not only extrapolated)."""
        return (cand, batch) in self._memo

    @property
    def estimates(self) -> int:
        return len(self._memo)
