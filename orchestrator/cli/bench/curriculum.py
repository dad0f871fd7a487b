"""`orchestrator bench curriculum`: the progressive chain against stage 4 from scratch, at
equal compute (training FLOPs, and training time), on brain-anatomy subjects with held-out
test subjects.

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

Equal training time ("equal_time" in the document): FLOPs flatter the small models, which
use a CPU (and more so a GPU) worse per FLOP. So each (model, patch) step is also timed
before the arms start (CPU seconds of one thread, the median of a few steps after a
warm-up: the wall time of a core of one's own, less disturbed by other processes than the
clock), the chain's steps priced in those seconds, and the two scratch arms trained again
for the chain's seconds (the growing-patch arm giving each patch the chain's seconds
there). The chain is tested at the same fractions of its seconds. On a shared machine the
step times are noisy: compare arms of one run only.

The chain's final model is also tested as `evaluate --run` would (`heldout.py`): one pass,
mirrored, and mirrored with the post-processing chosen on separate validation subjects.

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
from orchestrator.cli.bench.curriculum_report import (
    ARMS,
    TIME,
    equal_time_record,
    figures,
    first_reach,
)
from orchestrator.cli.bench.data import machine_info
from orchestrator.cli.bench.heldout import inference_figures
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
# 2 validation subjects (after the test ones, so train and test stay as they were) choose
# the chain's post-processing; `timed_steps` per (model, patch) price a step in seconds.
FULL = {"train": 9, "test": 4, "val": 2, "patches": (32, 32, 32, 48), "steps": (300, 150, 60, 30),
        "timed_steps": 3}
QUICK = {"train": 2, "test": 1, "val": 1, "patches": (32, 32, 32, 32), "steps": (2, 1, 1, 1),
         "phantom_vox": 32, "timed_steps": 1}


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
        train, test, val, what = _data(Path(tmp), size, seed, anatomy, quick)
        specs = [spec for spec, _ in load_curriculum(CURRICULUM)[1][:4]]
        patches = [(p,) * 3 for p in size["patches"]]
        pairs = sorted({(i, p) for i in range(4) for p in set(patches)})
        flops = {(i, p): _step_flops(specs[i], p) for i, p in pairs}
        say("timing one training step of each model and patch")
        secs = {(i, p): _step_seconds(specs[i], p, size["timed_steps"]) for i, p in pairs}
        chain = [(i, patches[i], size["steps"][i]) for i in range(4)]
        budget = sum(flops[(i, p)] * n for i, p, n in chain)
        budget_s = sum(secs[(i, p)] * n for i, p, n in chain)
        last = len(specs) - 1
        plans = {
            "progressive": chain,
            "scratch": [(last, patches[-1], round(budget / flops[(last, patches[-1])]))],
            "scratch_growing_patch": _same_cost_per_patch(chain, flops, last),
            "scratch" + TIME: [(last, patches[-1], round(budget_s / secs[(last, patches[-1])]))],
            "scratch_growing_patch" + TIME: _same_cost_per_patch(chain, secs, last),
        }
        # stage 4's rate is a rate for continuing a handed-off model; from scratch it trains
        # at the curriculum's from-scratch rate, stage 1's
        scratch_specs = [*specs[:last], specs[last].model_copy(update={"lr": specs[0].lr})]
        costs = {"flops": (flops, budget), "time": (secs, budget_s)}
        units = {name: ("flops", "time") if name == "progressive" else
                 ("time",) if name.endswith(TIME) else ("flops",) for name in plans}
        work = {name: (plans[name], specs if name == "progressive" else scratch_specs, costs,
                       units[name], train, test, val if name == "progressive" else [], seed)
                for name in plans}
        runs = _run_arms(work, jobs, threads, say)
        for name in plans:
            arm_specs = work[name][1]
            runs[name]["lr"] = [arm_specs[i].lr for i in sorted({i for i, _, _ in plans[name]})]
    arms = {name: runs[name] for name in ARMS}
    for name, arm in arms.items():
        arm["reached_others_final_at"] = {
            other: first_reach(arm["curve"], arms[other]["test_dice"], "fraction")
            for other in arms if other != name}
        arm["reached_others_final_at_train_cpu_s"] = {
            other: first_reach(arm["curve"], arms[other]["test_dice"], "train_cpu_s")
            for other in arms if other != name}
    machine = {**machine_info(torch.__version__), "torch_threads": threads, "jobs": jobs,
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    equal_time = equal_time_record(runs, budget_s, secs, specs)
    inference = arms["progressive"].pop("inference")
    return {"bench": "curriculum", "quick": quick, "machine": machine,
            "data": what, "budget_unit": "GFLOP of training steps (torch.utils.flop_counter)",
            "budget_gflop": round(budget / 1e9, 3), "eval_fractions": list(EVAL_FRACTIONS),
            "arms": arms, "equal_time": equal_time, "chain_inference": inference,
            "figures": figures(arms, equal_time, inference)}


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
    """(train, test, validation records, description): distinct subjects, test and
    validation ones held out."""
    n = size["train"] + size["test"] + size["val"]
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
    cut = size["train"] + size["test"]
    train, test, val = records[:size["train"]], records[size["train"]:cut], records[cut:]
    return train, test, val, {"anatomy": kind, "train_subjects": len(train),
                              "test_subjects": len(test), "validation_subjects": len(val),
                              "notice": notice}


def _stage_plan(spec: StageSpec, patch: tuple[int, int, int]) -> StagePlan:
    return StagePlan(name=spec.name, kind=spec.kind, spec=spec, init_from=None, input_size_vox=patch,
                     base_filters=spec.base_filters, batch_size=spec.batch_size, checkpointing=False,
                     amp=False, params=0, predicted_gb=0.0, reasons=["bench curriculum"])


def _build(spec: StageSpec, patch: tuple[int, int, int]):
    return models.build_model(spec.model.arch, **_stage_plan(spec, patch).model_kwargs())


def _one_step(spec: StageSpec, patch: tuple[int, int, int]) -> Callable[[], Any]:
    """One training step of the stage's model at `patch` (its batch size), to run again."""
    torch.manual_seed(0)
    model = _build(spec, patch)
    step = TrainStep.for_stage(spec, "cpu", False)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    x = torch.randn(spec.batch_size, 1, *patch)
    y = (torch.rand(spec.batch_size, *patch) > 0.9).long()
    sdm = sdm_placeholder(step, x)
    return lambda: step(model, opt, x, y, sdm=sdm, epoch=0)


