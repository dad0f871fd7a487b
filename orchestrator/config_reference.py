"""docs/configuration.md, generated from the pydantic models of the config layer.

Every field of a stage YAML (`StageSpec`, its `planner:` and `model:` blocks), a curriculum
(`Curriculum`, its entries) and a cluster profile (`ClusterProfile`, its `stages:`
entries), and the user config file: type, default, unit and description, as the models
say them. tests/test_config_reference.py regenerates it and compares; after changing a
model, regenerate it:

    python -m orchestrator.config_reference            # rewrites docs/configuration.md
    python -m orchestrator.config_reference --check    # exit 1 when it is out of date
"""
from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orchestrator import config as c
from orchestrator.atomic import atomic_write_text

DOC_PATH = c.REPO_ROOT / "docs" / "configuration.md"

# (model, where it is written, what it is)
SECTIONS: tuple[tuple[type[BaseModel], str, str], ...] = (
    (c.StageSpec, "a stage YAML under stages/ (or a curriculum's `overrides:`)", "Stage"),
    (c.PlannerLimits, "a stage's `planner:` block", "Stage: planner limits"),
    (c.ResUNetOptions, "a stage's `model:` block with `arch: resunet3d`", "Stage: model resunet3d"),
    (c.LCNNOptions, "a stage's `model:` block with `arch: lcnn`", "Stage: model lcnn"),
    (c.Curriculum, "a curriculum YAML (stages/progressive.yaml)", "Curriculum"),
    (c.CurriculumEntry, "each entry of a curriculum's `stages:` and `lcnn:` lists",
     "Curriculum: stage entry"),
    (c.ClusterProfile, "a cluster profile under envs/clusters/", "Cluster profile"),
    (c.StageResources, "a profile's `stages: {NAME: {...}}` entries",
     "Cluster profile: one stage's resources"),
    (c.GpuType, "a profile's `gpu_types: {TYPE: {...}}` entries (or `TYPE: GB`)",
     "Cluster profile: one GPU type"),
    (c.UserConfig, "~/.config/orchestrator/config.yaml (ORCHESTRATOR_CONFIG moves it)", "User defaults"),
)

# Units from the naming convention of STYLE.md (units and counts in names).
SUFFIX_UNITS = (("_gb", "GB"), ("_min", "minutes"), ("_s", "seconds"), ("_vox", "voxels"),
                ("_epochs", "epochs"), ("_steps", "steps"), ("_mm", "mm"))
NAME_UNITS = {"max_epochs": "epochs", "iterations_per_epoch": "steps",
              "early_stop_patience_epochs": "validations",
              "lesion_fraction": "fraction 0-1", "val_fraction": "fraction 0-1",
              "batch_size": "samples", "base_filters": "channels", "grad_clip_norm": "L2 norm",
              "num_workers": "processes", "cpus_per_task": "CPUs", "gpus_per_node": "GPUs",
              "tasks_per_node": "tasks", "nodes": "nodes", "max_requeues": "requeues",
              "grad_accum_steps": "backward passes", "min_base_filters": "channels",
              "max_batch_size": "samples", "min_batch_size": "samples",
              "boundary_weight_start": "weight 0-1", "boundary_weight_end": "weight 0-1",
              "alignment_weight": "weight", "handoff_noise_std": "std (weight units)"}


def unit_of(name: str) -> str:
    """The field's unit: by name, else by its suffix; "" when it has none."""
    if name in NAME_UNITS:
        return NAME_UNITS[name]
    for suffix, unit in SUFFIX_UNITS:
        if name.endswith(suffix):
            return unit
    return ""


def type_name(annotation: Any) -> str:
    """A short, readable type: `int | None`, `list[CurriculumEntry]`, `'seg3d' | 'lcnn'`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(the defaults below)"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    return f"`{value!r}`" if value is not None else "`None`"


def _bounds(field: Any) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "len >=")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:.6g}" if isinstance(value, float) else f"{sign} {value}")
        if getattr(meta, "pattern", None):
            out.append(f"matches `{meta.pattern}`")
    return ", ".join(out)


def missing_descriptions() -> list[str]:
    """`Model.field` of every documented field without a description."""
    return [f"{m.__name__}.{n}" for m, _, _ in SECTIONS for n, f in m.model_fields.items()
            if not (f.description or "").strip()]


def render() -> str:
    """The whole docs/configuration.md."""
    lines = ["# Configuration reference", "",
             "Generated from the pydantic models of `orchestrator/config.py` by "
             "`python -m orchestrator.config_reference`; do not edit by hand "
             "(tests/test_config_reference.py fails when it is out of date).", "",
             "Every file is checked when it is read: an unknown key, a wrong type or a value out "
             "of range is one line naming the file and the field, and exit code 2. Precedence: "
             "command-line flag > curriculum `overrides:` (entry, then curriculum) > stage YAML > "
             "default; a cluster profile's `stages:` entry > the profile's top level.", ""]
    for model, where, title in SECTIONS:
        doc = " ".join((model.__doc__ or "").split())
        lines += [f"## {title} (`{model.__name__}`)", "", f"Where: {where}. {doc}".rstrip(), "",
                  "| field | type | default | unit | constraints | description |",
                  "|---|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{name}` | `{type_name(field.annotation)}` | {default_text(field)} | "
                         f"{unit_of(name)} | {_bounds(field)} | {desc} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = DOC_PATH.read_text() if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH}: out of date; run python -m orchestrator.config_reference", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(Path(DOC_PATH), text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
