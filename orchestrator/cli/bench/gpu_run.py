"""The state one `bench gpu` run shares between its sections: sizes, the document, the
section guard (bench_gpu.py drives; bench_gpu_plan.py and bench_gpu_train.py hold the
sections)."""
from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from orchestrator.atomic import atomic_write_text
from orchestrator.config import REPO_ROOT, Plan


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


def say_on_stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class GpuBench:
    """The document, the shared state between sections and the section guard."""

    def __init__(self, device: Literal["cuda", "cpu"], sizes: Sizes, tmp: Path, out: Path | None,
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
    if device == "cuda" and torch.cuda.is_initialized():
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
