"""`orchestrator bench curriculum`: the progressive chain against stage 4 from scratch, at
equal compute, on brain-anatomy subjects with held-out test subjects.

Three arms, each given the same training budget:
- progressive: the demo curriculum's four stages (stages/demo.yaml), the model growing
  through the hand-off and the patch growing with it (`PATCHES`);
- scratch: stage 4's model from scratch at stage 4's patch, at stage 1's learning rate
  (the curriculum's rate for a model trained from scratch; the later stages' lower rates
  are for continuing a handed-off model);
- scratch_growing_patch: stage 4's model from scratch, the patch growing as the
  progressive arm's does (what the patch-size curriculum alone gives).

Budget unit: training FLOPs, counted by `torch.utils.flop_counter` on one training step
(forward, loss, backward) of each (model, patch, batch); an arm's spend is its steps times
their FLOPs. The machine is shared, so seconds measured at different moments are not
comparable between arms, and voxel-steps ignore that stage 4's model costs more per voxel
than stage 1's; FLOPs count both the patch and the model. Process CPU seconds are
reported too, for reference. Validation is not part of the budget: each arm is tested at
the same budget fractions (`EVAL_FRACTIONS`) on the held-out subjects.

The arms are independent (each seeds its own phases), so they run in `jobs` worker
processes at once, one torch thread each by default: on 2 cores the progressive arm
takes one and the two scratch arms the other, and the results equal a run one arm
after the other (`tests/test_bench_curriculum.py` checks that).
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import queue
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from orchestrator.cli.bench.data import machine_info
from orchestrator.config import REPO_ROOT, StagePlan, StageSpec, load_curriculum
from orchestrator.data.dataset import PatchDataset
from orchestrator.data.mni152 import TemplateUnavailable, synthesize_mni152
from orchestrator.data.sources import discover_subjects
from orchestrator.data.synth import synthesize_atlas
from orchestrator.planning.probe import usable_cpus
from orchestrator.training.handoff import transfer_weights
from orchestrator.training.lr_schedule import lr_factor
from orchestrator.training.step import TrainStep, sdm_placeholder
from orchestrator.training.validation import predict_volume, validate

CURRICULUM = REPO_ROOT / "stages" / "demo.yaml"
EVAL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# full size: 98x116x94 brains, 9 training and 4 test subjects. Stage 1 gets 300 steps: on
# these data it reaches held-out Dice ~0.2 there, and ~0 at 200 (docs/benchmarks.md); the
# patch grows only for stage 4 (48^3; 64^3 made an arm take half an hour of CPU).
FULL = {"train": 9, "test": 4, "patches": (32, 32, 32, 48), "steps": (300, 150, 60, 30)}
QUICK = {"train": 2, "test": 1, "patches": (32, 32, 32, 32), "steps": (2, 1, 1, 1),
         "phantom_vox": 32}
ARMS = ("progressive", "scratch", "scratch_growing_patch")


def bench_curriculum(quick: bool = False, work_dir: Path | None = None, seed: int = 0,
                     anatomy: str = "auto", progress: Callable[[str], None] | None = None,
                     threads: int | None = None, jobs: int | None = None) -> dict:
    """Train the three arms and test them; returns the JSON document (see the module doc).

    Args:
        quick: a tiny version (phantoms of 48^3, a few steps): for the test of the command.
        work_dir: where the data go (default: a temporary folder).
        anatomy: auto (MNI152 where the template can be had, else phantoms), mni152, phantom.
        threads: torch's CPU threads in each arm's process (None: the usable CPUs shared
            among the jobs, at least 1).
        jobs: arms trained at once, each in its own process (None: as many as there are
            usable CPUs, at most 3; 1: one after the other in this process).
    """
    cpus = usable_cpus()
    jobs = jobs or max(1, min(len(ARMS), cpus))
    threads = threads or max(1, cpus // jobs)
    torch.set_num_threads(threads)
    size: dict[str, Any] = QUICK if quick else FULL
    say = progress or (lambda _m: None)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="bench-curriculum-") as tmp:
        train, test, what = _data(Path(tmp), size, seed, anatomy, quick)
        specs = [spec for spec, _ in load_curriculum(CURRICULUM)[1][:4]]
        patches = [(p,) * 3 for p in size["patches"]]
        flops = {(i, p): _step_flops(specs[i], p) for i in range(4) for p in set(patches)}
        chain = [(i, patches[i], size["steps"][i]) for i in range(4)]
        budget = sum(flops[(i, p)] * n for i, p, n in chain)
        last = len(specs) - 1
        plans = {
            "progressive": chain,
            "scratch": [(last, patches[-1], round(budget / flops[(last, patches[-1])]))],
            "scratch_growing_patch": _same_flops_per_patch(chain, flops, last),
        }
        # stage 4's rate is a rate for continuing a handed-off model; from scratch it trains
        # at the curriculum's from-scratch rate, stage 1's
        scratch_specs = [*specs[:last], specs[last].model_copy(update={"lr": specs[0].lr})]
        work = {name: (plans[name], specs if name == "progressive" else scratch_specs, flops,
                       budget, train, test, seed) for name in ARMS}
        arms = _run_arms(work, jobs, threads, say)
        for name in ARMS:
            arm_specs = work[name][1]
            arms[name]["lr"] = [arm_specs[i].lr for i in sorted({i for i, _, _ in plans[name]})]
    for name, arm in arms.items():
        arm["reached_others_final_at"] = {
            other: _first_reach(arm["curve"], arms[other]["test_dice"], "fraction")
            for other in arms if other != name}
        arm["reached_others_final_at_train_cpu_s"] = {
            other: _first_reach(arm["curve"], arms[other]["test_dice"], "train_cpu_s")
            for other in arms if other != name}
    machine = {**machine_info(torch.__version__), "torch_threads": threads, "jobs": jobs,
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    return {"bench": "curriculum", "quick": quick, "machine": machine,
            "data": what, "budget_unit": "GFLOP of training steps (torch.utils.flop_counter)",
            "budget_gflop": round(budget / 1e9, 3), "eval_fractions": list(EVAL_FRACTIONS),
            "arms": arms}


def _run_arms(work: dict[str, tuple], jobs: int, threads: int,
              say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Each arm's record; `jobs` > 1 trains them in that many spawned processes (forking
    after torch has run its thread pool can hang the child), their progress lines relayed
    here as they come."""
    if jobs == 1:
        out = {}
        for name, args in work.items():
            say(f"{name}: {len(args[0])} phase(s)")
            out[name] = _run_arm(*args, say=functools.partial(_prefixed, say, f"{name}: "))
        return out
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        lines = manager.Queue()
        # the longest arm first: with two workers it gets one to itself
        pending: dict[Future, str] = {pool.submit(_arm_worker, name, args, threads, lines): name
                                      for name, args in work.items()}
        out = {}
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _relay(lines, say)
            for future in done:
                out[pending.pop(future)] = future.result()
        _relay(lines, say)
    return {name: out[name] for name in work}


