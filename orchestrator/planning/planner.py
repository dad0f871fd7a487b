"""Fit every stage of the curriculum to a memory budget.

Per stage, within the ranges its YAML allows: keep the curriculum's input size with AMP
and the minimum batch if it fits without checkpointing; else enable checkpointing; else
reduce base filters; else shrink the input (multiples of the model's required multiple,
largest side first); then spend the headroom on batch size. Every decision is recorded
with its reason. The planner is a pure function of (specs, budget, overheads, step).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

import models
from orchestrator.config import StagePlan, StageSpec
from orchestrator.errors import PlanError
from orchestrator.planning.memory import Overheads, StepFn, estimate_step_peak

logger = logging.getLogger(__name__)


class StepFactory(Protocol):
    """Makes the real training step of a stage (the planner does not import training/)."""

    def __call__(self, spec: StageSpec, amp: bool) -> StepFn: ...


@dataclass(frozen=True)
class Candidate:
    input_size_vox: tuple[int, ...]
    base_filters: int
    checkpointing: bool
    reason: str


@dataclass
class Budget:
    target_gb: float
    overheads: Overheads
    cuda_target: bool


def build_stage_model(spec: StageSpec, base_filters: int, checkpointing: bool) -> nn.Module:
    kwargs = {k: v for k, v in spec.model.items() if k != "arch"}
    kwargs.update(base_filters=base_filters, checkpointing=checkpointing)
    return models.build_model(spec.model["arch"], **kwargs)


def _shapes(spec: StageSpec, size: tuple[int, ...], batch: int) -> tuple[tuple, tuple]:
    in_ch = int(spec.model.get("in_channels", spec.model.get("in_slices", 1)))
    return (batch, in_ch, *size), (batch, *size)


def _candidates(spec: StageSpec, multiple: int) -> Iterator[Candidate]:
    size, bf, lim = tuple(spec.input_size_vox), spec.base_filters, spec.planner
    yield Candidate(size, bf, False, f"curriculum input {_fmt(size)}, base filters {bf}")
    yield Candidate(size, bf, True, "gradient checkpointing: the curriculum values did not fit")
    while bf // 2 >= lim.min_base_filters:
        bf //= 2
        yield Candidate(size, bf, True, f"base filters reduced to {bf}: still did not fit")
    sides = list(size)
    while True:
        i = max(range(len(sides)), key=lambda k: sides[k])
        smaller = sides[i] - multiple
        if smaller < max(lim.min_input_vox, multiple):
            return
        sides[i] = smaller
        yield Candidate(tuple(sides), bf, True, f"input shrunk to {_fmt(sides)}: still did not fit")


def _fmt(size: Any) -> str:
    return "x".join(str(s) for s in size)


def amp_allowed(spec: StageSpec, size: tuple[int, ...], multiple: int, cuda_target: bool) -> bool:
    """AMP as the stage asks, except on the CPU with a 2-voxel bottleneck side: there
    oneDNN's bf16 conv3d weight gradient is garbage (torch 2.13; docs/known-issues.md)."""
    if not spec.amp:
        return False
    return cuda_target or spec.kind != "seg3d" or all(s // multiple != 2 for s in size)


class _Estimator:
    """Memoised predicted GB of (stage, candidate, batch)."""

    def __init__(self, spec: StageSpec, budget: Budget, step_factory: StepFactory,
                 multiple: int) -> None:
        self.spec, self.budget, self.multiple = spec, budget, multiple
        self.steps = {amp: step_factory(spec, amp) for amp in {spec.amp, False}}
        self._memo: dict[tuple, float] = {}

    def emulate_cuda(self, cand: Candidate) -> bool:
        """CUDA autocast's fp32 ops are emulated at the function level, which checkpoint's
        recomputation in backward does not see (its metadata check fails): checkpointed
        candidates are estimated with CPU autocast dtypes (issue 6 moves this lower)."""
        return self.budget.cuda_target and not cand.checkpointing

    def amp(self, cand: Candidate) -> bool:
        return amp_allowed(self.spec, cand.input_size_vox, self.multiple, self.budget.cuda_target)

    def gb(self, cand: Candidate, batch: int) -> float:
        key = (cand.input_size_vox, cand.base_filters, cand.checkpointing, batch)
        if key not in self._memo:
            x_shape, y_shape = _shapes(self.spec, cand.input_size_vox, batch)
            est = estimate_step_peak(
                lambda: build_stage_model(self.spec, cand.base_filters, cand.checkpointing),
                x_shape, y_shape, self.steps[self.amp(cand)], cuda_target=self.emulate_cuda(cand))
            self._memo[key] = self.budget.overheads.total_gb(est.tensor_bytes)
            logger.debug("%s %s bs=%d: %.3f GB (%.1fs)", self.spec.name, key, batch,
                         self._memo[key], est.seconds)
        return self._memo[key]


def plan_stage(spec: StageSpec, init_from: str | None, budget: Budget,
               step_factory: StepFactory, batch_cap: int | None = None) -> StagePlan:
    """Choose input size, base filters, checkpointing and batch size for one stage.

    Raises:
        PlanError: nothing the stage's YAML allows fits; the message names the smallest
            budget that would.
    """
    probe_model = build_stage_model_meta(spec)
    multiple = int(getattr(probe_model, "required_multiple", 1))
    params = sum(p.numel() for p in probe_model.parameters())
    est = _Estimator(spec, budget, step_factory, multiple)
    lim = spec.planner
    min_bs = min(lim.min_batch_size, batch_cap or lim.min_batch_size)
    reasons: list[str] = []
    chosen, last = None, None
    for cand in _candidates(spec, multiple):
        last = cand
        reasons.append(cand.reason)
        if est.gb(cand, min_bs) <= budget.target_gb:
            chosen = cand
            break
    if chosen is None:
        assert last is not None
        need = est.gb(last, 1)
        raise PlanError(f"stage {spec.name}: nothing fits in {budget.target_gb:g} GB; the smallest "
                        f"configuration ({_fmt(last.input_size_vox)}, base filters "
                        f"{last.base_filters}, checkpointing, batch 1) needs {need:.2f} GB: "
                        f"use --target-mem {math.ceil(need * 100) / 100:g} or more")
    batch = _grow_batch(est, chosen, min_bs, min(lim.max_batch_size, batch_cap or 10**6), budget)
    reasons.append(f"batch {batch}: " + ("largest that fits" if batch > min_bs
                                          else "no headroom for a larger batch"))
    amp = est.amp(chosen)
    if budget.cuda_target and amp and not est.emulate_cuda(chosen):
        reasons.append("estimate with CPU autocast dtypes (CUDA's fp32 ops not emulated under "
                       "checkpointing)")
    if spec.amp and not amp:
        reasons.append("AMP off: bf16 conv3d gradients are wrong on the CPU at a 2-voxel "
                       "bottleneck (docs/known-issues.md)")
    if chosen.base_filters != spec.base_filters:  # params at the planned width
        params = sum(p.numel() for p in build_stage_model_meta(spec, chosen.base_filters).parameters())
    return StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=init_from,
                     input_size_vox=chosen.input_size_vox, base_filters=chosen.base_filters,
                     batch_size=batch, checkpointing=chosen.checkpointing, amp=amp,
                     params=params, predicted_gb=round(est.gb(chosen, batch), 4), reasons=reasons)


