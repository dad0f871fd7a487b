"""Rich rendering of what the commands return (tables, progress); no logic a test needs."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.config import DEFAULT_TIME_MIN, Plan
from orchestrator.planning.resources import describe, stage_resources
from orchestrator.runs.cv_summary import format_mean_std


def _size(s: Any) -> str:
    return "x".join(str(v) for v in s)


def plan_json(plan: Plan) -> dict[str, Any]:
    return {"run": plan.run, "device": plan.device, "budget_gb": plan.budget_gb,
            "assumptions": plan.assumptions.model_dump(mode="json"),
            "plan_path": str(plan.run_dir / "plan.yaml"),
            "stages": [{"name": s.name, "model": s.spec.model.arch, "kind": s.kind,
                        "input_size": list(s.input_size_vox), "base_filters": s.base_filters,
                        "batch_size": s.batch_size, "checkpointing": s.checkpointing,
                        "amp": s.amp, "params": s.params, "predicted_gb": s.predicted_gb,
                        "train_gb": s.train_gb, "val_gb": s.val_gb,
                        "measured_gb": s.measured_gb, "init_from": s.init_from,
                        "calibration_ratio": s.calibration_ratio, "measurement": s.measurement,
                        "time_estimate_min": s.time_estimate_min,
                        "max_epochs": s.spec.max_epochs,
                        "iterations_per_epoch": s.spec.iterations_per_epoch,
                        "reasons": s.reasons, "fresh_tensors": s.fresh_tensors}
                       for s in plan.stages]}


def plan_table(console: Console, plan: Plan) -> None:
    p, a = plan.probe, plan.assumptions
    console.print(f"probed: GPUs {p.gpus_text()}; host {p.host_total_gb:.1f} GB RAM "
                  f"({p.host_available_gb:.1f} available), {p.cpus} CPUs"
                  + (f"; SLURM {p.slurm}" if p.slurm else ""))
    why = a.device_source
    overheads = a.overheads.model_dump() if a.overheads else None
    console.print(f"budget: {plan.budget_gb:g} GB on {plan.device}" + (f" ({why})" if why else "")
                  + f", from {a.budget_source}; overheads {overheads}", highlight=False)
    if a.gpu:
        console.print(f"assumed: {a.gpu}")
    prof = a.cluster
    chosen = f", {prof.chosen_by}" if prof and prof.chosen_by else ""
    console.print(f"cluster: profile {plan.cluster.name} ({(prof and prof.file) or '?'}{chosen}); "
                  f"job time {_time_source(plan)}", highlight=False)
    cal = a.calibration
    if cal and cal.applied:
        console.print(f"calibrated: predictions x measured/predicted from {cal.file} "
                      f"({cal.hardware}): {cal.applied}", highlight=False)
    measured = any(s.measurement for s in plan.stages)
    t = Table(title=f"plan {plan.run}")
    cols = ["stage", "input", "filters", "batch", "ckpt", "AMP", "params", "train GB", "val GB",
            "pred GB", "% budget"]
    cols += ["meas GB", "meas/pred", "tensors m/p"] if measured else []
    placed = any(s.placement for s in plan.stages)
    cols += ["GPU"] if placed else []
    for col in [*cols, "from"]:
        t.add_column(col, justify="right" if col not in ("stage", "from") else "left")
    for s in plan.stages:
        row = [s.name, _size(s.input_size_vox), str(s.base_filters), str(s.batch_size),
               "yes" if s.checkpointing else "no", "bf16" if s.amp else "no",
               f"{s.params / 1e6:.2f}M", _gb(s.train_gb), _gb(s.val_gb), f"{s.predicted_gb:.2f}",
               f"{100 * s.predicted_gb / (s.placement.mem_gb if s.placement else plan.budget_gb):.0f}%"]
        if measured:
            m = s.measurement or {}
            row += ([f"{m['peak_gb']:.2f}", f"{m['ratio']:.3f}", f"{m['tensor_ratio']:.3f}"]
                    if "peak_gb" in m else ["[red]failed[/]", "-", "-"])
        if placed:
            row.append(f"{s.placement.gpu_type} ({s.placement.mem_gb:g} GB)" if s.placement else "-")
        fresh = (f" [red]({len(s.fresh_tensors['tensors'])} tensors fresh)[/]"
                 if s.fresh_tensors else "")
        t.add_row(*row, (s.init_from or "-") + fresh)
    console.print(t)
    for s in plan.stages:
        console.print(f"  {s.name}: " + "; ".join(s.reasons), highlight=False)
    for s in plan.stages if measured else []:
        m = s.measurement or {}
        if "error" in m:
            console.print(f"  [red]{s.name}: verify failed[/]: {m['error']}", highlight=False)
    if measured:
        methods = sorted({s.measurement["method"] for s in plan.stages
                          if s.measurement and "method" in s.measurement})
        steps = max((s.measurement or {}).get("steps", 0) for s in plan.stages)
        console.print(f"measured: {'; '.join(methods)} ({steps} real steps per stage, each in a "
                      f"fresh process)", highlight=False)
        if cal and cal.recorded:
            console.print(f"calibration recorded in {cal.recorded.file}: later plans on "
                          f"this hardware apply measured/predicted", highlight=False)


def breakdown(console: Console, b: Any, predicted_gb: float) -> None:
    """`plan --explain`: the parts of a stage's predicted peak, adding up to it."""
    console.print(f"[bold]{b.stage}[/]: where the {predicted_gb:.2f} GB go (the peak: {b.peak_of})",
                  highlight=False)
    t = Table()
    t.add_column("part")
    t.add_column("GB", justify="right")
    t.add_column("share", justify="right")
    for part, gb in b.parts_gb.items():
        t.add_row(part, f"{gb:.3f}", f"{100 * gb / b.total_gb:.1f}%")
    t.add_row("[bold]total[/]", f"[bold]{b.total_gb:.3f}[/]", "100%")
    console.print(t)
    if b.other:
        console.print(f"  ({b.other})", highlight=False)
    if b.peak_of == "training step":
        console.print("  to trade: gradient checkpointing cuts the saved activations; a smaller batch "
                      "cuts activations and temporaries; a smaller input, all that grows with it",
                      highlight=False)


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _time_source(plan: Plan) -> str:
    if plan.cluster.time_min is not None:
        return f"{plan.cluster.time_min} min from the profile's time_min"
    if any(s.time_estimate_min for s in plan.stages):
        return "per stage from the --verify step times (the profile sets no time_min)"
    return (f"{DEFAULT_TIME_MIN} min by default (no time_min in the profile; `plan --verify` "
            "estimates it)")


