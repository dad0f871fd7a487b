"""The `orchestrator` Typer app: its consoles, logging, and every command's exit code.

Exit codes: 0 done; 2 bad input or a plan that cannot fit (one line on stderr);
1 an unexpected failure (with its traceback). Every command registered on these apps maps
`OrchestratorError` to its one line and code 2 itself (`exit_codes`), so an in-process
`CliRunner().invoke(app, ...)` sees what the console script shows.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from orchestrator.errors import OrchestratorError

Command = TypeVar("Command", bound=Callable[..., Any])

# Off a terminal (SLURM logs, pipes) rich would wrap tables at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def exit_codes(command: Command) -> Command:
    """`command`, with an `OrchestratorError` turned into one red line on stderr and exit 2.

    Any other exception keeps its traceback (exit 1).
    """
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OrchestratorError as exc:
            err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return cast(Command, run)


def reflowed(doc: str) -> str:
    """`doc` with each paragraph on one line (rich help keeps a paragraph's line breaks, and
    wraps the lines again at the terminal's width)."""
    return "\n\n".join(" ".join(para.split()) for para in inspect.cleandoc(doc).split("\n\n"))


def untyped_flags(params: list[Any]) -> list[Any]:
    """`params`, with each flag's type column left empty in the help: typer shows a flag
    (`--json`, `--help`) as `<bool>`, which reads as if it took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return untyped_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return untyped_flags(super().get_params(ctx))


class Commands(typer.Typer):
    """A Typer app whose every command goes through `exit_codes`, its docstring reflowed,
    its flags shown without a type."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=_Group, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Command], Command]:
        def decorator(command: Command) -> Command:
            options = {"cls": _Command, **kwargs}
            if options.get("help") is None and command.__doc__:
                options["help"] = reflowed(command.__doc__)
            super(Commands, self).command(*args, **options)(exit_codes(command))
            return command

        return decorator


app = Commands(help="Plan, submit and watch progressive 3D stroke-lesion training on SLURM.",
               no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = Commands(help="Synthetic data, validation and the preprocessed cache.",
                    no_args_is_help=True)
bench_app = Commands(help="Measure speed: print figures (record them in docs/benchmarks.md).",
                     no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def emit_json(doc: object) -> None:
    """One JSON document on stdout (`--json`), nothing else there."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def main() -> None:
    """Console entry point: usage errors are one line, exit 2 (a command's own errors are
    mapped by `exit_codes`)."""
    try:
        rc = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors (Typer's own copy of click's)
        if not exc.format_message():  # bare `orchestrator`: the help was printed
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"[red]error:[/] {exc.format_message()}{hint}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code if exc.exit_code != 1 else 2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