def _step_flops(spec: StageSpec, patch: tuple[int, int, int]) -> int:
    """FLOPs of one training step of the stage's model at `patch` (its batch size)."""
    run = _one_step(spec, patch)
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def _step_seconds(spec: StageSpec, patch: tuple[int, int, int], timed: int) -> float:
    """CPU seconds of one training step of the stage's model at `patch` (its batch size):
    the median of `timed` steps after one warm-up, in this process's torch threads."""
    run = _one_step(spec, patch)
    times = []
    for k in range(timed + 1):
        t0 = time.process_time()
        run()
        if k:  # the first step allocates and warms the caches
            times.append(time.process_time() - t0)
    return float(sorted(times)[len(times) // 2])


def _same_cost_per_patch(chain, cost, last: int):
    """Stage 4's model through the chain's patches, each patch given the chain's cost
    there (FLOPs or seconds; rounded on the running total, so the whole stays within half
    a step of the budget; a phase shorter than half a step gets none)."""
    phases, spent, target = [], 0.0, 0.0
    for i, p, n in chain:
        target += cost[(i, p)] * n
        steps = max(0, round((target - spent) / cost[(last, p)]))
        spent += steps * cost[(last, p)]
        phases.append((last, p, steps))
    return phases


def _run_arm(phases, specs, costs: dict[str, tuple[dict, float]], units: tuple[str, ...],
             train, test, val, seed: int, *, say: Callable[[str], None]) -> dict[str, Any]:
    """Train the phases in order, testing at the budget fractions of each of `units`
    ("flops": "curve", "time": "curve_time"); returns the arm's record, with the final
    model's `inference_figures` where `val` has subjects.

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
    spent = dict.fromkeys(costs, 0.0)
    curves: dict[str, list[dict[str, Any]]] = {u: [] for u in units}
    marks = {u: [f * costs[u][1] for f in EVAL_FRACTIONS] for u in units}
    handoffs = []
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
            for u in costs:
                spent[u] += costs[u][0][(i, patch)]
            dice: float | None = None  # one test for the marks of both units at this step
            for u in units:
                per = costs[u][0][(i, patch)]
                while marks[u] and spent[u] >= marks[u][0] - per / 2:
                    marks[u].pop(0)
                    dice = _test_dice(model, patch, test) if dice is None else dice
                    curves[u].append(_point(u, spent, costs, train_cpu, dice))
                    say(f"  {spec.name} {patch[0]}^3 ({u}): {curves[u][-1]}")
        prev = (i, patch)
    for u in units:
        while marks[u]:  # rounding left the last mark a fraction of a step away
            marks[u].pop(0)
            curves[u].append(_point(u, spent, costs, train_cpu, _test_dice(model, prev[1], test)))
    first = curves[units[0]]
    record = {"phases": [{"stage": specs[i].name, "patch": list(p), "steps": n,
                          "gflop_per_step": round(costs["flops"][0][(i, p)] / 1e9, 4),
                          "seconds_per_step": round(costs["time"][0][(i, p)], 3)}
                         for i, p, n in phases],
              "budget_gflop": round(spent["flops"] / 1e9, 3), "budget_s": round(spent["time"], 1),
              "cpu_s": round(time.process_time() - cpu0, 1), "train_cpu_s": round(train_cpu, 1),
              "test_dice": first[-1]["test_dice"], "handoffs": handoffs,
              **{("curve" if u == "flops" else "curve_time"): c for u, c in curves.items()}}
    if val:
        say("testing the final model: one pass, mirrored, mirrored and post-processed")
        record["inference"] = inference_figures(model, prev[1], test, val)
    return record


def _point(unit: str, spent: dict[str, float], costs: dict, train_cpu: float,
           dice: float) -> dict[str, float]:
    point = {"gflop": round(spent["flops"] / 1e9, 3),
             "fraction": round(spent[unit] / costs[unit][1], 3)}
    if unit == "time":  # estimated from timed steps: differs from run to run
        point["planned_s"] = round(spent["time"], 1)
    return {**point, "train_cpu_s": round(train_cpu, 1), "test_dice": dice}


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