def _prefixed(say: Callable[[str], None], prefix: str, line: str) -> None:
    say(prefix + line)


def _relay(lines: Any, say: Callable[[str], None]) -> None:
    while True:
        try:
            say(lines.get_nowait())
        except queue.Empty:
            return


def _arm_worker(name: str, args: tuple, threads: int, lines: Any) -> dict[str, Any]:
    """One arm in a worker process (module level, so the spawned process can import it)."""
    torch.set_num_threads(threads)
    lines.put(f"{name}: {len(args[0])} phase(s), pid {os.getpid()}")
    return _run_arm(*args, say=functools.partial(_prefixed, lines.put, f"{name}: "))


def _data(root: Path, size: dict, seed: int, anatomy: str, quick: bool):
    """(train records, test records, description): distinct subjects, test ones held out."""
    n = size["train"] + size["test"]
    kind = "phantom" if quick and anatomy == "auto" else anatomy
    notice = None
    if kind in ("auto", "mni152"):
        try:
            synthesize_mni152(root, n, seed=seed)
            kind = "mni152"
        except TemplateUnavailable as why:
            if kind == "mni152":
                raise
            notice, kind = f"phantoms instead of MNI152 anatomy ({why})", "phantom"
    if kind == "phantom":
        side = size.get("phantom_vox", 96)
        synthesize_atlas(root, n, (side,) * 3, seed=seed)
    records = discover_subjects(root)
    train, test = records[:size["train"]], records[size["train"]:]
    return train, test, {"anatomy": kind, "train_subjects": len(train), "test_subjects": len(test),
                         "notice": notice}


