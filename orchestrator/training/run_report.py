"""A picture of a run (`orchestrator report RUN`): runs/<run>/report.png.

Three panels, from what the run left on disk:
- curves: validation Dice and training loss per epoch of every 3D stage, end to end on one
  epoch axis (loss on the right-hand scale), a dashed line at each hand-off, and the run's
  model (runs/<run>/best.pt) starred;
- memory: per stage, the plan's predicted peak against the peak the trainer measured
  (memory_usage.json: on a GPU `max_memory_allocated`, on a CPU the process's peak RSS);
- overlay: the run's model on a validation subject of its stage, on the axial slice with
  the most lesion: the truth's outline in green, the prediction's in red.

Matplotlib's Agg canvas is used directly (no pyplot, no display, no global backend).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.atomic import atomic_write
from orchestrator.config import Plan, load_plan
from orchestrator.data.sources import discover_subjects, load_subject
from orchestrator.planning.memory import SLIDING_WINDOW
from orchestrator.runs import state as run_state
from orchestrator.training.predict import load_inference_model
from orchestrator.training.run_model import RUN_MODEL_FILE
from orchestrator.training.validation import dice_score

REPORT_FILE = "report.png"


@dataclass
class RunReport:
    """The figure, its panels (matplotlib Axes by name) and the numbers drawn on them."""

    figure: Any
    axes: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _rows(stage_dir: Path) -> list[dict[str, float | None]]:
    path = stage_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: _num(r.get(k)) for k in ("epoch", "train_loss", "val_dice")}
                for r in csv.DictReader(fh)]


def _num(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def curves_data(plan: Plan) -> dict[str, Any]:
    """Every 3D stage's epochs on one axis: x = epochs trained before the stage + its epoch
    (an epoch-0 row, validation right after the hand-off, sits on the hand-off line)."""
    stages, offset = [], 0
    for sp in (s for s in plan.stages if s.kind == "seg3d"):
        rows = _rows(plan.run_dir / sp.name)
        if not rows:
            continue
        x = [offset + int(r["epoch"] or 0) for r in rows]
        stages.append({"name": sp.name, "start": offset, "init_from": sp.init_from,
                       "dice": [(xi, r["val_dice"]) for xi, r in zip(x, rows) if r["val_dice"] is not None],
                       "loss": [(xi, r["train_loss"]) for xi, r in zip(x, rows)
                                if r["train_loss"] is not None]})
        offset = max(x + [offset])
    return {"stages": stages, "handoffs": [s["start"] for s in stages[1:]]}


def memory_data(plan: Plan) -> list[dict[str, Any]]:
    """Per stage: predicted (plan) and measured (trainer) peak GB; None where not run."""
    out = []
    for sp in plan.stages:
        mem = plan.run_dir / sp.name / "memory_usage.json"
        peaks = []
        if mem.exists():
            peaks = [e.get("peak_reserved_gb") or e.get("peak_mem_gb")
                     for e in json.loads(mem.read_text()).get("epochs", [])]
        peaks = [p for p in peaks if isinstance(p, (int, float))]
        out.append({"name": sp.name, "predicted_gb": sp.predicted_gb,
                    "measured_gb": max(peaks) if peaks else None})
    return out


def overlay_data(plan: Plan, model_record: dict[str, Any], device: str) -> dict[str, Any] | None:
    """The run's model on its stage's first validation subject: the axial slice with the
    most true lesion (the most predicted where the truth has none)."""
    split = plan.run_dir / model_record["stage"] / "split.json"
    if plan.data_dir is None or not split.exists():
        return None
    wanted = json.loads(split.read_text()).get("val", [])
    recs = {f"{r.subject}/{r.session}": r for r in discover_subjects(Path(plan.data_dir))}
    found = [recs[v] for v in wanted if v in recs]
    if not found:
        return None
    vol = load_subject(found[0])
    # one pass at validation's overlap, as the Dice curves beside it were measured
    model = load_inference_model(plan.run_dir / RUN_MODEL_FILE, device, mirror_axes=(),
                                 overlap=SLIDING_WINDOW["overlap"])
    pred = model(vol)
    truth = vol.label if vol.label is not None else np.zeros_like(pred)
    area = truth.reshape(-1, truth.shape[2]).sum(0)
    z = int(np.argmax(area if area.any() else pred.reshape(-1, pred.shape[2]).sum(0)))
    return {"subject": f"{found[0].subject}/{found[0].session}", "z": z,
            "image": vol.image[:, :, z], "truth": truth[:, :, z], "pred": pred[:, :, z],
            "dice": dice_score(pred, truth)}


def build_report(run_dir: Path, device: str = "cpu") -> RunReport:
    """The report figure of the run at `run_dir` (nothing written).

    Raises:
        ConfigError: `run_dir` holds no valid plan.yaml.
        CheckpointError: the run's best.pt exists but cannot be loaded.
    """
    # deferred: matplotlib, only for the figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plan = load_plan(Path(run_dir) / "plan.yaml")
    model = run_state.read_state(plan.run_dir).get("model")
    fig = Figure(figsize=(13, 9), dpi=80)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(1.1, 1))
    axes = {"curves": fig.add_subplot(grid[0, :]), "memory": fig.add_subplot(grid[1, 0]),
            "overlay": fig.add_subplot(grid[1, 1])}
    curves = curves_data(plan)
    _draw_curves(axes["curves"], curves, model)
    memory = memory_data(plan)
    _draw_memory(axes["memory"], memory, plan.device)
    overlay = overlay_data(plan, model, device) if model else None
    _draw_overlay(axes["overlay"], overlay, model)
    fig.suptitle(f"run {plan.run}" + (f": model {model['stage']} epoch {model['epoch']}, "
                                      f"val Dice {model['dice']:.3f}" if model else ""))
    fig.tight_layout()
    data = {"curves": curves, "memory": memory, "model": model,
            "overlay": {k: v for k, v in (overlay or {}).items() if k in ("subject", "z", "dice")}}
    return RunReport(fig, axes, data)


def write_report(run_dir: Path, device: str = "cpu") -> RunReport:
    """Build the report and write it to runs/<run>/report.png (atomically)."""
    report = build_report(run_dir, device)
    buf = io.BytesIO()
    report.figure.savefig(buf, format="png")
    report.path = Path(run_dir) / REPORT_FILE
    atomic_write(report.path, lambda fh: fh.write(buf.getvalue()))
    return report


def _draw_curves(ax: Any, curves: dict[str, Any], model: dict[str, Any] | None) -> None:
    loss_ax = ax.twinx()
    for i, s in enumerate(curves["stages"]):
        colour = f"C{i}"
        if s["dice"]:
            ax.plot(*zip(*s["dice"]), "o-", color=colour, label=f"{s['name']} val Dice")
        if s["loss"]:
            loss_ax.plot(*zip(*s["loss"]), "--", color=colour, alpha=0.6, label=f"{s['name']} train loss")
    for x in curves["handoffs"]:
        ax.axvline(x, color="grey", linestyle=":", linewidth=1.5)
        ax.annotate("hand-off", (x, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="grey")
    starts = {s["name"]: s["start"] for s in curves["stages"]}
    if model and model["stage"] in starts:
        ax.plot([starts[model["stage"]] + model["epoch"]], [model["dice"]], "*", color="gold",
                markersize=16, markeredgecolor="black", label="run's model", zorder=5)
    ax.set_xlabel("epoch (all stages, end to end)")
    ax.set_ylabel("validation Dice")
    loss_ax.set_ylabel("training loss (dashed)")
    # a stage with deep supervision adds its heads' terms, ramped in after the hand-off: its
    # loss can rise while its Dice does (the demo's stage 4: 0.53 -> 0.84, Dice 0.79 -> 0.84)
    ax.set_title("validation Dice and each stage's training loss (with its deep-supervision "
                 "terms) per epoch; dotted lines: hand-offs")
    if curves["stages"]:
        # the Dice axes (and its legend) above the loss's twin, whose lines crossed the legend
        ax.set_zorder(loss_ax.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.legend(loc="best", fontsize=8, ncol=2, framealpha=0.9)


def _draw_memory(ax: Any, memory: list[dict[str, Any]], device: str) -> None:
    x = np.arange(len(memory))
    predicted = [m["predicted_gb"] for m in memory]
    measured = [m["measured_gb"] or 0.0 for m in memory]
    ax.bar(x - 0.2, predicted, 0.4, label="predicted (plan)", color="C0")
    ax.bar(x + 0.2, measured, 0.4, label="measured (training)", color="C1")
    ax.set_xticks(x, [m["name"] for m in memory], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("peak memory, GB")
    what = "peak RSS of the process" if device == "cpu" else "max_memory_reserved"
    ax.set_title(f"peak memory per stage: plan vs measured ({what})")
    ax.legend(fontsize=8)


def _draw_overlay(ax: Any, overlay: dict[str, Any] | None, model: dict[str, Any] | None) -> None:
    ax.set_axis_off()
    if overlay is None:
        ax.set_title("no run model yet" if not model else "no validation subject found")
        return
    image = overlay["image"]
    lo, hi = np.percentile(image, (1, 99))
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
    for mask, colour in ((overlay["truth"], "lime"), (overlay["pred"], "red")):
        sl = np.asarray(mask != 0, dtype=np.float32).T
        if 0 < sl.sum() < sl.size:  # contour() warns on constant planes
            ax.contour(sl, levels=[0.5], colors=colour, linewidths=1.2, origin="lower")
    ax.set_title(f"run's model on {overlay['subject']}, axial z={overlay['z']}: "
                 f"truth green, prediction red (Dice {overlay['dice']:.3f})", fontsize=9)
