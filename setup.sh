#!/usr/bin/env bash
# Set up .venv for the orchestrator: torch first (so nothing can pull a second build), then
# the project with its test extras. Idempotent: a second run only checks and reports.
#
#   TORCH_SPEC   pip requirement for torch (default: torch==2.13.0 without an NVIDIA GPU,
#                the CPU build on our machines; "torch" with one)
#   VENV         where to create the environment (default: .venv beside this script)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

say() { printf '[setup] %s\n' "$*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    default_torch="torch"; why="an NVIDIA GPU is visible"
else
    default_torch="torch==2.13.0"; why="no NVIDIA GPU is visible: CPU build"
fi
TORCH_SPEC=${TORCH_SPEC:-$default_torch}

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
else
    say "$VENV exists: reusing it"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

have_torch=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ -n "$have_torch" ] && "$VENV/bin/python" - "$TORCH_SPEC" <<'PYEOF'
import sys, torch
from importlib.metadata import version
spec = sys.argv[1]
want = spec.split("==", 1)[1] if "==" in spec else None
sys.exit(0 if want is None or version("torch").split("+")[0] == want else 1)
PYEOF
then
    say "torch $have_torch already installed (wanted: $TORCH_SPEC)"
else
    say "installing $TORCH_SPEC ($why)"
    pip install "$TORCH_SPEC"
fi

# Pin the installed torch while installing the rest, so no dependency can swap it out.
tv=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("torch"))')
pin=$(mktemp); trap 'rm -f "$pin"' EXIT
echo "torch==$tv" > "$pin"
say "installing the project and its dependencies (torch pinned at $tv)"
pip install -c "$pin" -e ".[test]"
pip check >/dev/null && say "pip check: consistent" || { say "pip check found conflicts:"; pip check || true; }
say "done: $("$VENV/bin/python" -c 'import torch, monai, submitit; print(f"torch {torch.__version__}, monai {monai.__version__}, submitit {submitit.__version__}")')"
say "next: $VENV/bin/orchestrator demo   |   $VENV/bin/python -m pytest"
