"""A stage's learning-rate schedule: warm-up, then cosine decay to `min_lr`.

A stage trained from scratch warms up linearly from 0 over `warmup_epochs`; a stage
that starts from a hand-off (`init_from` or `init_checkpoint`) and sets
`handoff_warmup_epochs` or `handoff_warmup_steps` ramps instead from
`handoff_warmup_start` x lr, since its weights are already trained and a step at the full
rate can undo the hand-off. Then the rate follows a cosine from lr down to `min_lr` at
the stage's last step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from orchestrator.config import StageSpec


def lr_factor(spec: StageSpec, handed_off: bool) -> Callable[[int], float]:
    """The multiplier of `spec.lr` after `step` optimizer steps (a `LambdaLR` lambda)."""
    total = spec.max_epochs * spec.iterations_per_epoch
    span = spec.handoff_warmup_span(spec.iterations_per_epoch) if handed_off else 0
    warm = span or spec.warmup_epochs * spec.iterations_per_epoch
    floor = spec.min_lr / spec.lr

    def f(step: int) -> float:
        if step < warm:
            if span:
                return spec.handoff_warmup_start + (1 - spec.handoff_warmup_start) * step / span
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))
    return f
