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

Checkpoint = Annotated[Path | None, typer.Option("--checkpoint", help="A stage's best.pt or final.pt.")]


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
             runs_dir: RunsDir = Path("runs")) -> None:
    """Whole-volume inference over a labelled dataset: report.json, subjects.csv, overlays."""
    _one_source(checkpoint, run)
    if checkpoint is not None and data is None:
        raise typer.BadParameter("--checkpoint needs --data DIR", param_hint="--data")
    # deferred: torch (CLI start-up); evaluation runs the model
    from orchestrator.training.crossval import evaluate_run
    from orchestrator.training.evaluate import evaluate_checkpoint

    with render.counter(err, "evaluating", 0) as tick:
        if run is not None:
            run_dir = run_plan_path(runs_dir, run).parent
            report = evaluate_run(run_dir, data, out_dir, device=device, progress=tick)
        else:
            assert checkpoint is not None and data is not None  # _one_source, --data: above
            report = evaluate_checkpoint(checkpoint, data, out_dir, device=device, progress=tick)
    if json_out:
        emit_json(report)
        return
    if "summary" in report:  # a K-fold run: each fold on its own validation subjects
        render.cv_table(out, report)
        out.print(f"report: {report['out_dir']}/cv_report.json")
        return
    render.metrics_table(out, report["metrics"])
    out.print(f"report: {report['out_dir']}/report.json")


@app.command()
def predict(input_path: Annotated[Path, typer.Option("--input", help="A T1w .nii.gz or a folder of them.")],
            checkpoint: Checkpoint = None,
            out_path: Annotated[Path | None, typer.Option(
                "--out", help="File (one input) or folder; default: beside the input.")] = None,
            device: OnDevice = "auto", run: RunOption = None, runs_dir: RunsDir = Path("runs")) -> None:
    """Write lesion masks (NIfTI, the input's affine and header) for new images."""
    _one_source(checkpoint, run)
    # deferred: torch (CLI start-up); prediction runs the model
    from orchestrator.training.crossval import run_model
    from orchestrator.training.predict import predict_paths

    model: Any = checkpoint
    if run is not None:
        model = run_model(run_plan_path(runs_dir, run).parent, device)
    for path in predict_paths(model, input_path, out_path, device=device):
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
