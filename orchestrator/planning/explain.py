"""Where a stage's predicted bytes go (`plan --explain STAGE`).

The stage's chosen configuration is estimated again on fake tensors, twice: once for its
peak, once with every live storage attributed at the moment that peak is reached, as
torch's MemTracker attributes them: parameters (and buffers), gradients, optimizer state,
the input batch, activations saved for backward (seen through autograd's saved-tensor
hooks), and the temporaries live at that moment (the rest). The overhead terms the
planner adds (allocator gap, workspace, context) and the calibration factor follow, so
that the parts add up to the stage's predicted GB. Where validation is the stage's peak,
its parts are shown instead: parameters, optimizer state, and the volume's buffers with
the windows' activations.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.config import Plan, StagePlan
from orchestrator.errors import ConfigError
from orchestrator.plan_facts import OverheadsRecord
from orchestrator.planning.estimator import (
    Budget,
    Candidate,
    StageEstimator,
    StepFactory,
    _in_channels,
    _shapes,
    build_stage_model,
)
from orchestrator.planning.memory import ATLAS_SHAPE_VOX, GIB, FakeStep, LivePeak
from orchestrator.planning.verify import plan_overheads

TENSOR_PARTS = ("parameters", "gradients", "optimizer state", "input batch",
                "activations saved for backward", "temporaries at the peak")


@dataclass
class Breakdown:
    """A stage's predicted peak in parts (GB) that add up to `total_gb`."""

    stage: str
    peak_of: str  # "training step" or "validation"
    parts_gb: dict[str, float] = field(default_factory=dict)
    other: str = ""  # the phase that is not the peak, and what it needs

    @property
    def total_gb(self) -> float:
        return sum(self.parts_gb.values())

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "peak_of": self.peak_of, "total_gb": round(self.total_gb, 4),
                "parts_gb": {k: round(v, 4) for k, v in self.parts_gb.items()}, "other": self.other}


class _Attributing(LivePeak):
    """A LivePeak that, once its count reaches `at_bytes`, sorts the live storages by part."""

    def __init__(self, at_bytes: int) -> None:
        super().__init__()
        self.at_bytes = at_bytes
        self.sort: Callable[[], dict[str, int]] | None = None
        self.parts: dict[str, int] | None = None

    def _track(self, t: torch.Tensor) -> torch.Tensor:
        out = super()._track(t)
        if self.parts is None and self.sort is not None and self.current >= self.at_bytes:
            self.parts = self.sort()
        return out


def _storages(tensors: Any) -> set[int]:
    return {id(t.untyped_storage()) for t in tensors if isinstance(t, torch.Tensor)}


def attribute_step(build: Callable[[], torch.nn.Module], x_shape: tuple, y_shape: tuple,
                   step_fn: Callable[..., None], *, cuda_target: bool,
                   cuda_dtypes: bool) -> dict[str, int]:
    """Bytes of each part of `TENSOR_PARTS` live at the step's peak (they sum to the peak)."""
    peak = FakeStep(build, cuda_target, cuda_dtypes).peak(x_shape, y_shape, step_fn)
    tracker = _Attributing(peak)
    session = FakeStep(build, cuda_target, cuda_dtypes, tracker=tracker)
    model, opt = session.model, session.opt
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(id(t.untyped_storage()))
        return t

    def sort() -> dict[str, int]:
        params = _storages(list(model.parameters()) + list(model.buffers()))
        grads = _storages(p.grad for p in model.parameters())
        state = _storages(v for s in opt.state.values() for v in s.values())
        parts = dict.fromkeys(TENSOR_PARTS, 0)
        for storage, nbytes in tracker.live():
            key = id(storage)
            part = ("parameters" if key in params else "gradients" if key in grads
                    else "optimizer state" if key in state else "input batch" if key in batch
                    else "activations saved for backward" if key in saved
                    else "temporaries at the peak")
            parts[part] += nbytes
        return parts

    batch: set[int] = set()

    def attributed_step(model_: torch.nn.Module, opt_: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        batch.update(_storages((x, y)))
        tracker.sort = sort
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step_fn(model_, opt_, x, y)

    session.peak(x_shape, y_shape, attributed_step)
    if tracker.parts is None or sum(tracker.parts.values()) != peak:
        raise AssertionError(f"attribution saw {tracker.parts} at a peak of {peak} bytes")
    return tracker.parts


def explain_stage(plan: Plan, stage: str, step_factory: StepFactory) -> Breakdown:
    """The parts of `stage`'s predicted peak in `plan`.

    Raises:
        ConfigError: the plan has no stage of that name.
    """
    names = [s.name for s in plan.stages]
    if stage not in names:
        raise ConfigError(f"--explain: no stage {stage!r} in plan {plan.run}; expected one of "
                          f"{', '.join(names)}")
    sp = plan.stage(stage)
    overheads, cuda = plan_overheads(plan), plan.device == "cuda"
    budget = Budget(plan.budget_gb, overheads, cuda_target=cuda)
    cand = Candidate(tuple(sp.input_size_vox), sp.base_filters, sp.checkpointing)
    est = StageEstimator(sp.spec, budget, step_factory, 1)
    ratio = sp.calibration_ratio or 1.0
    train_gb = sp.train_gb if sp.train_gb is not None else sp.predicted_gb
    if sp.val_gb is not None and sp.val_gb > train_gb:
        return _validation_parts(sp, plan, est, cand, overheads, ratio, train_gb)
    x_shape, y_shape = _shapes(sp.spec, cand.input_size_vox, sp.batch_size)
    parts = attribute_step(
        lambda: build_stage_model(sp.spec, cand.base_filters, cand.checkpointing, cand.input_size_vox),
        x_shape, y_shape, step_factory(sp.spec, sp.amp), cuda_target=cuda,
        cuda_dtypes=est.emulate_cuda(cand))
    other = ("" if sp.val_gb is None else
             f"validation needs {sp.val_gb:.2f} GB, less than the training step")
    return _with_overheads(Breakdown(stage, "training step", other=other), parts, overheads, ratio)


def _validation_parts(sp: StagePlan, plan: Plan, est: StageEstimator, cand: Candidate,
                      overheads: OverheadsRecord, ratio: float, train_gb: float) -> Breakdown:
    session = est.session(Candidate(cand.input_size_vox, cand.base_filters, False))
    params = sum(-(-p.untyped_storage().nbytes() // 512) * 512
                 for p in list(session.model.parameters()) + list(session.model.buffers()))
    volume = tuple(plan.assumptions.val_volume_vox or ATLAS_SHAPE_VOX)
    peak = session.eval_peak(cand.input_size_vox, volume, _in_channels(sp.spec),
                             torch.bfloat16 if sp.amp else None)
    parts = {"parameters": params, "optimizer state": session.held - params,
             "volume buffers and window activations": peak - session.held}
    return _with_overheads(Breakdown(sp.name, "validation",
                                     other=f"the training step needs {train_gb:.2f} GB"),
                           parts, overheads, ratio)


def _with_overheads(b: Breakdown, parts: dict[str, int], o: OverheadsRecord, ratio: float) -> Breakdown:
    tensors = sum(parts.values())
    b.parts_gb = {k: v / GIB for k, v in parts.items()}
    b.parts_gb["allocator gap"] = tensors / GIB * o.alloc_fraction
    b.parts_gb["workspace"] = o.workspace_gb
    b.parts_gb["context" if o.workspace_gb else "process baseline"] = o.context_gb
    raw = o.total_gb(tensors)
    b.parts_gb[f"calibration (x{ratio:.3f})"] = raw * (ratio - 1)
    return b
