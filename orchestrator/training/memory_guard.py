"""On a GPU: hold a stage to its plan's memory budget, and survive an out-of-memory error
in its first steps.

- `limit_gpu_memory`: `torch.cuda.set_per_process_memory_fraction` makes the caching
  allocator refuse more than the budget (less the CUDA context the plan counted), so a
  20 GB plan is binding on an 80 GB card and a plan's promise is tested, not hidden.
- `OomFallback`: an OutOfMemoryError in the first `FIRST_STEPS` steps of a process is
  caught; the stage falls back to gradient checkpointing, then to half the batch per
  backward with twice the accumulation (the same batch, hence the same data order and
  resume), retries the step, and records why in state.json (`memory_fallback`).

Nothing here acts on the CPU (a CPU has no allocator limit to set, and there an
allocation failure is the kernel's OOM killer, not an exception).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

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


class AccumulatingObjective:
    """The stage's objective over `micro` chunks of each batch: all chunks but the last
    are backpropagated here, the last is returned for the trainer's own backward, and the
    value is the batch's size-weighted mean loss, so gradients sum as for the whole batch."""

    def __init__(self, inner: Callable[..., torch.Tensor], micro: int, scaler: Any) -> None:
        self.inner, self.micro, self.scaler = inner, micro, scaler

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 *args: Any, sdm: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        sdms = sdm.chunk(self.micro) if sdm is not None else (None,) * self.micro
        parts = list(zip(x.chunk(self.micro), y.chunk(self.micro), sdms))

        def loss(xi: torch.Tensor, yi: torch.Tensor, si: torch.Tensor | None) -> torch.Tensor:
            extra = {"sdm": si} if si is not None else {}  # the distance maps' chunk too
            return self.inner(model, xi, yi, *args, **extra, **kwargs) * (len(xi) / len(x))

        done = torch.zeros((), device=x.device)
        for part in parts[:-1]:
            value = loss(*part)
            self.scaler.scale(value).backward()
            done = done + value.detach()
        return loss(*parts[-1]) + done


class OomFallback:
    """Runs a stage's steps; on a GPU, catches an OOM in the first steps and falls back."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.steps_left = FIRST_STEPS if runner.device.type == "cuda" else 0
        self.micro = runner.sp.spec.grad_accum_steps  # the stage's own accumulation
        self.history: list[str] = []
        self._objective: Any = None  # the runner's own objective, before any accumulation

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
                self.runner.opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.history.append(why)
                logger.warning("%s: %s", self.runner.sp.name, why)
                self.runner.record(memory_fallback=list(self.history))

    def _fall_back(self, err: BaseException) -> str:
        model = self.runner.model
        first = str(err).splitlines()[0][:160]
        if not getattr(model, "checkpointing", True):
            model.checkpointing = True
            return f"out of memory in the first steps ({first}): gradient checkpointing on"
        step_batch = self.runner.step_batch
        if self.micro * 2 <= step_batch:
            self.micro *= 2
            if self._objective is None:  # the objective without any accumulation
                inner = self.runner.objective
                self._objective = inner.inner if isinstance(inner, AccumulatingObjective) else inner
            self.runner.objective = AccumulatingObjective(self._objective, self.micro,
                                                          self.runner.scaler)
            return (f"out of memory in the first steps ({first}): batch {step_batch} as "
                    f"{self.micro} backward passes of {step_batch // self.micro} (accumulated)")
        raise err
