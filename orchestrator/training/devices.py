"""Which device a command runs on: the GPU wherever there is one, unless told otherwise.

`evaluate`, `predict`, `run-stage` (and the jobs `submit` starts) and the benches take
`--device auto|cuda|cpu`; `auto` is CUDA when a GPU is visible, else the CPU.
"""
from __future__ import annotations

from typing import get_args

import torch

from orchestrator.config import DeviceName
from orchestrator.errors import ConfigError

DEVICE_NAMES: tuple[str, ...] = get_args(DeviceName)


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for `name`.

    Raises:
        ConfigError: `name` is not auto, cuda or cpu, or cuda is asked for where there is no GPU.
    """
    if name not in DEVICE_NAMES:
        raise ConfigError(f"--device: expected auto, cuda or cpu, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise ConfigError("--device cuda: no CUDA device is visible here (use --device cpu, or "
                          "run on a GPU node)")
    return torch.device("cpu")
