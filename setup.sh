#!/usr/bin/env bash
# Set up .venv for the orchestrator: torch first (so nothing can pull a second build), then
# the project with its test extras. Idempotent: a second run only checks and reports.
#
#   TORCH_SPEC   pip requirement for torch (default: torch==2.13.0 without an NVIDIA GPU,
#                "torch" with one). Which build that is depends on where pip finds it: PyPI's
#                Linux wheel is a CUDA build (what a login node without a GPU should install
#                for the GPU nodes); a local wheel directory (pip's find-links) may hold the
#                CPU build. The last lines say which build was installed, from where.
#   VENV         where to create the environment (default: .venv beside this script)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

say() { printf '[setup] %s\n' "$*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpu=1; default_torch="torch"; why="an NVIDIA GPU is visible: the newest torch"
else
    gpu=0; default_torch="torch==2.13.0"; why="no NVIDIA GPU is visible: the tested version"
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
    report=$(mktemp)
    pip install --report "$report" "$TORCH_SPEC"
    # where pip took torch from: a file:// wheel (local disk) or an index URL
    torch_from=$("$VENV/bin/python" - "$report" <<'PYEOF'
import json, sys
items = json.load(open(sys.argv[1])).get("install", [])
urls = [i["download_info"]["url"] for i in items if i.get("metadata", {}).get("name") == "torch"]
from urllib.parse import unquote
print(unquote(urls[0]) if urls else "")
PYEOF
)
    rm -f "$report"
fi

# Pin the installed torch while installing the rest, so no dependency can swap it out.
tv=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("torch"))')
pin=$(mktemp); trap 'rm -f "$pin"' EXIT
echo "torch==$tv" > "$pin"
say "installing the project and its dependencies (torch pinned at $tv)"
pip install -c "$pin" -e ".[test]"
pip check >/dev/null && say "pip check: consistent" || { say "pip check found conflicts:"; pip check || true; }
# Which build is installed, and why that one, in words that are true anywhere.
build=$("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda or "")')
tv_full=${build%% *}; cuda=${build#* }
case "${torch_from:-}" in
    "") where="already in $VENV" ;;
    file://*) where="from local disk (${torch_from#file://}, pip's find-links or a file:// index)" ;;
    *) where="from ${torch_from%%/packages/*} (a package index)" ;;
esac
if [ -n "$cuda" ]; then
    say "torch $tv_full: a CUDA $cuda build, $where: jobs on GPU nodes can use the GPU" \
        "$([ "$gpu" = 0 ] && echo '(none is visible here: fine on a login node)')"
else
    say "torch $tv_full: a CPU-only build (torch.version.cuda is None), $where"
    if [ "$gpu" = 1 ]; then
        say "WARNING: an NVIDIA GPU is visible but this torch cannot use it: a plan for CUDA will" \
            "refuse to start; install a CUDA build (TORCH_SPEC with a CUDA wheel)"
    else
        say "no NVIDIA GPU here, so the CPU build serves; for a GPU cluster install a CUDA build" \
            "(PyPI's Linux wheel; \`orchestrator doctor --cluster NAME\` checks it)"
    fi
fi

say "done: $("$VENV/bin/python" -c 'import torch, monai, submitit; print(f"torch {torch.__version__}, monai {monai.__version__}, submitit {submitit.__version__}")')"
say "next: $VENV/bin/orchestrator demo   |   $VENV/bin/python -m pytest"