def submitted(console: Console, plan: Plan, jobs: list[Any], executor: str, dry_run: bool) -> None:
    t = Table(title=f"{'dry run: ' if dry_run else ''}{plan.run} on {executor}")
    for col in ("stage", "job", "after", "time", "cpus", "mem GB", "gpus"):
        t.add_column(col)
    for j in jobs:
        p = j.parameters
        t.add_row(j.stage, j.job_id, j.depends_on or "-", f"{p['timeout_min']} min",
                  str(p["cpus_per_task"]), f"{p['mem_gb']:g}", str(p.get("gpus_per_node", 0)))
    console.print(t)
    if dry_run:  # where every resource of every job came from
        for j in jobs:
            console.print(f"  {j.stage}: {describe(stage_resources(plan, plan.stage(j.stage)))}",
                          highlight=False)
    if not dry_run:
        console.print(f"watch it: orchestrator status {plan.run} --runs-dir {plan.runs_dir}")


def status_table(doc: dict[str, Any], run: str | None) -> Table:
    if run is None:
        t = Table(title="runs")
        for col in ("run", "state", "executor", "stages done", "best Dice"):
            t.add_column(col)
        for r in doc["runs"]:
            done = sum(s["state"] == "COMPLETED" for s in r["stages"])
            dices = [s["best_dice"] for s in r["stages"] if isinstance(s["best_dice"], (int, float))]
            model = r.get("model") or {}
            best = f"{model['dice']:.3f} ({model['stage']})" if model else \
                (f"{max(dices):.3f}" if dices else "-")
            t.add_row(r["run"], r["state"], r["executor"] or "-", f"{done}/{len(r['stages'])}", best)
        return t
    r = doc["runs"][0]
    t = Table(title=f"{r['run']}: {r['state']}")
    gpus = any(s.get("gpu") for s in r["stages"])
    for col in ("stage", "job", "state", "SLURM", *(["GPU"] if gpus else []), "nodes", "attempts",
                "epoch", "start Dice", "best Dice", "peak GB", "elapsed", "ETA"):
        t.add_column(col)
    for s in r["stages"]:
        t.add_row(s["name"], str(s["job_id"] or "-"), s["state"], s["slurm_state"] or "-",
                  *([s.get("gpu") or "-"] if gpus else []), ",".join(s.get("nodes") or []) or "-",
                  f"{s['attempts']} ({s['requeues']} requeued)", f"{s['epoch']}/{s['max_epochs']}",
                  handoff_dice(s.get("handoff")), _stage_dice(s),
                  f"{s['peak_mem_gb']:.2f}" if s["peak_mem_gb"] else "-",
                  _duration(s.get("elapsed_s")), _duration(s.get("eta_s")))
    return t


def _stage_dice(s: dict[str, Any]) -> str:
    """The stage's best Dice; marked when it ended below the run's model it started from."""
    if not isinstance(s["best_dice"], (int, float)):
        return "-"
    return f"{s['best_dice']:.3f}" + (" [yellow]< run[/]" if s.get("below_run_model") else "")


