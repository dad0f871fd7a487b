"""Searches along a stage's ladder of configurations (planning/planner.py): pure
functions of a predicate or a value per rung, so they are tested without any model."""
from __future__ import annotations

import math
from collections.abc import Callable


def first_fit(n: int, fits: Callable[[int], bool]) -> int | None:
    """Smallest index i of a ladder of n rungs with fits(i), assuming fits is monotone:
    probe 0, 1, 3, 7, ... then bisect the bracket. Exactness at the boundary does not
    depend on monotonicity: the answer fits and the rung before it does not."""
    if fits(0):
        return 0
    bad, step = 0, 1
    while True:
        probe = min(bad + step, n - 1)
        if fits(probe):
            good = probe
            break
        if probe == n - 1:
            return None
        bad, step = probe, step * 2
    while good - bad > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def first_below(value: Callable[[int], float], target: float, sizes: list[float],
                rung0_over: bool = False) -> int | None:
    """Smallest index i of a ladder with value(i) <= target, for values that fall along the
    ladder roughly in proportion to `sizes` (a rung's base filters x input voxels: what its
    activations scale with), using few values on a long ladder.

    Rungs 0 and 1 (the curriculum's numbers, then with checkpointing) first; then secant
    steps on value against size: through the origin from the one rung known not to fit,
    through the two smallest such rungs, or, once a rung fits, through the bracket (halved
    instead whenever a guess did not halve it). Exact at the boundary: the answer fits and
    the rung before it was estimated and does not. (Rung 1 first, rung 0 only where rung 1
    fits, saves an estimate on a tight budget but costs one on a roomy one, where every
    stage fits at rung 0: measured, 18 -> 22 estimates at 20 GB; roomy budgets are the
    common case on GPU nodes.) `rung0_over`: rung 0 is known not to fit (a lower bound of
    its value is over the target), so rung 1 comes first and rung 0 is never valued here;
    the steps after it are the same, as they use the rungs from 1 on."""
    n = len(sizes)
    known: dict[int, float] = {}
    for k in range(1 if rung0_over else 0, min(2, n)):
        known[k] = value(k)
        if known[k] <= target:
            return k
    if n <= 2:
        return None
    bad, good = 1, None
    halve = False
    while good is None or good - bad > 1:
        hi = n if good is None else good  # the next rung to try lies in (bad, hi)
        if good is not None and halve:
            k = (bad + good) // 2
        else:
            k = _secant_rung(known, bad, good, target, sizes, hi)
        width = hi - bad
        known[k] = value(k)
        if known[k] <= target:
            good = k
        elif k == n - 1:
            return None  # the smallest rung does not fit
        else:
            bad = k
        halve = good is not None and not halve and ((good - bad) * 2 > width)
    return good


def _secant_rung(known: dict[int, float], bad: int, good: int | None, target: float,
                 sizes: list[float], hi: int) -> int:
    """The first rung in (bad, hi) whose size the line through known values says fits."""
    if good is not None:
        (p0, v0), (p1, v1) = (sizes[bad], known[bad]), (sizes[good], known[good])
    else:
        below = sorted((k for k in known if k >= 1), reverse=True)[:2]  # the two smallest rungs
        if len(below) == 2 and sizes[below[0]] != sizes[below[1]]:
            (p0, v0), (p1, v1) = ((sizes[k], known[k]) for k in below)
        else:
            (p0, v0), (p1, v1) = (sizes[bad], known[bad]), (0.0, 0.0)
    slope = (v0 - v1) / (p0 - p1) if p0 != p1 else 0.0
    size_fit = p0 - (v0 - target) / slope if slope > 0 else -math.inf
    for k in range(bad + 1, hi):
        if sizes[k] <= size_fit:
            return k
    return hi - 1
