"""What hardware the plan is for: GPUs (nvidia-ml-py), host RAM and CPUs (psutil), SLURM.

`probe()` never fails on a machine without a GPU: pynvml raises NVMLError there, and the
probe reports no GPUs. The budget is then chosen by `budget_for()`.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

import psutil

from orchestrator.plan_facts import GpuRecord, ProbeRecord

logger = logging.getLogger(__name__)
GIB = 1024**3


def _probe_gpus() -> tuple[list[GpuRecord], str | None]:
    try:
        import pynvml  # deferred: optional (nvidia-ml-py), only where a GPU is asked about
    except ImportError as err:  # nvidia-ml-py is a dependency; say so if it is missing
        return [], f"nvidia-ml-py not importable ({err})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return [], f"no NVIDIA driver ({err})"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            major, _minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GpuRecord(index=i, name=name.decode() if isinstance(name, bytes) else name,
                                  total_gb=mem.total / GIB, free_gb=mem.free / GIB, bf16=major >= 8))
        return gpus, None
    finally:
        pynvml.nvmlShutdown()


def _slurm_env() -> dict[str, str]:
    keys = ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU",
            "SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_PARTITION")
    return {k: os.environ[k] for k in keys if k in os.environ}


def slurm_answers(timeout_s: float = 5.0) -> bool:
    """Whether a SLURM controller answers here (`sinfo`): a login or compute node."""
    if shutil.which("sinfo") is None:
        return False
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: SLURM's, taskset's), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def probe() -> ProbeRecord:
    """Probe GPUs, host memory and CPUs, and the SLURM allocation this process runs in."""
    gpus, err = _probe_gpus()
    vm = psutil.virtual_memory()
    slurm = _slurm_env()
    cpus = int(slurm.get("SLURM_CPUS_PER_TASK", 0)) or usable_cpus()
    return ProbeRecord(gpus=gpus, host_total_gb=vm.total / GIB, host_available_gb=vm.available / GIB,
                       cpus=cpus, slurm=slurm, gpu_error=err)


def host_budget_gb(p: ProbeRecord) -> float:
    """RAM this process may use: the SLURM allocation if there is one, else available RAM."""
    mem_mb = p.slurm.get("SLURM_MEM_PER_NODE")
    if mem_mb:
        return int(mem_mb) / 1024
    if "SLURM_MEM_PER_CPU" in p.slurm:
        return int(p.slurm["SLURM_MEM_PER_CPU"]) * p.cpus / 1024
    return p.host_available_gb
