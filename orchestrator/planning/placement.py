"""Mixed GPU fleets: plan every stage for each GPU type, and place each where it fits best.

Each type's memory is a budget; the curriculum is planned once per type (smallest first,
the estimates shared: a configuration estimated for one type is not estimated again for
the next). Then, stage by stage in the curriculum's order, the stage goes to the type
with the least memory on which it keeps its curriculum values (input size and base
filters: nothing shrunk), else to the type on which it gives up least (the most base
filters x input voxels, then the larger batch). Ties go to the earlier expected start
(`sbatch --test-only`, where it answered), then to more idle GPUs. A pinned stage (its
profile entry's `gpu_type`, or `--placement TYPE` for all) considers that type only.

The floor rule holds across types: a 3D stage never has fewer base filters than the
stage it starts from as placed; where a type's plan has fewer, the stage is planned
again on that type with the floor (planning/floors.py). More filters than the stage
before is fine: the hand-off widens.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from orchestrator.config import Placement, StagePlan, StageSpec
from orchestrator.errors import PlanError
from orchestrator.plan_facts import GpuOption
from orchestrator.planning.estimator import Budget, StepFactory, fmt_size
from orchestrator.planning.floors import filter_floor
from orchestrator.planning.planner import Shortfall, plan_or_shortfall
from orchestrator.planning.pool import plan_curriculum_results


def _keeps(spec: StageSpec, sp: StagePlan) -> bool:
    return (tuple(sp.input_size_vox) == tuple(spec.input_size_vox)
            and sp.base_filters == spec.base_filters)


def numbers(sp: StagePlan) -> str:
    """A stage plan's curriculum values and batch, as the reasons print them."""
    return f"{fmt_size(sp.input_size_vox)}, {sp.base_filters} filters, batch {sp.batch_size}"


def _sooner(o: GpuOption) -> tuple[float, int]:
    return (o.start_s if o.start_s is not None else math.inf, -o.idle_gpus)


def plan_placed(stages: list[tuple[StageSpec, str | None]], options: list[GpuOption],
                budget_for: Callable[[float], Budget], step_factory: StepFactory,
                batch_caps: dict[str, tuple[int, str]] | None = None,
                pins: dict[str, str] | None = None,
                progress: Callable[[str], None] | None = None) -> list[StagePlan]:
    """Every stage planned for each type in `options` and placed on one (module doc).

    Args:
        budget_for: the budget of a type with this many GB.
        pins: stage name -> the only type it may go to.

    Raises:
        PlanError: a pin names no type of `options`; or a stage fits no type (the message
            names the largest type and the stage's smallest need).
    """
    if not options:
        raise PlanError("no GPU type to place the stages on")
    options = sorted(options, key=lambda o: (o.mem_gb, _sooner(o)))
    by_type = {o.gpu_type: o for o in options}
    pins = pins or {}
    for stage, gpu_type in pins.items():
        if gpu_type not in by_type:
            raise PlanError(f"{stage}: gpu_type {gpu_type!r} is not a GPU type of the cluster; "
                            f"expected one of {', '.join(by_type)}")
    caps = batch_caps or {}
    per_type: dict[str, list[StagePlan | Shortfall]] = {}
    for o in options:
        if not any(pins.get(spec.name) in (None, o.gpu_type) for spec, _ in stages):
            continue  # every stage is pinned elsewhere
        per_type[o.gpu_type] = plan_curriculum_results(
            stages, budget_for(o.mem_gb), step_factory, caps,
            progress=_for_type(progress, o.gpu_type))
    placed: dict[str, StagePlan] = {}
    out = []
    for i, (spec, init) in enumerate(stages):
        allowed = [o for o in options if pins.get(spec.name, o.gpu_type) == o.gpu_type]
        src = placed.get(init or "")
        floor = filter_floor(spec.kind, src)
        results: dict[str, StagePlan | Shortfall] = {}
        for o in allowed:
            r = per_type[o.gpu_type][i]
            if isinstance(r, StagePlan) and r.base_filters < floor:  # placed above a wider one
                again, _ = plan_or_shortfall(spec, init, budget_for(o.mem_gb), step_factory,
                                             caps.get(spec.name), floor)
                r = again if isinstance(again, StagePlan) else r
            results[o.gpu_type] = r
        sp = _choose(spec, allowed, results)
        placed[spec.name] = sp
        out.append(sp)
    return out


