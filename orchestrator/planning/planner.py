"""Fit every stage of the curriculum to a memory budget.

Per stage, within the ranges its YAML allows, the configurations form a ladder in order
of preference, each needing no more memory than the one before: the curriculum's input
size and base filters without checkpointing; with checkpointing; fewer base filters
(steps of 4, down to the stage's minimum, and never below the stage it starts from when
planning/floors.py plans it again with that floor); a smaller input (multiples of the model's
required multiple, largest side first). The first rung whose training step fits at the
minimum batch is found with secant steps on memory against base filters x input voxels
(`first_below`: about four estimates on a long ladder; rung 0 is not estimated where a
lower bound of its bytes, from one forward pass on the meta device, is already over the
budget), then validation is checked beside it; the headroom then goes to batch size, up
to the stage's maximum and the dataset's cap, along the line through two estimates with
the chosen batch estimated exactly. One fake model per configuration serves every batch
size and validation (`FakeStep`, through planning/estimator.py's `StageEstimator`). Every
decision is recorded with its reason and the numbers behind it. The planner is a pure
function of (specs, budget, step factory, dataset size).

A 3D stage's peak is its training step's or its validation's, whichever is higher:
validation slides the stage's window over the largest volume of the dataset (ATLAS's
197x233x189 without one), holding the volume's input, logits and count map on the
device beside the parameters and the optimizer state.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from orchestrator.config import StagePlan, StageSpec
from orchestrator.errors import PlanError
from orchestrator.planning.estimator import (
    Budget,
    Candidate,
    StageEstimator,
    StepFactory,
    build_stage_model_meta,
    estimates_since,
    fmt_size,
    known_keys,
)

# re-exported: callers outside planning/ (cli/bench/gpu_plan.py, tests/test_step.py) import
# these from here
from orchestrator.planning.estimator import _shapes as _shapes
from orchestrator.planning.estimator import build_stage_model as build_stage_model
from orchestrator.planning.estimator import clear_estimate_cache as clear_estimate_cache
from orchestrator.planning.estimator import estimates_run as estimates_run
from orchestrator.planning.memory import SLIDING_WINDOW
from orchestrator.planning.search import first_below, first_fit

logger = logging.getLogger(__name__)
FILTER_STEP = 4  # base filters are tried in multiples of this (and the stage's minimum)


def candidate_ladder(spec: StageSpec, multiple: int, min_filters: int = 0) -> list[Candidate]:
    """Every configuration the stage's YAML allows, in order of preference; each needs no
    more memory than the one before (at the same batch). `min_filters` (the stage it starts
    from: planning/floors.py) raises the YAML's `min_base_filters`; the input shrinks at
    the lowest base filters allowed."""
    size, bf, lim = tuple(spec.input_size_vox), spec.base_filters, spec.planner
    lowest = min(bf, max(lim.min_base_filters, min_filters))
    out = [Candidate(size, bf, False), Candidate(size, bf, True)]
    fewer = {f for f in range(FILTER_STEP, bf, FILTER_STEP) if f >= lowest}
    if lowest < bf:
        fewer.add(lowest)
    out += [Candidate(size, f, True) for f in sorted(fewer, reverse=True)]
    f_min, sides = out[-1].base_filters, list(size)
    while True:
        i = max(range(len(sides)), key=lambda k: sides[k])
        if sides[i] - multiple < max(lim.min_input_vox, multiple):
            return out
        sides[i] -= multiple
        out.append(Candidate(tuple(sides), f_min, True))


@dataclass(frozen=True)
class Shortfall:
    """A stage nothing fits: its smallest configuration and what that needs."""

    stage: str
    smallest: Candidate
    batch: int
    need_gb: float


def plan_stage(spec: StageSpec, init_from: str | None, budget: Budget,
               step_factory: StepFactory, batch_cap: tuple[int, str] | None = None) -> StagePlan:
    """Choose input size, base filters, checkpointing and batch size for one stage.

    Args:
        batch_cap: (largest batch the dataset supports, why), or None without a dataset.

    Raises:
        PlanError: nothing the stage's YAML allows fits; the message names the smallest
            budget that would.
    """
    result, _ = plan_or_shortfall(spec, init_from, budget, step_factory, batch_cap)
    if isinstance(result, Shortfall):
        raise PlanError(shortfall_message(budget, [result]))
    return result


def plan_or_shortfall(spec: StageSpec, init_from: str | None, budget: Budget,
                      step_factory: StepFactory, batch_cap: tuple[int, str] | None = None,
                      min_filters: int = 0) -> tuple[StagePlan | Shortfall, dict[tuple, int]]:
    """`plan_stage`, with a stage nothing fits returned as its Shortfall (so that every
    stage is planned before the error names them all), and the estimates it ran (their
    cache entries, which a worker process sends back to the parent's cache)."""
    known = known_keys()
    result = _plan_stage(spec, init_from, budget, step_factory, batch_cap, min_filters)
    return result, estimates_since(known)


def _plan_stage(spec: StageSpec, init_from: str | None, budget: Budget,
                step_factory: StepFactory, batch_cap: tuple[int, str] | None,
                min_filters: int = 0) -> StagePlan | Shortfall:
    """The stage's plan, or its Shortfall when nothing its YAML allows fits."""
    probe_model = build_stage_model_meta(spec)
    multiple = int(getattr(probe_model, "required_multiple", 1))
    est = StageEstimator(spec, budget, step_factory, multiple)
    lim, target = spec.planner, budget.target_gb
    cap = batch_cap[0] if batch_cap else None
    min_bs = max(1, min(lim.min_batch_size, cap or lim.min_batch_size))
    max_bs = max(min_bs, min(lim.max_batch_size, cap or lim.max_batch_size))
    ladder = candidate_ladder(spec, multiple, min_filters)
    # search on the training step (cheap to repeat at other batch sizes), then make sure
    # validation fits beside it; where it does not, go on down the ladder with both
    i = first_below(lambda k: est.train_gb(ladder[k], min_bs), target,
                    [c.base_filters * math.prod(c.input_size_vox) for c in ladder],
                    rung0_over=est.surely_over(ladder[0], min_bs))
    if i is not None and not est.fits(ladder[i], min_bs):
        first = i  # int, for the lambda
        j = first_fit(len(ladder) - first, lambda k: est.fits(ladder[first + k], min_bs))
        i = None if j is None else first + j
    if i is None:
        return Shortfall(spec.name, ladder[-1], min_bs, est.gb(ladder[-1], min_bs, exact=True))
    chosen = ladder[i]
    reasons = _search_reasons(spec, ladder, i, est, min_bs, target)
    batch, why = _grow_batch(est, chosen, min_bs, max_bs, target)
    if batch == max_bs and batch_cap and cap is not None and cap < lim.max_batch_size:
        why = f"capped by the dataset: {batch_cap[1]}"
    reasons.append(f"batch {batch}: {why}")
    amp = est.amp(chosen)
    if budget.cuda_target and amp and not est.emulate_cuda(chosen):
        reasons.append("estimate with CPU autocast dtypes (CUDA's fp32 ops not emulated under "
                       "checkpointing)")
    if spec.amp and not amp:
        reasons.append("AMP off: bf16 conv3d gradients are wrong on the CPU at a 2-voxel "
                       "bottleneck (docs/known-issues.md)")
    ratio = est.calibration(chosen)
    if ratio:
        kind = "with" if chosen.checkpointing else "without"
        reasons.append(f"predictions x {ratio[0]:.3f}: measured/predicted {kind} checkpointing "
                       f"of {ratio[1]}")
    train_gb = predicted = est.train_gb(chosen, batch)
    val_gb = None
    if spec.kind == "seg3d":  # LCNN validates slice stacks: far below its training step
        val_gb = est.val_gb(chosen)
        predicted = _with_validation(est, chosen, train_gb, val_gb, reasons)
    params = sum(p.numel() for p in build_stage_model_meta(
        spec, chosen.base_filters, chosen.input_size_vox).parameters())
    logger.debug("%s: %d estimates", spec.name, est.estimates)
    return StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=init_from,
                     input_size_vox=chosen.input_size_vox, base_filters=chosen.base_filters,
                     batch_size=batch, checkpointing=chosen.checkpointing, amp=amp,
                     params=params, predicted_gb=round(predicted, 4),
                     train_gb=round(train_gb, 4), val_gb=None if val_gb is None else round(val_gb, 4),
                     calibration_ratio=round(ratio[0], 4) if ratio else None, reasons=reasons)


