"""`orchestrator demo`: synthetic data -> CPU plan -> the 4 stages on the local executor.

Everything goes under one folder (data/, runs/, logs/), so the demo can be inspected
afterwards with `orchestrator status --runs-dir DIR/runs`.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from orchestrator.cli import render
from orchestrator.config import REPO_ROOT, ExecutorName
from orchestrator.data.mni152 import MNI152_SHAPE_VOX, TemplateUnavailable, synthesize_mni152
from orchestrator.data.nifti import load_image
from orchestrator.data.synth import synthesize_atlas
from orchestrator.errors import ConfigError
from orchestrator.launch.submit import submit_plan
from orchestrator.planning.plan_file import PlanRequest, make_plan, write_plan
from orchestrator.runs.status import collect_status
from orchestrator.training.run_report import write_report
from orchestrator.training.step import estimation_step

DEMO_CURRICULUM = REPO_ROOT / "stages" / "demo.yaml"
DEMO_SHAPE_VOX = (64, 64, 64)
DEMO_BUDGET_GB = 3.0


def synthetic_data(data_dir: Path, subjects: int, err: Console, seed: int = 0,
                   anatomy: str = "auto") -> str:
    """Synthetic subjects in `data_dir` unless it holds subjects already: phantoms, or
    brain anatomy (MNI152 template; with "auto" the phantoms, after a one-line notice,
    where the template cannot be had). Returns what the folder holds, e.g.
    "mni152 98x116x94".

    Raises:
        ConfigError: an unknown `anatomy`; TemplateUnavailable: "mni152" and no template.
    """
    if anatomy not in ("auto", "mni152", "phantom"):
        raise ConfigError(f"--anatomy {anatomy!r}; expected auto, mni152 or phantom")
    images = sorted(data_dir.glob("Training/*/sub-*/ses-1/anat/*_T1w.nii.gz"))
    if not images and anatomy == "phantom":
        with render.counter(err, "synthesising phantoms", subjects) as tick:
            synthesize_atlas(data_dir, subjects, DEMO_SHAPE_VOX, seed=seed, progress=tick)
    elif not images:
        try:
            with render.counter(err, "synthesising brain-anatomy subjects", subjects) as tick:
                synthesize_mni152(data_dir, subjects, seed=seed, progress=tick)
        except TemplateUnavailable as why:
            if anatomy == "mni152":
                raise
            err.print(f"[yellow]notice:[/] phantoms instead of MNI152 anatomy ({why})",
                      highlight=False, soft_wrap=True)
            with render.counter(err, "synthesising phantoms", subjects) as tick:
                synthesize_atlas(data_dir, subjects, DEMO_SHAPE_VOX, seed=seed, progress=tick)
    images = images or sorted(data_dir.glob("Training/*/sub-*/ses-1/anat/*_T1w.nii.gz"))
    shape = tuple(load_image(images[0]).shape)
    kind = "mni152" if shape == MNI152_SHAPE_VOX else "phantoms"
    return f"{kind} {'x'.join(map(str, shape))}"


def run_demo(out_dir: Path, subjects: int, executor: ExecutorName, out: Console, err: Console,
             anatomy: str = "phantom") -> dict:
    """Run the whole pipeline; returns the run's status document."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    what = synthetic_data(data_dir, subjects, err, anatomy=anatomy)
    out.print(f"[bold]1/3 data[/]: {subjects} synthetic subjects ({what}) in {data_dir}")
    run = time.strftime("demo-%Y%m%d-%H%M%S")
    req = PlanRequest(curriculum=DEMO_CURRICULUM, target_mem_gb=DEMO_BUDGET_GB, device="cpu",
                      cluster="local", data_dir=data_dir, run=run, runs_dir=out_dir / "runs")
    with err.status("planning the 4 stages for this CPU...") as status:
        plan = make_plan(req, estimation_step, progress=lambda n: status.update(f"planning {n}..."))
    plan_path = write_plan(plan)
    out.print(f"[bold]2/3 plan[/]: {plan_path}")
    render.plan_table(out, plan)
    out.print(f"[bold]3/3 train[/]: {len(plan.stages)} stages on the {executor} executor")
    fetch = lambda: collect_status(Path(plan.runs_dir), plan.run)  # noqa: E731
    with Live(render.status_table(fetch(), plan.run), console=out, refresh_per_second=1,
              transient=False) as live:
        submit_plan(plan, plan_path, executor, include_lcnn=False,
                    poll=lambda: live.update(render.status_table(fetch(), plan.run)))
    doc = fetch()
    minutes = (time.perf_counter() - t0) / 60
    out.print(f"[green]demo finished in {minutes:.1f} min[/]: run {plan.run_dir}")
    for s in doc["runs"][0]["stages"]:
        dice = s["best_dice"]
        start = render.handoff_dice(s.get("handoff"))
        start = f", epoch-0 Dice after the hand-off {start}" if start != "-" else ""
        out.print(f"  {s['name']}: best val Dice {dice:.3f}{start}" if isinstance(dice, float)
                  else f"  {s['name']}: {s['state']}")
    for line in render.run_model_lines(doc["runs"][0]):
        out.print(line, highlight=False, soft_wrap=True)
    out.print(f"report: {write_report(plan.run_dir, 'cpu').path}")
    out.print(f"inspect: orchestrator status {plan.run} --runs-dir {plan.runs_dir}")
    return doc
