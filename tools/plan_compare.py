"""Plan stages/progressive.yaml at a few budgets and print each case's plan, seconds and
estimates as JSON lines; `--diff A B` compares two such outputs field by field.

Run it with two trees on PYTHONPATH in turn (e.g. main's code from `git archive` and a
branch) to check that a speed-up leaves the plans exactly as they were:

    PYTHONPATH=/tmp/base python tools/plan_compare.py > base.jsonl
    PYTHONPATH=$PWD python tools/plan_compare.py > new.jsonl
    python tools/plan_compare.py --diff base.jsonl new.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

FIELDS = ("input_size_vox", "base_filters", "batch_size", "checkpointing", "amp", "params",
          "predicted_gb", "train_gb", "val_gb", "reasons", "fresh_tensors")


def plan_cases(cases: list[tuple[str, float]], workers: int | None) -> None:
    from orchestrator.config import DEFAULT_CURRICULUM
    from orchestrator.planning import estimator
    from orchestrator.planning.plan_file import PlanRequest, make_plan
    from orchestrator.training.step import estimation_step

    if workers is not None:
        import os

        os.environ["ORCHESTRATOR_PLAN_WORKERS"] = str(workers)
    for device, gb in cases:
        estimator.clear_estimate_cache()
        req = PlanRequest(curriculum=DEFAULT_CURRICULUM, target_mem_gb=gb,
                          device=device, run="bench", calibrate=False)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        plan = make_plan(req, estimation_step)
        seconds = time.perf_counter() - t0
        stages = {sp.name: {f: _plain(getattr(sp, f, None)) for f in FIELDS} for sp in plan.stages}
        print(json.dumps({"case": f"{device}_{gb:g}", "seconds": round(seconds, 2),
                          "estimates": estimator.estimates_run(), "stages": stages}), flush=True)


def _plain(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()  # type: ignore[union-attr]
    return value


def diff(a: Path, b: Path) -> int:
    """Print every field that differs between two outputs' common cases; 1 if any does."""
    def load(p: Path) -> dict[str, dict]:
        return {d["case"]: d for d in map(json.loads, p.read_text().splitlines()) if d}
    old, new = load(a), load(b)
    bad = 0
    for case in sorted(set(old) & set(new)):
        o, n = old[case], new[case]
        print(f"{case}: {o['seconds']} s ({o['estimates']}) -> {n['seconds']} s ({n['estimates']})")
        for stage, fields in o["stages"].items():
            for f, v in fields.items():
                w = n["stages"].get(stage, {}).get(f)
                if v != w:
                    bad = 1
                    print(f"  DIFF {case} {stage} {f}: {v!r} != {w!r}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="cpu:4,cuda:4,cpu:6,cuda:6,cpu:20,cuda:20,cpu:80,cuda:80",
                    help="device:GB, comma-separated")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--diff", nargs=2, type=Path, metavar=("A", "B"))
    args = ap.parse_args()
    if args.diff:
        return diff(*args.diff)
    cases = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cases.split(",")]
    plan_cases(cases, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
