"""GPU memory as the driver (NVML) sees it: what `nvidia-smi` shows and a GPU's limit counts.

`torch.cuda.max_memory_reserved` is the caching allocator's view; the driver also counts
the CUDA context, cuBLAS/cuDNN handles and workspaces and anything allocated outside
PyTorch. Two views:

- `process_used_gb(pid)`: a process's used memory on one GPU now (nvidia-smi's per-process
  column). Under a PID namespace (containers) NVML lists host pids, which do not match;
  then the GPU's used memory is returned and `how` says so.
- `NvmlSampler`: a background thread sampling, every few ms, the GPU's used memory and
  each compute process's, with a peak per named segment (e.g. one per stage verified in
  its own process): the caching allocator keeps what it reserved until the process ends,
  so sampling catches the peak.

Every function answers on a machine without a driver: None and the reason.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3


def _nvml() -> tuple[Any, str | None]:
    """pynvml, initialised, or (None, why not)."""
    try:
        import pynvml  # deferred: optional (nvidia-ml-py), only where a GPU is asked about
    except ImportError as err:
        return None, f"nvidia-ml-py not importable ({err})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return None, f"no NVIDIA driver ({err})"
    return pynvml, None


def _handle(nv: Any, cuda_index: int) -> Any:
    """NVML's handle of the GPU torch calls `cuda:<cuda_index>`: CUDA_VISIBLE_DEVICES
    renumbers the GPUs for CUDA (indices or GPU-UUIDs), NVML does not."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ref = visible[cuda_index] if cuda_index < len(visible) else str(cuda_index)
    if ref.isdigit():
        return nv.nvmlDeviceGetHandleByIndex(int(ref))
    return nv.nvmlDeviceGetHandleByUUID(ref)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_info(cuda_index: int = 0) -> dict[str, Any]:
    """Name, driver, total memory and compute capability of `cuda:<cuda_index>` (no CUDA
    context is created).

    Returns:
        {"gpu_name", "gpu_driver", "gpu_total_gb", "gpu_capability", "gpu_count"}, or
        {"gpu_error": why} without a driver.
    """
    nv, why = _nvml()
    if nv is None:
        return {"gpu_error": why}
    try:
        handle = _handle(nv, cuda_index)
        major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
        return {"gpu_name": _text(nv.nvmlDeviceGetName(handle)),
                "gpu_driver": _text(nv.nvmlSystemGetDriverVersion()),
                "gpu_total_gb": round(nv.nvmlDeviceGetMemoryInfo(handle).total / GIB, 2),
                "gpu_capability": f"{major}.{minor}", "gpu_count": nv.nvmlDeviceGetCount()}
    except nv.NVMLError as err:
        return {"gpu_error": f"NVML: {err}"}
    finally:
        nv.nvmlShutdown()


def _processes(nv: Any, handle: Any) -> dict[int, int]:
    """pid -> used bytes of the compute processes on a GPU (None values dropped)."""
    procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
    return {p.pid: int(p.usedGpuMemory) for p in procs if p.usedGpuMemory is not None}


def process_used_gb(pid: int, cuda_index: int = 0) -> tuple[float | None, str]:
    """NVML's used memory of process `pid` on `cuda:<cuda_index>`, and how it was read.

    Returns:
        (GB, "process") when NVML lists the pid; (the GPU's used GB, "device: ...") when it
        does not (a PID namespace hides host pids); (None, why) without a driver.
    """
    nv, why = _nvml()
    if nv is None:
        return None, why or "no NVML"
    try:
        handle = _handle(nv, cuda_index)
        procs = _processes(nv, handle)
        if pid in procs:
            return procs[pid] / GIB, "process"
        used = nv.nvmlDeviceGetMemoryInfo(handle).used / GIB
        return used, f"device: pid {pid} not listed by NVML ({len(procs)} processes); GPU's used memory"
    except nv.NVMLError as err:
        return None, f"NVML: {err}"
    finally:
        nv.nvmlShutdown()


@dataclass
class Segment:
    """Peaks over one named stretch of sampling."""

    baseline_device_gb: float
    peak_device_gb: float = 0.0
    peak_process_gb: dict[int, float] = field(default_factory=dict)
    samples: int = 0

    def summary(self, exclude_pid: int | None = None) -> dict[str, Any]:
        """{"device_peak_gb", "device_delta_gb" (peak - used before), "process_peak_gb"
        (the largest process other than `exclude_pid`), "process_pid", "samples"}."""
        others = {p: gb for p, gb in self.peak_process_gb.items() if p != exclude_pid}
        pid = max(others, key=others.__getitem__) if others else None
        return {"device_peak_gb": round(self.peak_device_gb, 4),
                "device_delta_gb": round(self.peak_device_gb - self.baseline_device_gb, 4),
                "process_peak_gb": round(others[pid], 4) if pid is not None else None,
                "process_pid": pid, "samples": self.samples}


class NvmlSampler:
    """Samples `cuda:<cuda_index>`'s used memory and its processes' in a thread; `mark(name)` starts
    a new segment. Use as a context manager; without a driver it samples nothing and
    `error` says why.
    """

    def __init__(self, cuda_index: int = 0, interval_s: float = 0.02) -> None:
        self.cuda_index, self.interval_s = cuda_index, interval_s
        self.segments: dict[str, Segment] = {}
        self.error: str | None = None
        self._current: Segment | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nv: Any = None
        self._handle: Any = None

    def __enter__(self) -> NvmlSampler:
        nv, self.error = _nvml()
        if nv is None:
            return self
        try:
            self._handle = _handle(nv, self.cuda_index)
        except nv.NVMLError as err:
            self.error = f"NVML: {err}"
            nv.nvmlShutdown()
        else:
            self._nv = nv
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._nv.nvmlShutdown()

    def mark(self, name: str) -> None:
        """End the current segment and start `name` (its baseline: the GPU's used memory now)."""
        if self._nv is None:
            return
        with self._lock:
            used = self._nv.nvmlDeviceGetMemoryInfo(self._handle).used / GIB
            self._current = self.segments[name] = Segment(used, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        try:
            used = self._nv.nvmlDeviceGetMemoryInfo(self._handle).used / GIB
            procs = _processes(self._nv, self._handle)
        except self._nv.NVMLError as err:  # keep the first failure; the peaks so far stand
            self.error = self.error or f"NVML: {err}"
            return
        with self._lock:
            seg = self._current
            if seg is None:
                return
            seg.samples += 1
            seg.peak_device_gb = max(seg.peak_device_gb, used)
            for pid, nbytes in procs.items():
                seg.peak_process_gb[pid] = max(seg.peak_process_gb.get(pid, 0.0), nbytes / GIB)
