"""The app layer: the `orchestrator` command line (parse, call one function, render).

`app` is the Typer app and `main` the console entry point (`orchestrator.cli:main`,
`python -m orchestrator`). Each module below registers one group of commands on it:
pipeline (plan, submit, demo), stage (run-stage, run-chain), jobs (status, cancel,
resume, doctor), results (evaluate, predict, report), data (data ...), bench (bench ...).
Rendering is in render.py, the demo in demo.py, the benchmarks in bench/.
"""
from __future__ import annotations

from orchestrator.cli.app import app, main

# isort: off
# registering the commands, in the order `orchestrator --help` lists them
from orchestrator.cli import pipeline, stage, jobs, results, data, bench
# isort: on

__all__ = ["app", "main", "bench", "data", "jobs", "pipeline", "results", "stage"]
