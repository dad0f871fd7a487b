"""Progressive training orchestrator for 3D stroke lesion segmentation on SLURM.

`from orchestrator import plan, submit, status` is the Python API (orchestrator/api.py),
loaded on first use so that `import orchestrator` stays light (no torch).
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["plan", "submit", "status"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        # deferred: pydantic and yaml (config), so that `import orchestrator` stays light
        from orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
