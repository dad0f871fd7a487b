"""`orchestrator bench gpu`: the GPU acceptance bench, one command for a fresh GPU node.

Six sections, each guarded (a failure is recorded as an error string and the rest runs):

1. plan: every stage of stages/progressive.yaml at 20 GB and at the device's own size
   (95 % of the GPU's free memory; 80 % of the host's RAM on a CPU), with plan seconds;
2. verify: each stage of the 20 GB plan for a few real steps in a fresh process
   (`plan --verify`): measured peak (CUDA: max_memory_reserved + context) against the
   prediction, and NVML's used memory of the trial process, sampled while it runs;
3. step: the steady step time of each stage at its planned size and precision (bf16 on a
   GPU that has it), in samples/s and voxels/s;
4. fp16: stage 1 with fp16 autocast and a GradScaler through the trainer's own step: the
   losses finite, the scaler's scale;
5. oom: stage 1 under a budget about half what its planned step needs (the trainer
   limits the CUDA allocator to it): the out-of-memory error in the first steps, the
   fallback recorded in state.json, the steps completed (CUDA only);
6. loader: one short epoch of stage 1 on ATLAS-size subjects (197x233x189) from the HDF5
   cache: the loader's samples/s against what the GPU consumes (batch / step time).

On a CPU (or with `quick`) everything shrinks (one 16^3 stage, 24^3 subjects, 2 steps):
the same functions run, so the CPU test reaches every line the GPU runs. Progress goes
to stderr as the bench goes, and the document is rewritten to `out` after each section.
Sections 1-3 are in `bench_gpu_plan.py`, 4-6 (they train) in `bench_gpu_train.py`.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from orchestrator.cli.bench import gpu_plan as plan
from orchestrator.cli.bench import gpu_train as train
from orchestrator.cli.bench.data import machine_info
from orchestrator.cli.bench.gpu_run import (
    FULL,
    QUICK,
    GpuBench,
    say_on_stderr,
)
from orchestrator.errors import ConfigError
from orchestrator.planning.nvml import gpu_info
from orchestrator.training.devices import resolve_device


def machine(device: str) -> dict[str, Any]:
    """bench_data's machine info, the GPU's (NVML: no CUDA context yet) and CUDA's versions."""
    info = {**machine_info(torch.__version__), "device": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        info.update(gpu_info(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def bench_gpu(device: str = "auto", quick: bool = False, out: Path | None = None,
              tmp_dir: Path | None = None, say: Callable[[str], None] = say_on_stderr) -> dict[str, Any]:
    """Run the six sections (sized for at most 8 minutes on one H200; under a minute quick).

    Args:
        device: auto | cuda | cpu; on a CPU the sizes are always quick.
        quick: the tiny sizes (a smoke test of the bench itself).
        out: JSON file rewritten (atomically) after each section.
        tmp_dir: where the plans, runs and synthetic data go (default: the system's temp).
        say: where progress lines go (default: stderr).

    Returns:
        {"bench": "gpu", "machine", "device", "quick", "figures": {name: number},
        "sections": {name: {"status": "ok" | "error" | "skipped", "seconds", "figures":
        [names], "error" | "errors" | "reason", details}}, "data", "started", "finished",
        "seconds"}.

    Raises:
        ConfigError: a bad device, or `out` cannot be written.
    """
    on: Literal["cuda", "cpu"] = "cuda" if resolve_device(device).type == "cuda" else "cpu"
    sizes = QUICK if quick or on == "cpu" else FULL
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise ConfigError(f"--out: {out} is a folder or its folder does not exist; expected a file path")
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="bench-gpu-") as tmp:
        b = GpuBench(on, sizes, Path(tmp), out, say)
        b.doc["machine"] = machine(on)
        b.write()
        b.say(f"[bench gpu] {on}, {'quick' if b.doc['quick'] else 'full'} sizes"
              + (f", writing {out}" if out else ""))
        b.run(1, "plan", "plan every stage at 20 GB and at the device's own size", plan.plan_section)
        b.run(2, "verify", "each stage of the 20 GB plan for real (fresh processes)", plan.verify_section)
        b.run(3, "step", "steady step time per stage at its planned size", plan.step_section)
        b.run(4, "fp16", "stage 1 with fp16 autocast and a GradScaler", train.fp16_section)
        b.run(5, "oom", "an out-of-memory error in the first steps and its fallback", train.oom_section)
        b.run(6, "loader", "one short epoch of stage 1 from the HDF5 cache", train.loader_section)
        b.doc.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(b.elapsed(), 1))
        b.write()
        b.say(f"[bench gpu {b.elapsed():5.0f} s] done")
        return b.doc


def section_lines(doc: dict[str, Any]) -> list[str]:
    """One line per section: its status and, unless ok, why."""
    lines = []
    for name, s in doc["sections"].items():
        why = s.get("reason") or s.get("error") or s.get("errors") or ""
        lines.append(f"{name}: {s['status']} ({s['seconds']:.1f} s) {why}".rstrip())
    return lines


def failed(doc: dict[str, Any]) -> bool:
    return any(s["status"] == "error" for s in doc["sections"].values())
