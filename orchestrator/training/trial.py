"""A trial of one planned stage: a few real training steps in a fresh process, its peak
memory measured (what `plan --verify` runs for each stage).

    python -m orchestrator.training.trial --plan runs/R/plan.yaml --stage S [--steps 2]

prints one JSON line (`orchestrator.planning.verify.measure`, plus `step_s`, the steady
step time, which `plan` turns into the stage's job time). The step is `TrainStep`, the
one the trainer runs and the planner estimated (forward, loss with the batch's distance
maps, backward, clip, AdamW step), on random data of the planned shape, with the
optimizer the trainer builds, its state allocated before the first step (as the estimate
has it: the peak of every step from the second on); on the plan's device.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import models
from orchestrator.config import load_plan
from orchestrator.planning.cpu_heap import bound_cpu_heap
from orchestrator.planning.memory import prime_adamw
from orchestrator.planning.verify import measure
from orchestrator.training.step import TrainStep, sdm_placeholder


def trial(plan_path: Path, stage: str, steps: int = 2, device: str | None = None) -> dict[str, Any]:
    """Measure `steps` real steps of a planned stage.

    The step is `TrainStep`, the one the trainer runs and the planner estimated, with the
    plan's device (or `device`) as its only difference: the same code on a GPU and here.
    """
    plan = load_plan(plan_path)
    sp = plan.stage(stage)
    dev = torch.device(device or ("cuda" if plan.device == "cuda" else "cpu"))
    step = TrainStep.for_stage(sp.spec, dev.type, sp.amp, micro=1, synchronize=True)
    in_ch = sp.spec.model.input_channels  # as the planner's estimate counts them

    kept: dict[str, Any] = {}
    step_times: list[float] = []

    def run() -> None:
        torch.manual_seed(sp.spec.seed)
        model = models.build_model(sp.spec.model.arch, **sp.model_kwargs()).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=sp.spec.lr, weight_decay=sp.spec.weight_decay)
        prime_adamw(opt)  # every step measured holds the optimizer state, as the estimate's
        x = torch.randn(sp.batch_size, in_ch, *sp.input_size_vox, device=dev)
        y = torch.randint(0, 2, (sp.batch_size, *sp.input_size_vox), device=dev)
        kept.update(model=model, opt=opt, x=x, y=y, sdm=sdm_placeholder(step, x))
        for _ in range(steps):
            t0 = time.perf_counter()
            step(model, opt, x, y, sdm=kept["sdm"])
            step_times.append(time.perf_counter() - t0)

    if dev.type == "cpu":  # the heap as a stage on the CPU has it (trainer.run_stage)
        bound_cpu_heap()
    result = measure(run, dev.type)
    if dev.type == "cuda":
        # the memory tracker's Python hook on every op is a large part of a GPU step: time
        # one more step outside it (kernel selection and lazy allocations done)
        t0 = time.perf_counter()
        step(kept["model"], kept["opt"], kept["x"], kept["y"], sdm=kept["sdm"])
        step_times = [time.perf_counter() - t0]
    # on the CPU the hook is ~2 % of a step: the fastest measured step after the first
    result["step_s"] = round(min(step_times[1:] or step_times), 4)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--stage", required=True)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    result = trial(args.plan, args.stage, args.steps)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
