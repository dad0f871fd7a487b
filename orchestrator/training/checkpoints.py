"""Checkpoints: written atomically, loaded without running code, RNG states included.

`last.pt` holds everything needed to continue exactly (model, optimizer, scheduler,
scaler, epoch, step within the epoch, best Dice, python/numpy/torch RNG states);
`best.pt` and `final.pt` hold the model and what builds it.

A checkpoint holds tensors, numbers, strings and containers of them only (the RNG states
are converted to tensors and lists on save, and back on load), and is loaded with
`torch.load(weights_only=True)`: a file copied from a colleague or downloaded never runs
code. One that needs anything else (a pickled object) is refused with one line. Files
written before format 2 keep numpy's RNG array; numpy's array reconstruction alone is
allow-listed for them.
"""
from __future__ import annotations

import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from orchestrator.atomic import atomic_torch_save
from orchestrator.errors import CheckpointError

try:  # numpy's array reconstruction, under numpy 2's module name or numpy 1's
    from numpy._core import multiarray as ma
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as ma  # type: ignore[no-redef]

FORMAT_VERSION = 2  # 2: RNG states as tensors and lists (1 kept numpy's array and tuples)
PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _legacy_numpy_globals() -> list[Any]:
    """What unpickling numpy's RNG array and scalars needs (format 1): array, dtype and
    scalar reconstruction, under numpy 1's and numpy 2's module names. None of them runs code."""
    names: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [np.dtype, np.ndarray]
    for fn in (ma._reconstruct, ma.scalar):
        names += [(fn, f"numpy.core.multiarray.{fn.__name__}"),
                  (fn, f"numpy._core.multiarray.{fn.__name__}")]
    dtypes = getattr(np, "dtypes", None)
    for name in ("UInt32DType", "Float64DType", "Float32DType", "Int64DType"):
        if dtypes is not None and hasattr(dtypes, name):
            names.append(getattr(dtypes, name))
    return names


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (and CUDA) RNG states as tensors, numbers and lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved (also format 1's numpy array and python tuple)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` with numpy scalars and arrays as python numbers and tensors.

    Raises:
        TypeError: `obj` holds something `torch.load(weights_only=True)` would refuse.
    """
    if isinstance(obj, PLAIN):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: {type(obj).__name__}; a checkpoint holds only tensors, numbers, "
                    "strings and containers of them")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the format version) to `path` atomically.

    Raises:
        TypeError: the payload holds an object that is not plain data (see `plain`).
        CheckpointError: the file could not be written (a full disk, no permission); the
            previous file at `path`, if any, is unchanged.
    """
    data = plain({"format": FORMAT_VERSION, **payload})
    try:
        atomic_torch_save(data, path)
    except OSError as err:
        before = f"the previous {Path(path).name} is unchanged" if Path(path).exists() else \
            "no earlier version existed"
        raise CheckpointError(f"{path}: could not write the checkpoint ({err.strerror or err}); "
                              f"{before} - free space in {Path(path).parent} (or fix its "
                              "permissions) and run the stage again to resume") from None


_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \d+|"
                     r"Trying to [^.\n]+")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, with `weights_only=True`: it never runs code.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, holds a pickled object
            (refused, not run), or is not one of ours.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        what = (found.group(1) or found.group(0)) if found else str(err).splitlines()[0][:120]
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"{path}: refused, it holds a pickled object ({what}), not only tensors, numbers "
                "and strings; a checkpoint is never allowed to run code - load it in a trusted "
                "session and re-save its tensors") from None
        raise CheckpointError(f"{path}: unreadable checkpoint (UnpicklingError: {what})") from None
    except Exception as err:  # torch raises several types for a damaged zip
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: "
                              f"{first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path}: not an orchestrator checkpoint (no 'model'/'arch' keys)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> torch.nn.Module:
    """Rebuild the model a checkpoint was saved from and load its weights."""
    try:
        model = models.build_model(ckpt["arch"], **ckpt["model_kwargs"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).splitlines()[0][:200]
        raise CheckpointError(f"{path}: does not match its model ({first})") from None
    return model
