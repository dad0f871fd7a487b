"""Hand-offs that never restart a stage silently: base filters never below the stage before.

The hand-off (training/handoff.py) copies tensors whose shapes match and widens those
that grew; it cannot narrow, so a stage planned with fewer base filters than the stage
it starts from re-initialises every tensor whose channels shrank. The planner therefore
keeps each 3D stage's base filters at least those of its `init_from` stage, preferring
checkpointing and a smaller input instead (the batch is already at its minimum in the
search).

The floor makes each stage's plan wait on its predecessor's; planning/schedule_floors.py
keeps the stages planning in parallel all the same. Where nothing at the floor fits, the
narrower plan stays and says so: `fresh_tensors` in plan.yaml names the tensors that
start fresh (`fresh_tensors` below), and `submit` refuses a plan where they are most of
the transferable network unless `--allow-fresh-start` (`check_fresh_starts`).
"""
from __future__ import annotations

import math
from typing import Any

from orchestrator.config import Plan, StagePlan
from orchestrator.errors import PlanError

MOST = 0.5  # share of the transferable parameters beyond which `submit` refuses


def filter_floor(kind: str, src: StagePlan | None) -> int:
    """The fewest base filters a stage of `kind` may have when it starts from `src` (as
    planned): src's, between 3D stages; 0 otherwise (no source, or an LCNN on either side)."""
    return src.base_filters if src is not None and kind == src.kind == "seg3d" else 0


def fresh_tensors(old: StagePlan, new: StagePlan) -> dict[str, Any]:
    """What the hand-off old -> new re-initialises because new is narrower, from the two
    models built on the meta device (no memory, no data).

    A tensor of both models that is smaller along some dimension in `new` cannot be
    copied or widened: it starts fresh. Tensors only in `new` are new by design (a
    stage's added blocks) and are not counted.

    Returns:
        {"from", "tensors": [names], "params": fresh parameter count, "transferable":
        parameters of the tensors both models hold, "fraction": their ratio}.
    """
    # deferred: torch (api.py and the CLI import this module for check_fresh_starts)
    from orchestrator.planning.estimator import build_stage_model_meta

    old_sd = build_stage_model_meta(old.spec, old.base_filters, old.input_size_vox).state_dict()
    new_sd = build_stage_model_meta(new.spec, new.base_filters, new.input_size_vox).state_dict()
    both = [k for k in new_sd if k in old_sd]
    fresh = [k for k in both if new_sd[k].dim() == old_sd[k].dim()
             and any(n < o for n, o in zip(new_sd[k].shape, old_sd[k].shape))]
    transferable = sum(math.prod(new_sd[k].shape) for k in both)
    params = sum(math.prod(new_sd[k].shape) for k in fresh)
    return {"from": old.name, "tensors": fresh, "params": int(params),
            "transferable": int(transferable),
            "fraction": round(params / transferable, 4) if transferable else 0.0}


def check_fresh_starts(plan: Plan, allow: bool) -> list[str]:
    """The plan's hand-offs that re-initialise tensors, one line each (recomputed from the
    stages, so a hand-edited plan is checked too).

    Raises:
        PlanError: one re-initialises most (> 50 %) of what it could hand over, and
            `allow` (--allow-fresh-start) is False.
    """
    by_name = {s.name: s for s in plan.stages}
    lines = []
    for sp in plan.stages:
        src = by_name.get(sp.init_from or "")
        if src is None or not sp.kind == src.kind == "seg3d" or sp.base_filters >= src.base_filters:
            continue
        fresh = fresh_tensors(src, sp)
        if not fresh["tensors"]:
            continue
        line = (f"{sp.name}: the hand-off from {src.name} re-initialises {len(fresh['tensors'])} "
                f"tensors, {100 * fresh['fraction']:.0f}% of the parameters it could hand over "
                f"(base filters {sp.base_filters} < {src.base_filters})")
        if fresh["fraction"] > MOST and not allow:
            raise PlanError(f"{plan.run_dir / 'plan.yaml'}: {line}; expected a plan whose "
                            "stages start from their predecessor's weights: plan with a larger "
                            "--target-mem, or pass --allow-fresh-start")
        lines.append(line)
    return lines
