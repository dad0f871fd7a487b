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

import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import REPO_ROOT, Plan
from orchestrator.errors import ConfigError
from orchestrator.runs.atomic import atomic_write_text


@dataclass(frozen=True)
class Sizes:
    """How big each section runs (full on a GPU; quick on a CPU or with --quick)."""

    verify_steps: int
    step_steps: int  # trial steps per stage; the steady step is the fastest after the first
    fp16_steps: int
    oom_steps: int
    epoch_steps: int
    subjects: int
    subject_vox: tuple[int, int, int]
    quick_patch_vox: int | None  # None: the curriculum's own stages (stages/progressive.yaml)


FULL = Sizes(verify_steps=3, step_steps=8, fp16_steps=6, oom_steps=3, epoch_steps=40,
             subjects=4, subject_vox=(197, 233, 189), quick_patch_vox=None)
QUICK = Sizes(verify_steps=2, step_steps=2, fp16_steps=2, oom_steps=2, epoch_steps=3,
              subjects=3, subject_vox=(24, 24, 24), quick_patch_vox=16)


class Skipped(Exception):
    """A section that cannot run here; its message is the reason."""


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class GpuBench:
    """The document, the shared state between sections and the section guard."""

    def __init__(self, device: str, sizes: Sizes, tmp: Path, out: Path | None,
                 say: Callable[[str], None]) -> None:
        self.device, self.sizes, self.tmp, self.out, self.say = device, sizes, tmp, out, say
        self.t0 = time.perf_counter()
        self.plan20: Plan | None = None
        self.plan20_path: Path | None = None
        self.data_cache: Path | BaseException | None = None
        self.doc: dict[str, Any] = {"bench": "gpu", "machine": {}, "device": device,
                                    "quick": sizes.quick_patch_vox is not None,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "finished": None, "seconds": None,
                                    "figures": {}, "sections": {}, "data": None}

    @property
    def runs_dir(self) -> Path:
        return self.tmp / "runs"

    def write(self) -> None:
        if self.out is not None:
            atomic_write_text(self.out, json.dumps(self.doc, indent=2, default=str) + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def failure(self, err: BaseException) -> str:
        """Print the traceback (stderr: the log of a remote run) and return the short form."""
        self.say("".join(traceback.format_exception(err)).rstrip())
        return describe_error(err)

    def run(self, number: int, name: str, what: str, fn: Callable[[GpuBench], dict[str, Any]]) -> None:
        """Run one section; its figures, details and status (ok, error, skipped) go in the doc."""
        self.say(f"[bench gpu {self.elapsed():5.0f} s] {number}/6 {name}: {what}")
        t0 = time.perf_counter()
        try:
            result = fn(self)
        except Skipped as why:
            entry: dict[str, Any] = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # noqa: BLE001 -- a failed section is a result, not the end
            entry = {"status": "error", "error": self.failure(err)}
        else:
            figures = {k: float(f"{float(v):.6g}") for k, v in result.pop("figures").items()}
            self.doc["figures"].update(figures)
            errors = result.pop("errors", None)
            entry = {"status": "error" if errors else "ok", **({"errors": errors} if errors else {}),
                     "figures": sorted(figures), **result}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.doc["sections"][name] = entry
        self.write()
        detail = entry.get("reason") or entry.get("error") or entry.get("errors") or ""
        self.say(f"[bench gpu {self.elapsed():5.0f} s]     {name}: {entry['status']} in "
                 f"{entry['seconds']:.1f} s {detail}".rstrip())
        free_device_memory(self.device)


def describe_error(err: BaseException) -> str:
    """`Type: first line (file:line)` of the innermost frame in this project."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if str(REPO_ROOT) in f.filename and "/.venv/" not in f.filename]
    where = ""
    if frames:
        f = frames[-1]
        where = f" ({Path(f.filename).relative_to(REPO_ROOT)}:{f.lineno})"
    return f"{type(err).__name__}: {first}{where}"


def free_device_memory(device: str) -> None:
    """Drop what a section left on the GPU, and any allocator limit a trainer set."""
    gc.collect()
    if device == "cuda":
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- the command


def machine(device: str) -> dict[str, Any]:
    """bench_data's machine info, the GPU's (NVML: no CUDA context yet) and CUDA's versions."""
    import torch

    from orchestrator.bench_data import machine_info
    from orchestrator.planning.nvml import gpu_info

    info = {**machine_info(torch.__version__), "device": device, "threads": torch.get_num_threads()}
    if device == "cuda":
        info.update(gpu_info(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def bench_gpu(device: str = "auto", quick: bool = False, out: Path | None = None,
              tmp_dir: Path | None = None, say: Callable[[str], None] = _stderr) -> dict[str, Any]:
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
    import tempfile

    from orchestrator import bench_gpu_plan as plan
    from orchestrator import bench_gpu_train as train
    from orchestrator.training.devices import resolve_device

    device = resolve_device(device).type
    sizes = QUICK if quick or device == "cpu" else FULL
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise ConfigError(f"--out: {out} is a folder or its folder does not exist; expected a file path")
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="bench-gpu-") as tmp:
        b = GpuBench(device, sizes, Path(tmp), out, say)
        b.doc["machine"] = machine(device)
        b.write()
        b.say(f"[bench gpu] {device}, {'quick' if b.doc['quick'] else 'full'} sizes"
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
