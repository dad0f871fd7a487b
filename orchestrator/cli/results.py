"""`evaluate`, `predict` and `report`: what a trained model does and how its run went."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli import render
from orchestrator.cli.app import app, emit_json, err, out
from orchestrator.cli.jobs import RunArg
from orchestrator.cli.options import Json, OnDevice, RunOption, RunsDir
from orchestrator.errors import ConfigError
from orchestrator.runs.status import run_plan_path

MIRROR_AXES = (0, 1, 2)  # training/validation.MIRROR_AXES, without importing torch at start-up

Checkpoint = Annotated[Path | None, typer.Option("--checkpoint", help="A stage's best.pt or final.pt.")]
Mirror = Annotated[bool, typer.Option(
    "--mirror/--no-mirror", help="Test-time mirroring as nnU-Net does it: the mean of 8 passes "
    "(each window flipped over every subset of X, Y, Z); --no-mirror: one pass, 8x faster.")]
Overlap = Annotated[float, typer.Option(
    "--overlap", min=0.0, max=0.95, help="Overlap of the sliding windows (Gaussian-weighted), a "
    "fraction in [0, 0.95]; nnU-Net's 0.5 by default (training validation uses 0.25).")]


def _one_source(checkpoint: Path | None, run: str | None) -> None:
    if (checkpoint is None) == (run is None):
        raise ConfigError("--checkpoint/--run: expected one of them (a checkpoint file, or a run "
                          "whose model, runs/RUN/best.pt, to use)")


@app.command()
def evaluate(checkpoint: Checkpoint = None,
             data: Annotated[Path | None, typer.Option(
                 "--data", help="Labelled data tree (or cache); with --run, default: the run's.")] = None,
             out_dir: Annotated[Path | None, typer.Option(
                 "--out", help="Default: the stage folder's eval/ (--run: runs/<run>/eval/).")] = None,
             device: OnDevice = "auto", json_out: Json = False, run: RunOption = None,
             runs_dir: RunsDir = Path("runs"), mirror: Mirror = True,
             overlap: Overlap = 0.5) -> None:
    """Whole-volume inference over a labelled dataset: report.json, subjects.csv, overlays.

    Each volume is also predicted in one plain pass and timed both ways: the report gives
    seconds per volume with and without mirroring, and Dice and lesion F1 of the plain
    pass, the mirrored one and (--run) after the run's post-processing, which is chosen on
    the run's validation subjects the first time and recorded in runs/RUN/postprocessing.json."""
    _one_source(checkpoint, run)
    if checkpoint is not None and data is None:
        raise typer.BadParameter("--checkpoint needs --data DIR", param_hint="--data")
    # deferred: torch (CLI start-up); evaluation runs the model
    from orchestrator.training.evaluate import evaluate_checkpoint
    from orchestrator.training.run_inference import evaluate_run

    axes = MIRROR_AXES if mirror else ()
    with render.counter(err, "evaluating", 0) as tick:
        if run is not None:
            run_dir = run_plan_path(runs_dir, run).parent
            report = evaluate_run(run_dir, data, out_dir, device=device, progress=tick,
                                  mirror_axes=axes, overlap=overlap)
        else:
            assert checkpoint is not None and data is not None  # _one_source, --data: above
            report = evaluate_checkpoint(checkpoint, data, out_dir, device=device, progress=tick,
                                         mirror_axes=axes, overlap=overlap)
    if json_out:
        emit_json(report)
        return
    if "summary" in report:  # a K-fold run: each fold on its own validation subjects
        render.cv_table(out, report)
        out.print(f"report: {report['out_dir']}/cv_report.json")
        return
    render.metrics_table(out, report["metrics"])
    for line in inference_lines(report["inference"]):
        out.print(line, highlight=False)
    out.print(f"report: {report['out_dir']}/report.json")


def inference_lines(inf: dict[str, Any]) -> list[str]:
    """What mirroring costs and gives, and the post-processing, from report.json's "inference"."""
    secs = inf["seconds_per_volume"]
    lines = [f"inference: mirror axes {inf['mirror_axes'] or 'none'}, overlap {inf['overlap']}; "
             + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s/volume" for k, v in secs.items() if v is not None)]
    for step in ("single_pass", "mirrored", "postprocessed"):
        if inf[step]["dice"] is not None:
            lines.append(f"  {step.replace('_', ' ')}: Dice {inf[step]['dice']:.4f}, "
                         f"lesion F1 {inf[step]['lesion_f1']:.4f}")
    lines.append(f"  post-processing: {inf['postprocessing']}")
    return lines


@app.command()
def predict(input_path: Annotated[Path, typer.Option("--input", help="A T1w .nii.gz or a folder of them.")],
            checkpoint: Checkpoint = None,
            out_path: Annotated[Path | None, typer.Option(
                "--out", help="File (one input) or folder; default: beside the input.")] = None,
            device: OnDevice = "auto", run: RunOption = None, runs_dir: RunsDir = Path("runs"),
            mirror: Mirror = True, overlap: Overlap = 0.5) -> None:
    """Write lesion masks (NIfTI, the input's affine and header) for new images.

    With --run, the run's post-processing (chosen on its validation subjects, recorded in
    runs/RUN/postprocessing.json) is applied to each mask."""
    _one_source(checkpoint, run)
    # deferred: torch (CLI start-up); prediction runs the model
    from orchestrator.training.predict import predict_paths
    from orchestrator.training.run_inference import run_model

    axes = MIRROR_AXES if mirror else ()
    model: Any = checkpoint
    if run is not None:
        model = run_model(run_plan_path(runs_dir, run).parent, device, axes, overlap)
    for path in predict_paths(model, input_path, out_path, device=device, mirror_axes=axes,
                              overlap=overlap):
        out.print(str(path))


@app.command()
def report(run: RunArg, runs_dir: RunsDir = Path("runs"),
           device: OnDevice = "auto", json_out: Json = False) -> None:
    """Write runs/RUN/report.png: Dice and loss by epoch, memory, the run's model on a slice.

    The picture: validation Dice and training loss across all stages with the hand-offs
    marked; predicted vs measured peak memory per stage; the run's model against the truth
    on a validation slice."""
    from orchestrator.training.run_report import write_report  # deferred: torch (CLI start-up)

    rep = write_report(run_plan_path(runs_dir, run).parent, device)
    if json_out:
        emit_json({"path": str(rep.path), "panels": sorted(rep.axes), **rep.data})
        return
    out.print(str(rep.path))
