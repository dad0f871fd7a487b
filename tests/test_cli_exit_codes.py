"""Every command maps its own errors to exit codes: in this process (CliRunner), through the
console script and through `python -m orchestrator` a bad file is the same one line, exit 2."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import invoke
from conftest import REPO
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import ConfigError

HEAVY = ("torch", "monai", "matplotlib", "nibabel", "h5py", "scipy", "submitit", "tensorboard")


def _bad_curriculum(tmp_path: Path) -> Path:
    cur = tmp_path / "cur.yaml"
    cur.write_text(f"name: c\nstages:\n  - file: {REPO / 'tests' / 'data' / 'bad_stage.yaml'}\n")
    return cur


def test_a_bad_file_is_one_line_exit_2_in_process_and_from_both_entry_points(tmp_path: Path) -> None:
    args = ["plan", "--curriculum", str(_bad_curriculum(tmp_path)), "--device", "cpu",
            "--runs-dir", str(tmp_path / "runs")]
    here = invoke(*args)
    assert here.exit_code == 2, here.output
    (line,) = here.stderr.strip().splitlines()
    assert line.startswith("error: ") and "bad_stage.yaml: unknown key 'lr_rate'" in line
    assert here.stdout == ""
    script = shutil.which("orchestrator", path=str(Path(sys.executable).parent))
    assert script, "the console script is installed beside this interpreter (setup.sh)"
    for argv in ([script, *args], [sys.executable, "-m", "orchestrator", *args]):
        res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert (res.returncode, res.stdout, res.stderr.strip()) == (2, "", line), argv[0]
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_every_command_goes_through_the_exit_code_mapping() -> None:
    groups = [app, *(g.typer_instance for g in app.registered_groups if g.typer_instance)]
    commands = [c for g in groups for c in g.registered_commands]
    assert len(commands) >= 20
    unmapped = [c.name for c in commands if getattr(c.callback, "__wrapped__", None) is None]
    assert unmapped == []


def test_a_help_paragraph_flows_as_one_line_at_any_width() -> None:
    """Rich help keeps a docstring's line breaks inside a paragraph; `Commands` reflows them,
    so a wide terminal shows run-chain's second paragraph on one line, not cut at 88 columns."""
    groups = [app, *(g.typer_instance for g in app.registered_groups if g.typer_instance)]
    broken = [c.name for g in groups for c in g.registered_commands
              if c.help is None or any("\n" in para for para in c.help.split("\n\n"))]
    assert broken == []
    res = CliRunner().invoke(app, ["run-chain", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert any(line.strip().startswith("Each stage is a job step") and "max_requeues)" in line
               for line in res.stdout.splitlines()), res.stdout


def test_every_option_and_argument_says_what_it_is() -> None:
    import typer.main

    def undocumented(command, path: str) -> list[str]:
        subs = getattr(command, "commands", None)
        if subs is not None:
            return [m for name, sub in subs.items() for m in undocumented(sub, f"{path} {name}")]
        return [f"{path} {p.name}" for p in command.params
                if p.name != "help" and not (getattr(p, "help", None) or "").strip()]

    assert undocumented(typer.main.get_command(app), "orchestrator") == []


def test_a_flag_shows_no_type_and_an_option_shows_its_own() -> None:
    """typer would show `--json <bool>`, as if it took a value; in every help a flag has no
    type, and an option with a value keeps its type or choices."""
    for argv in (["--help"], ["status", "--help"], ["plan", "--help"], ["bench", "--help"],
                 ["data", "cache", "--help"]):
        res = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "<bool>" not in res.stdout, (argv, res.stdout)
    plan = CliRunner().invoke(app, ["plan", "--help"], env={"COLUMNS": "200"}).stdout
    assert any("--device" in line and "<auto|cuda|cpu>" in line for line in plan.splitlines())
    assert any(line.split()[1:2] == ["--verify"] and "<" not in line.split("Run each")[0]
               for line in plan.splitlines()), plan


def test_the_command_line_loads_without_the_heavy_dependencies() -> None:
    """`orchestrator --help` stays fast: the commands import torch & co. when they run."""
    code = ("import sys; from orchestrator.cli import app; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120, check=True)
    assert res.stdout.strip() == ""


def test_resume_uses_the_executor_the_run_was_submitted_with(tmp_path: Path) -> None:
    from orchestrator.cli.jobs import _submitted_with
    from orchestrator.runs.state import update_run

    assert _submitted_with(tmp_path) == "slurm"  # no state.json: as submitted by default
    for kind in ("local", "debug", "slurm"):
        update_run(tmp_path, executor=kind)
        assert _submitted_with(tmp_path) == kind
    update_run(tmp_path, executor="pbs")  # a hand-edited state: one line naming file and field
    with pytest.raises(ConfigError, match=r"state\.json: executor 'pbs'; expected slurm, local or debug"):
        _submitted_with(tmp_path)


def test_a_value_outside_a_choice_is_one_line_exit_2() -> None:
    for args in (["submit", "--executor", "pbs"], ["plan", "--device", "gpu"],
                 ["data", "synth", "--out", "x", "--anatomy", "brain"]):
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert f"'{args[-1]}' is not one of" in res.output, res.output