def _stage_plan(spec: StageSpec, patch: tuple[int, int, int]) -> StagePlan:
    return StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=None, input_size_vox=patch,
                     base_filters=spec.base_filters, batch_size=spec.batch_size, checkpointing=False,
                     amp=False, params=0, predicted_gb=0.0, reasons=["bench curriculum"])


def _build(spec: StageSpec, patch: tuple[int, int, int]):
    return models.build_model(spec.model.arch, **_stage_plan(spec, patch).model_kwargs())


def _step_flops(spec: StageSpec, patch: tuple[int, int, int]) -> int:
    """FLOPs of one training step of the stage's model at `patch` (its batch size)."""
    torch.manual_seed(0)
    model = _build(spec, patch)
    step = TrainStep.for_stage(spec, "cpu", False)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    x = torch.randn(spec.batch_size, 1, *patch)
    y = (torch.rand(spec.batch_size, *patch) > 0.9).long()
    with FlopCounterMode(display=False) as counter:
        step(model, opt, x, y, sdm=sdm_placeholder(step, x), epoch=0)
    return int(counter.get_total_flops())


def _same_flops_per_patch(chain, flops, last: int):
    """Stage 4's model through the chain's patches, each patch given the chain's FLOPs
    there (rounded on the running total, so the whole stays within half a step of the
    budget; a phase shorter than half a step gets none)."""
    phases, spent, target = [], 0, 0
    for i, p, n in chain:
        target += flops[(i, p)] * n
        steps = max(0, round((target - spent) / flops[(last, p)]))
        spent += steps * flops[(last, p)]
        phases.append((last, p, steps))
    return phases