def run_model_lines(r: dict[str, Any]) -> list[str]:
    """The run's model, and every stage that ended worse than the run it started from."""
    lines = []
    model = r.get("model")
    if model:
        lines.append(f"run model: {model['stage']} epoch {model['epoch']}, val Dice "
                     f"{model['dice']:.3f} ({model['path']})")
    for fold, m in sorted((r.get("fold_models") or {}).items()):
        if m:
            lines.append(f"fold{fold} model: {m['stage']} epoch {m['epoch']}, val Dice {m['dice']:.3f}")
    for s in r["stages"]:
        if s.get("below_run_model"):
            before = s["run_model_before"]
            lines.append(f"[yellow]{s['name']} ended below the run's model it started from[/]: "
                         f"best Dice {s['best_dice']:.3f} < {before['dice']:.3f} ({before['stage']} "
                         f"epoch {before['epoch']}); the run's model stays the better one")
    return lines


def handoff_dice(handoff: dict[str, Any] | None) -> str:
    """"0.612 (prev 0.690)": a stage's epoch-0 validation Dice after its hand-off, next to
    the previous stage's final one; "-" for a stage that did not start from a hand-off."""
    if not handoff or not isinstance(handoff.get("epoch0_dice"), (int, float)):
        return "-"
    prev = handoff.get("previous_final_dice")
    return f"{handoff['epoch0_dice']:.3f} (prev {prev:.3f})" if isinstance(prev, (int, float)) \
        else f"{handoff['epoch0_dice']:.3f}"


def _duration(seconds: float | None) -> str:
    """12s, 4m05s, 3h07m."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def status(console: Console, doc: dict[str, Any], run: str | None) -> None:
    if not doc["runs"]:
        console.print("no runs yet")
        return
    console.print(status_table(doc, run))
    if doc["slurm"] != "ok":
        console.print(f"SLURM: {doc['slurm']}")
    for r in doc["runs"] if run else []:
        for line in run_model_lines(r):
            console.print(line, highlight=False, soft_wrap=True)
        for stage, cv in r.get("cv", {}).items():  # a K-fold run: over the folds
            console.print(f"{stage}: best Dice {format_mean_std(cv['best_dice'])}, "
                          f"{cv['completed']}/{cv['folds']} folds complete", highlight=False)
        for s in r["stages"]:
            if s["state"] == "FAILED":
                console.print(f"[red]{s['name']} failed[/]: {s['error'] or 'no final.pt'} (log: {s['log']})")


def watch(console: Console, fetch: Callable[[], dict[str, Any]], run: str | None,
          every_s: float = 5.0) -> None:
    with Live(status_table(fetch(), run), console=console, refresh_per_second=1) as live:
        while True:
            time.sleep(every_s)
            live.update(status_table(fetch(), run))


@contextlib.contextmanager
def counter(console: Console, what: str, total: int) -> Iterator[Callable[[int, int], None]]:
    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(what, total=total or None)
        yield lambda done, total_now: bar.update(task, completed=done, total=total_now)


def figures(console: Console, doc: dict[str, Any]) -> None:
    t = Table(title=f"bench {doc['bench']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for name, value in doc["figures"].items():
        t.add_row(name, f"{value:.4g}" if isinstance(value, (int, float)) else str(value))
    console.print(t)
    console.print(f"machine: {doc['machine']}", highlight=False)


def metrics_table(console: Console, metrics: dict[str, dict[str, float]]) -> None:
    t = Table(title="evaluation")
    t.add_column("metric")
    for stat in ("mean", "median", "std", "min", "max"):
        t.add_column(stat, justify="right")
    for name, stats in metrics.items():
        keys = ("mean", "median", "std", "min", "max")
        t.add_row(name, *(f"{stats.get(k, float('nan')):.4g}" for k in keys))
    console.print(t)


def cv_table(console: Console, report: dict[str, Any]) -> None:
    """`evaluate --run` on a K-fold run: each fold's mean, and mean ± std over the folds."""
    folds = report["folds"]
    t = Table(title=f"{report['run']}: {len(folds)} folds, each on its own validation subjects")
    t.add_column("metric")
    for f in folds:
        t.add_column(f"fold {f['fold']}", justify="right")
    t.add_column("mean ± std", justify="right")
    for name, summary in report["summary"].items():
        spread = "-" if summary["mean"] is None else f"{summary['mean']:.4g} ± {summary['std']:.2g}"
        t.add_row(name, *(f"{f['metrics'][name]['mean']:.4g}" for f in folds), spread)
    console.print(t)


def check_table(console: Console, results: list[Any]) -> int:
    """Print one row per checked subject; returns how many failed."""
    t = Table(title="data check")
    t.add_column("subject")
    t.add_column("verdict")
    bad = 0
    for r in results:
        ok = getattr(r, "ok", False)
        bad += not ok
        t.add_row(str(getattr(r, "subject", r)), "ok" if ok else f"[red]{getattr(r, 'problem', '?')}[/]")
    console.print(t)
    return bad