def build_stage_model_meta(spec: StageSpec, base_filters: int | None = None) -> nn.Module:
    import torch

    with torch.device("meta"):
        return build_stage_model(spec, base_filters or spec.base_filters, False)


def _grow_batch(est: _Estimator, cand: Candidate, min_bs: int, max_bs: int, budget: Budget) -> int:
    """Largest batch that fits: the peak is affine in batch size, so extrapolate from two
    estimates, then confirm (and step down if the extrapolation was optimistic)."""
    if max_bs <= min_bs:
        return min_bs
    g1, g2 = est.gb(cand, min_bs), est.gb(cand, min_bs + 1)
    per_sample = max(g2 - g1, 1e-9)
    batch = min(max_bs, min_bs + int((budget.target_gb - g1) / per_sample))
    while batch > min_bs and est.gb(cand, batch) > budget.target_gb:
        batch -= 1
    return max(batch, min_bs)


def plan_curriculum(stages: list[tuple[StageSpec, str | None]], budget: Budget,
                    step_factory: StepFactory, batch_cap: int | None = None,
                    progress: Callable[[str], None] | None = None) -> list[StagePlan]:
    """Plan every stage in order (see `plan_stage`)."""
    out = []
    for spec, init_from in stages:
        if progress:
            progress(spec.name)
        out.append(plan_stage(spec, init_from, budget, step_factory, batch_cap))
    return out
