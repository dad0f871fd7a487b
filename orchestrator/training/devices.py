"""Which device a command runs on: the GPU wherever there is one, unless told otherwise.

`evaluate`, `predict`, `run-stage` (and the jobs `submit` starts) and the benches take
`--device auto|cuda|cpu`; `auto` is CUDA when a GPU is visible, else the CPU.

A stage of a plan made for CUDA never falls back to the CPU by itself (`stage_device`):
a job whose GPU request was forgotten, or a venv with a CPU-only torch, would train a
144^3 model on the CPU for days. It runs on the CPU only when asked: `run-stage --device
cpu`, or `train_device: cpu` in the cluster profile (a test cluster whose GPU GRES has no
GPU behind it).
"""
from __future__ import annotations

import os

import torch

from orchestrator.config import DeviceName, check_choice
from orchestrator.errors import ConfigError

# What says which GPUs a SLURM job was given (--gres, --gpus, --gpus-per-node).
GRES_VARS = ("SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS")


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


def what_the_job_sees() -> str:
    """torch's version and CUDA build, CUDA_VISIBLE_DEVICES and the job's GPU GRES, in words."""
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gres = [f"{v}={os.environ[v]}" for v in GRES_VARS if os.environ.get(v)]
    job = os.environ.get("SLURM_JOB_ID")
    where = (f"SLURM job {job}: " + (", ".join(gres) if gres else "no GPU in its GRES "
                                     f"({', '.join(GRES_VARS)} unset)")) if job else "not in a SLURM job"
    return (f"torch {torch.__version__} ({build}), CUDA_VISIBLE_DEVICES="
            f"{'unset' if visible is None else repr(visible)}, {where}")


def _likely_fix() -> str:
    if not torch.version.cuda:
        return ("install a CUDA build of torch in the venv the job uses (`bash setup.sh` on a "
                "node with a GPU, or TORCH_SPEC=torch with pip's CUDA wheel)")
    if os.environ.get("SLURM_JOB_ID") and not any(os.environ.get(v) for v in GRES_VARS):
        return "request a GPU for the job (gpus_per_node or gres: in the cluster profile)"
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return "CUDA_VISIBLE_DEVICES is empty: unset it or name a GPU"
    return "run it on a node with a GPU whose driver matches torch's CUDA build"


def stage_device(stage: str, plan_device: str, asked: str = "auto", profile_device: str = "auto") -> str:
    """The device a stage of a plan for `plan_device` trains on: `asked` (run-stage --device)
    over the profile's `train_device` over the plan's device.

    Returns:
        "auto", "cuda" or "cpu", for `resolve_device`.

    Raises:
        ConfigError: the plan is for CUDA, CPU was not asked for, and no CUDA device is
            visible: one line naming what the job sees and the likely fix.
    """
    check_choice("--device", asked, DeviceName)
    if asked == "cpu" or (asked == "auto" and profile_device == "cpu"):
        return "cpu"
    if plan_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{stage}: the plan is for CUDA but no CUDA device is visible here ("
            f"{what_the_job_sees()}); fix: {_likely_fix()}; to train this plan on the CPU "
            "instead: run-stage --device cpu, or train_device: cpu in the cluster profile")
    return asked
