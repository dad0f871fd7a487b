"""Options that several commands share, declared once as `Annotated` types."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.config import DeviceName, ExecutorName

RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder holding the runs.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]
TargetMem = Annotated[str | None, typer.Option(
    "--target-mem", help="Memory budget per stage in GB (default: probed GPU or host RAM).")]
Device = Annotated[DeviceName, typer.Option(
    "--device", help="auto: the GPU where there is one; cuda without a GPU plans for one (login node).")]
OnDevice = Annotated[DeviceName, typer.Option(
    "--device", help="auto: the GPU where there is one, else the CPU.")]
Executor = Annotated[ExecutorName, typer.Option(
    "--executor", help="slurm: sbatch through submitit; local: processes on this machine; "
    "debug: in this process.")]
Curriculum = Annotated[Path, typer.Option("--curriculum", help="Curriculum YAML (order and hand-off).")]
Cluster = Annotated[str | None, typer.Option(
    "--cluster", help="Cluster profile: a name under envs/clusters/ or a YAML file. Default: local.")]
DataDir = Annotated[Path | None, typer.Option("--data", help="ATLAS-style data tree to train on.")]
RunName = Annotated[str | None, typer.Option("--run", help="Run name (default: run-<time>).")]
PlanPath = Annotated[Path | None, typer.Option("--plan", help="A plan.yaml from `plan`.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the jobs; submit nothing.")]
RunOption = Annotated[str | None, typer.Option(
    "--run", help="A run instead of --checkpoint: its best.pt; a K-fold run: every fold's model "
    "(evaluate: each on its validation subjects, mean ± std; predict: their ensemble).")]
