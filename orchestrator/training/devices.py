"""Which device a command runs on: the GPU wherever there is one, unless told otherwise.

`evaluate`, `predict`, `run-stage` (and the jobs `submit` starts) and the benches take
`--device auto|cuda|cpu`; `auto` is CUDA when a GPU is visible, else the CPU.
"""
from __future__ import annotations

import torch

from orchestrator.config import DeviceName, check_choice
from orchestrator.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for `name`.

    Raises:
        ConfigError: `name` is not auto, cuda or cpu, or cuda is asked for where there is no GPU.
    """
    check_choice("--device", name, DeviceName)
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise ConfigError("--device cuda: no CUDA device is visible here (use --device cpu, or "
                          "run on a GPU node)")
    return torch.device("cpu")