def _run_arm(phases, specs, flops, budget: int, train, test, seed: int, *,
             say: Callable[[str], None]) -> dict[str, Any]:
    """Train the phases in order, testing at the budget fractions; returns the arm's record.

    A phase with another stage's model starts it through the hand-off, with a fresh
    optimizer and that stage's schedule; a phase with the same model and another patch
    keeps the model, optimizer and schedule (one cosine over all its phases)."""
    cpu0 = time.process_time()
    train_cpu = 0.0  # process CPU seconds in training steps (tests and hand-offs excluded)
    model: Any = None
    opt: Any = None
    sched: Any = None
    step_fn: Any = None
    prev: Any = None
    spent, curve, handoffs = 0, [], []
    marks = [f * budget for f in EVAL_FRACTIONS]
    for k, (i, patch, steps) in enumerate(phases):
        if not steps:  # shorter than half a step of this model (rounding)
            continue
        spec = specs[i]
        if prev is None or prev[0] != i:
            torch.manual_seed(seed + k)
            new = _build(spec, patch)
            if model is not None:
                before = _test_dice(model, prev[1], test)
                report = transfer_weights(model, new, (1, 1, *prev[1]), seed=seed)
                handoffs.append({"into": spec.name, "test_dice_before": before,
                                 "test_dice_after": _test_dice(new, patch, test),
                                 "relative_output_diff": report["relative_output_diff"]})
            handed_off, model = model is not None, new
            later = sum(n for j, _, n in phases[k:] if j == i)  # this model's steps
            step_fn, opt, sched = _optimiser(spec, model, later, handed_off)
        data = _dataset(spec, patch, train, steps, step_fn.needs_sdm, seed + k)
        per = flops[(i, patch)]
        for s in range(steps):
            batch = [data[s * spec.batch_size + b] for b in range(spec.batch_size)]
            x = torch.stack([b["image"] for b in batch])
            y = torch.stack([b["label"] for b in batch])
            sdm = torch.stack([b["sdm"] for b in batch]) if "sdm" in batch[0] else None
            model.train()
            t0 = time.process_time()
            step_fn(model, opt, x, y, sdm=sdm, epoch=sched.last_epoch // spec.iterations_per_epoch)
            sched.step()
            train_cpu += time.process_time() - t0
            spent += per
            while marks and spent >= marks[0] - per / 2:
                marks.pop(0)
                curve.append(_point(model, patch, test, spent, budget, train_cpu))
                say(f"  {spec.name} {patch[0]}^3: {curve[-1]}")
        prev = (i, patch)
    while marks:  # rounding left the last mark a fraction of a step away
        marks.pop(0)
        curve.append(_point(model, prev[1], test, spent, budget, train_cpu))
    return {"phases": [{"stage": specs[i].name, "patch": list(p), "steps": n,
                        "gflop_per_step": round(flops[(i, p)] / 1e9, 4)} for i, p, n in phases],
            "budget_gflop": round(spent / 1e9, 3), "cpu_s": round(time.process_time() - cpu0, 1),
            "train_cpu_s": round(train_cpu, 1),
            "test_dice": curve[-1]["test_dice"], "curve": curve, "handoffs": handoffs}


def _point(model, patch, test, spent: int, budget: int, train_cpu: float) -> dict[str, float]:
    return {"gflop": round(spent / 1e9, 3), "fraction": round(spent / budget, 3),
            "train_cpu_s": round(train_cpu, 1),
            "test_dice": _test_dice(model, patch, test)}


def _optimiser(spec: StageSpec, model, steps: int, handed_off: bool):
    """The stage's TrainStep, AdamW and LR schedule (`lr_schedule.lr_factor` over `steps`)."""
    step_fn = TrainStep.for_stage(spec, "cpu", False)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    warm = spec.handoff_warmup_span(spec.iterations_per_epoch)  # the stage's, in steps
    schedule = spec.model_copy(update={"max_epochs": 1, "iterations_per_epoch": steps,
                                       "handoff_warmup_epochs": 0, "handoff_warmup_steps": warm,
                                       "warmup_epochs": 0})
    return step_fn, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(schedule, handed_off))


def _dataset(spec: StageSpec, patch, train, steps: int, with_sdm: bool, seed: int):
    data = PatchDataset(train, patch, samples_per_epoch=steps * spec.batch_size,
                        lesion_fraction=spec.lesion_fraction, seed=seed, augment=spec.augment,
                        with_sdm=with_sdm)
    data.set_epoch(0)
    return data


def _test_dice(model, patch, test) -> float:
    """Mean Dice over the held-out subjects (sliding window at `patch`)."""
    dev = torch.device("cpu")
    row = validate(model, test, lambda m, vol: predict_volume(m, vol.image, patch, dev, None))
    return float(row["val_dice"])


def _first_reach(curve: list[dict[str, Any]], target: float, at: str) -> float | None:
    """The curve's `at` (budget fraction, training CPU seconds) where it first reached
    `target` (None: never)."""
    return next((p[at] for p in curve if p["test_dice"] >= target), None)


def summary_lines(doc: dict) -> list[str]:
    """One line per arm: held-out Dice, budget spent, and where it reached the others."""
    lines = [f"{doc['data']['anatomy']} data, {doc['data']['train_subjects']} training / "
             f"{doc['data']['test_subjects']} test subjects; budget {doc['budget_gflop']} GFLOP"]
    for name, arm in doc["arms"].items():
        cpu = arm["reached_others_final_at_train_cpu_s"]
        reach = ", ".join(f"{o} at {'-' if f is None else f'{f:.2f} of the budget ({cpu[o]} CPU s)'}"
                          for o, f in arm["reached_others_final_at"].items())
        lines.append(f"{name}: test Dice {arm['test_dice']:.3f} ({arm['budget_gflop']} GFLOP, "
                     f"{arm['train_cpu_s']} CPU s training, {arm['cpu_s']} with tests); "
                     f"reached {reach}")
    return lines
