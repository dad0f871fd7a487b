"""The app layer: the `orchestrator` command line (parse, call one function, render).

`app` is the Typer app and `main` the console entry point (`orchestrator.cli:main`,
`python -m orchestrator`). Each module below registers one group of commands on it:
pipeline (plan, submit, demo), stage (run-stage, run-chain), jobs (status, cancel,
resume, doctor), results (evaluate, predict, report), data (data ...), bench (bench ...).
Rendering is in render.py, the demo in demo.py, the benchmarks in bench/.
"""
from __future__ import annotations

from orchestrator.cli import bench, data, jobs, pipeline, results, stage
from orchestrator.cli.app import app, main

__all__ = ["app", "main", "bench", "data", "jobs", "pipeline", "results", "stage"]
