"""Each stage's job resources, and where each value came from.

Precedence, per value: the cluster profile's `stages.<stage>` entry, then the profile's
top level, then (for the time limit only) the plan's estimate from `plan --verify`, then
the built-in default. A stage of a mixed-GPU plan asks for the GPU type it was placed on
(`--gres=gpu:TYPE:N`, on the type's partition) unless its own entry sets gres (or the
partition). `plan` records which keys the profile file itself set
(`assumptions.cluster.set`), so a value pydantic filled in is reported as a default, not
as the profile's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.config import DEFAULT_TIME_MIN, Plan, StagePlan

KEYS = ("time_min", "cpus_per_task", "mem_gb", "gpus_per_node", "partition", "qos",
        "constraint", "gres")


@dataclass(frozen=True)
class Resolved:
    value: Any
    source: str


def stage_resources(plan: Plan, sp: StagePlan) -> dict[str, Resolved]:
    """The resources of stage `sp`'s job: {key: (value, where it came from)}."""
    c = plan.cluster
    info = plan.assumptions.cluster
    where = (info and info.file) or f"profile {c.name}"
    set_keys = set(info.set) if info else set(c.model_fields_set)
    own = c.stages.get(sp.name)
    out: dict[str, Resolved] = {}
    for key in KEYS:
        if own is not None and getattr(own, key) is not None:
            out[key] = Resolved(getattr(own, key), f"{where}: stages.{sp.name}.{key}")
        elif key == "time_min" and c.time_min is None and sp.time_estimate_min:
            out[key] = Resolved(sp.time_estimate_min, "plan estimate (plan --verify step time)")
        elif key == "time_min" and c.time_min is None:
            out[key] = Resolved(DEFAULT_TIME_MIN, "default (no time_min in the profile, no "
                                                  "--verify estimate)")
        else:
            value = getattr(c, key)
            out[key] = Resolved(value, f"{where}: {key}" if key in set_keys else "default")
    pl = sp.placement
    if pl is not None and not (own is not None and own.gres is not None):
        # the type the stage was planned for: as many as the profile asks, else one a task
        n = out["gpus_per_node"].value or c.tasks_per_node
        why = f"plan: placed on {pl.gpu_type} ({pl.mem_gb:g} GB)"
        out["gres"] = Resolved(f"gpu:{pl.gpu_type}:{n}", why)
        out["gpus_per_node"] = Resolved(0, f"{why}: in gres")
        if pl.partition and not (own is not None and own.partition is not None):
            out["partition"] = Resolved(pl.partition, why)
    return out


def describe(resolved: dict[str, Resolved]) -> str:
    """One line: `time_min 90 (plan estimate ...), mem_gb 64 (envs/...: mem_gb), ...`."""
    return ", ".join(f"{k} {r.value} ({r.source})" for k, r in resolved.items()
                     if r.value not in (None, 0) or k == "gpus_per_node")
