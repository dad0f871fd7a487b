"""On a GPU: hold a stage to its plan's memory budget, and survive an out-of-memory error
in its first steps.

- `limit_gpu_memory`: `torch.cuda.set_per_process_memory_fraction` makes the caching
  allocator refuse more than the budget (less the CUDA context the plan counted), so a
  20 GB plan is binding on an 80 GB card and a plan's promise is tested, not hidden.
- `OomFallback`: an OutOfMemoryError in the first `FIRST_STEPS` steps of a process is
  caught; the stage falls back to gradient checkpointing, then to half the batch per
  backward with twice the accumulation (`TrainStep.micro`: the same batch, hence the same
  data order and resume), retries the step, and records why in state.json (`memory_fallback`).
  It reaches the runner only through `Fallible`: the stage's name, device and step batch,
  the two knobs it turns, dropping the gradients, and recording.

Nothing here acts on the CPU (a CPU has no allocator limit to set, and there an
allocation failure is the kernel's OOM killer, not an exception).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)
GIB = 1024**3
FIRST_STEPS = 5


def limit_gpu_memory(budget_gb: float, context_gb: float, device: torch.device) -> str | None:
    """Cap this process's CUDA allocator at the budget; what was done, or None on CPU."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = max(0.01, min(1.0, (budget_gb - context_gb) * GIB / total))
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return (f"CUDA allocator limited to {fraction * total / GIB:.1f} GB ({fraction:.0%} of "
            f"{total / GIB:.0f} GB): the plan's {budget_gb:g} GB less {context_gb:g} GB context")


class Fallible(Protocol):
    """What the OOM fallback needs of a stage's runner (training/runner.py's StageRunner)."""

    @property
    def stage_name(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def step_batch(self) -> int: ...

    def turn_on_checkpointing(self) -> bool:
        """Gradient checkpointing on; False where it is on already (or the model has none)."""
        ...

    def split_backward(self) -> int | None:
        """Twice the step's backward passes per batch; the new number, or None if it cannot."""
        ...

    def drop_gradients(self) -> None: ...

    def record(self, counter: str | None = None, **fields: Any) -> dict[str, Any]: ...


class OomFallback:
    """Runs a stage's steps; on a GPU, catches an OOM in the first steps and falls back."""

    def __init__(self, runner: Fallible) -> None:
        self.runner = runner
        self.steps_left = FIRST_STEPS if runner.device.type == "cuda" else 0
        self.history: list[str] = []

    def step(self, one_step: Callable[[Any], None], batch: Any) -> None:
        while True:
            try:
                one_step(batch)
                self.steps_left = max(0, self.steps_left - 1)
                return
            except torch.cuda.OutOfMemoryError as err:
                if self.steps_left == 0:
                    raise
                why = self._fall_back(err)
                self.runner.drop_gradients()
                torch.cuda.empty_cache()
                self.history.append(why)
                logger.warning("%s: %s", self.runner.stage_name, why)
                self.runner.record(memory_fallback=list(self.history))

    def _fall_back(self, err: BaseException) -> str:
        first = str(err).splitlines()[0][:160]
        if self.runner.turn_on_checkpointing():
            return f"out of memory in the first steps ({first}): gradient checkpointing on"
        step_batch = self.runner.step_batch
        micro = self.runner.split_backward()  # the step's own accumulation: same batch, same order
        if micro is not None:
            return (f"out of memory in the first steps ({first}): batch {step_batch} as "
                    f"{micro} backward passes of {step_batch // micro} (accumulated)")
        raise err