def _with_validation(est: StageEstimator, cand: Candidate, train_gb: float, val: float,
                     reasons: list[str]) -> float:
    """The stage's peak: its training step's, or validation's if that is higher (said so)."""
    how = (f"validation (sliding window, {SLIDING_WINDOW['sw_batch_size']} windows of "
           f"{fmt_size(cand.input_size_vox)} over a {fmt_size(est.budget.val_volume_vox)} volume) needs "
           f"{val:.2f} GB")
    if val <= train_gb:
        reasons.append(f"{how}, less than the training step")
        return train_gb
    reasons.append(f"{how}, more than the training step ({train_gb:.2f} GB): the stage's peak")
    return val


def _search_reasons(spec: StageSpec, ladder: list[Candidate], i: int, est: StageEstimator,
                    bs: int, target: float) -> list[str]:
    """Why rung i: what it needs, and what the rung before it needed (it did not fit)."""
    chosen = ladder[i]
    have = f"{est.gb(chosen, bs):.2f} GB at batch {bs}"
    if i == 0:
        return [f"curriculum values ({chosen.describe()}): {have}"]
    before = ladder[i - 1]
    no = f"{before.describe()} needs {est.gb(before, bs):.2f} GB at batch {bs} > {target:g} GB"
    if chosen.input_size_vox != tuple(spec.input_size_vox):
        what = f"input shrunk to {fmt_size(chosen.input_size_vox)}, the largest that fits"
    elif chosen.base_filters != spec.base_filters:
        what = (f"base filters reduced to {chosen.base_filters} (from {spec.base_filters}), "
                f"the most that fit")
    else:
        what = "gradient checkpointing on"
    return [f"{what}: {have}; {no}"]


