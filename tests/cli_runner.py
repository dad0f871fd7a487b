"""`orchestrator ARGS` in this process through typer's CliRunner: the exit code, stdout and
stderr the console script gives (every command maps its errors itself), without a new
interpreter's start-up."""
from __future__ import annotations

from typer.testing import CliRunner, Result

from orchestrator.cli import app


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)
