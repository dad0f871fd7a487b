"""The LCNN's slice size from the data (`plan --data`): pad, never crop away tissue.

An LCNN stage reads axial slices fitted to its `input_size_vox` (H, W) by a centre crop
or padding (`data/slices.py`). With `fit_input_to_data` (the default) and a dataset, each
side becomes at least the data's largest slice side (H = Y rows, W = X columns) rounded
up to the network's multiple (`required_multiple`: 32 for the LCNN), and the stage's
`planner.min_input_vox` is raised to it, so the planner fits batch size, base filters and
checkpointing to that slice and never shrinks it: a slice that cannot fit is a plan
error, not a silent crop.
"""
from __future__ import annotations

import math
from typing import Any

import torch

import models
from orchestrator.config import StageSpec


def lcnn_multiple(spec: StageSpec) -> int:
    """H and W must be multiples of this for the stage's model (built once on the meta device)."""
    kwargs = spec.model.constructor_kwargs()
    with torch.device("meta"):
        model = models.build_model(spec.model.arch, base_filters=spec.base_filters, **kwargs)
    return int(getattr(model, "required_multiple", 1))


def fit_slice_to_data(spec: StageSpec, largest_shape_vox: tuple[int, ...] | None,
                      multiple: int | None = None) -> tuple[StageSpec, str | None]:
    """(the spec with its input grown to hold the data's slice, the reason) for an LCNN stage
    with `fit_input_to_data` and a dataset; (spec, None) otherwise."""
    if spec.kind != "lcnn" or not spec.fit_input_to_data or not largest_shape_vox:
        return spec, None
    multiple = multiple or lcnn_multiple(spec)
    data_hw = (int(largest_shape_vox[1]), int(largest_shape_vox[0]))  # (Y rows, X columns)
    padded = tuple(multiple * math.ceil(s / multiple) for s in data_hw)
    size = tuple(max(a, b) for a, b in zip(spec.input_size_vox, padded))
    floor = max(spec.planner.min_input_vox, *padded)
    update: dict[str, Any] = {"input_size_vox": size,
                              "planner": spec.planner.model_copy(update={"min_input_vox": floor})}
    how = ("grown to" if size != tuple(spec.input_size_vox) else "kept at")
    reason = (f"slice {how} {size[0]}x{size[1]}: the data's largest slice is "
              f"{data_hw[0]}x{data_hw[1]} (H x W), padded to a multiple of {multiple}; never "
              "cropped (fit_input_to_data)")
    return spec.model_copy(update=update), reason