def _grow_batch(est: StageEstimator, cand: Candidate, min_bs: int, max_bs: int,
                target: float) -> tuple[int, str]:
    """Largest batch in [min_bs, max_bs] that fits, and why it is not larger.

    A step's peak is affine in the batch size. Where a lower bound from the minimum
    batch's estimate already puts one sample more over the budget, that is the answer,
    with no estimate run. Otherwise the line through two estimates gives the batch; that
    batch is estimated exactly (stepping down while the line was short), and one more
    sample is estimated too only where the line puts it within 1 % of the budget;
    otherwise the line's figure says why the batch is not larger."""
    if max_bs <= min_bs:
        return min_bs, f"the stage's batch range is {min_bs}..{max_bs}"
    low = est.train_gb_at_least(cand, min_bs + 1)
    if low is not None and low[0] > target:  # one estimate fewer on a tight budget
        return min_bs, (f"batch {min_bs + 1} needs at least {low[0]:.2f} GB (batch {low[1]}'s "
                        f"step, its activations grown in proportion)")
    g2 = est.gb(cand, min_bs + 1)
    if g2 > target:
        return min_bs, f"batch {min_bs + 1} needs {g2:.2f} GB"
    # the training step grows with the batch (validation does not): extrapolate it
    t1, t2 = est.train_gb(cand, min_bs), est.train_gb(cand, min_bs + 1)
    per_sample = max(t2 - t1, 1e-9)

    def line(b: int) -> float:
        return t2 + (b - min_bs - 1) * per_sample

    batch = max(min_bs + 1, min(max_bs, min_bs + 1 + int((target - t2) / per_sample)))
    while batch > min_bs + 1 and not est.fits(cand, batch):
        batch -= 1
    while batch < max_bs and line(batch + 1) <= target * 1.01 and est.fits(cand, batch + 1):
        batch += 1
    if batch == max_bs:
        return batch, f"the stage's max_batch_size ({est.gb(cand, batch):.2f} GB)"
    nxt = batch + 1
    if est.estimated(cand, nxt):
        return batch, f"the largest that fits; batch {nxt} needs {est.gb(cand, nxt):.2f} GB"
    return batch, (f"the largest that fits; batch {nxt} needs {line(nxt):.2f} GB (extrapolated "
                   f"from batches {min_bs} and {min_bs + 1})")


def shortfall_message(budget: Budget, shortfalls: list[Shortfall]) -> str:
    worst = max(shortfalls, key=lambda s: s.need_gb)
    names = ", ".join(s.stage for s in shortfalls)
    need = math.ceil(worst.need_gb * 100) / 100
    return (f"nothing fits in {budget.target_gb:g} GB for {names}; the smallest configuration "
            f"of {worst.stage} ({worst.smallest.describe()}, batch {worst.batch}) needs "
            f"{worst.need_gb:.2f} GB: use --target-mem {need:g} or more")
