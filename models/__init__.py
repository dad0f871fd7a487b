"""Pure-torch models: the 3D ResUNet3D family (and, in their own modules, LCNN).

Nothing here imports `orchestrator`: a model loads in a notebook with torch, MONAI and
einops only.

    >>> import models
    >>> net = models.build_model("resunet3d", **models.STAGE_PRESETS["stage1_basic_cnn"])
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from torch import nn

from models.lcnn import LCNN
from models.transformer import resize_pos_embed
from models.unet3d import STAGE_PRESETS, ResUNet3D

logger = logging.getLogger(__name__)

MODEL_REGISTRY: dict[str, type[nn.Module]] = {"resunet3d": ResUNet3D, "lcnn": LCNN}

__all__ = ["LCNN", "MODEL_REGISTRY", "STAGE_PRESETS", "ResUNet3D", "build_model", "freeze_encoder",
           "model_class", "resize_pos_embed"]


def model_class(arch: str) -> type[nn.Module]:
    """The class registered under `arch`.

    Raises:
        ValueError: unknown arch; the message lists the valid ones.
    """
    try:
        return MODEL_REGISTRY[arch]
    except KeyError:
        valid = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unknown model arch {arch!r} (valid: {valid})") from None


@runtime_checkable
class EncoderSplit(Protocol):
    """A model that names its encoder's parameters (every registered model does)."""

    def encoder_parameters(self) -> Iterator[nn.Parameter]: ...


def freeze_encoder(model: nn.Module) -> None:
    """No gradients (and so no AdamW state) for the encoder's parameters.

    Raises:
        TypeError: the model has no `encoder_parameters()`.
    """
    if not isinstance(model, EncoderSplit):
        raise TypeError(f"{type(model).__name__} has no encoder_parameters(): cannot freeze its encoder")
    for p in model.encoder_parameters():
        p.requires_grad_(False)


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build the model registered under `arch` with constructor options `kwargs`.

    Args:
        arch: registry key, e.g. "resunet3d".
        **kwargs: constructor options, e.g. `**STAGE_PRESETS["stage2_cnn_attention"]`.

    Returns:
        The model, initialised (on the current default device).

    Raises:
        ValueError: unknown arch, or an option value out of range.
        TypeError: an option the constructor does not take; the message names it and
            lists the valid ones.
    """
    cls = model_class(arch)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    for key in kwargs:
        if key not in params:
            raise TypeError(f"{arch}: unknown option {key!r} (valid: {', '.join(valid)})")
    return cls(**kwargs)