def _for_type(progress: Callable[[str], None] | None,
              gpu_type: str) -> Callable[[str], None] | None:
    if progress is None:
        return None
    return lambda name: progress(f"{name} for {gpu_type}")


def _choose(spec: StageSpec, allowed: list[GpuOption],
            results: dict[str, StagePlan | Shortfall]) -> StagePlan:
    """The stage's plan on its best type, with its Placement (the module doc's rule)."""
    fits = [(o, r) for o in allowed if isinstance(r := results[o.gpu_type], StagePlan)]
    if not fits:
        largest = allowed[-1]
        short = results[largest.gpu_type]
        assert isinstance(short, Shortfall)
        raise PlanError(f"{spec.name} fits no GPU type: on the largest, {largest.describe()}, its "
                        f"smallest configuration ({short.smallest.describe()}, batch {short.batch}) "
                        f"needs {short.need_gb:.2f} GB; expected a type with at least "
                        f"{math.ceil(short.need_gb * 100) / 100:g} GB (gpu_types in the profile) "
                        "or smaller ranges in the stage's planner: block")
    keepers = [(o, r) for o, r in fits if _keeps(spec, r)]
    if keepers:
        o, sp = min(keepers, key=lambda f: (f[0].mem_gb, _sooner(f[0])))
        why = f"{o.describe()}: {numbers(sp)} fit"
        smaller = [(p, r) for p, r in fits if p.mem_gb < o.mem_gb]
        bigger = [p for p in allowed if p.mem_gb > o.mem_gb]
        if smaller:
            p, r = smaller[-1]
            why += f"; on {p.describe()} it would shrink to {fmt_size(r.input_size_vox)}, " \
                   f"{r.base_filters} filters"
        elif any(p.gpu_type not in dict(fits) for p in allowed if p.mem_gb < o.mem_gb):
            why += "; nothing fits a smaller card"
        if bigger:
            why += "; no larger card needed"
            roomier = [(p, r) for p, r in fits if p.mem_gb > o.mem_gb and _keeps(spec, r)
                       and (r.batch_size > sp.batch_size or r.checkpointing < sp.checkpointing)]
            if roomier:  # what the larger card would add: a batch, no checkpointing
                p, r = roomier[-1]
                why += (f" (on {p.describe()}: batch {r.batch_size}"
                        + (", no checkpointing" if sp.checkpointing and not r.checkpointing else "")
                        + ")")
    else:
        o, sp = max(fits, key=lambda f: (f[1].base_filters * math.prod(f[1].input_size_vox),
                                         f[1].batch_size, -f[0].mem_gb, [-x for x in _sooner(f[0])]))
        why = (f"{o.describe()}: gives up least of the types: {numbers(sp)} (the curriculum "
               f"asks {fmt_size(spec.input_size_vox)}, {spec.base_filters} filters)")
    tied = [p for p, r in fits if p is not o and p.mem_gb == o.mem_gb
            and (_keeps(spec, r) if keepers else r.base_filters == sp.base_filters
                 and r.input_size_vox == sp.input_size_vox)]
    if tied:
        why += (f"; before {', '.join(p.gpu_type for p in tied)} of the same memory: "
                + ("the earlier expected start" if o.start_s is not None
                   and any(p.start_s != o.start_s for p in tied) else "more idle GPUs"))
    placement = Placement(
        gpu_type=o.gpu_type, mem_gb=o.mem_gb, partition=o.partition,
        gpus_per_node=o.gpus_per_node, reason=why,
        considered={p.gpu_type: (r.predicted_gb if isinstance(r := results[p.gpu_type], StagePlan)
                                 else None) for p in allowed})
    return sp.model_copy(update={"placement": placement,
                                 "reasons": [f"placed on {why}", *sp.reasons]})
