"""Checkpoints: written atomically, loaded with a clear error, RNG states included.

`last.pt` holds everything needed to continue exactly (model, optimizer, scheduler,
scaler, epoch, step within the epoch, best Dice, python/numpy/torch RNG states);
`best.pt` and `final.pt` hold the model and what builds it.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.errors import CheckpointError
from orchestrator.runs.atomic import atomic_torch_save

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the format version) to `path` atomically."""
    atomic_torch_save({"format": FORMAT_VERSION, **payload}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or not one of ours.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged zip
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path}: not an orchestrator checkpoint (no 'model'/'arch' keys)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> torch.nn.Module:
    """Rebuild the model a checkpoint was saved from and load its weights."""
    import models

    try:
        model = models.build_model(ckpt["arch"], **ckpt["model_kwargs"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0][:200]
        raise CheckpointError(f"{path}: does not match its model ({first})") from None
    return model
