"""The errors a user can cause or act on.

The command line catches `OrchestratorError` only: it prints the message as one line and
exits with code 2. Every message names what failed, where (file, field, job id, path) and
what was expected. Anything else is a bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error the command line turns into one line and exit code 2."""


class ConfigError(OrchestratorError, ValueError):
    """A YAML file or a command-line value is invalid (unknown key, bad value, missing file)."""


class DataError(OrchestratorError, ValueError):
    """A dataset file or tree is unusable (unreadable, mismatched shapes, no masks, ...)."""


class PlanError(OrchestratorError):
    """No configuration of a stage fits the memory budget, or a plan file is inconsistent."""


class SubmissionError(OrchestratorError):
    """A job could not be submitted, or a run's state does not allow the requested action."""


class CheckpointError(OrchestratorError):
    """A checkpoint is missing, truncated or does not match the model it should load into."""


class StageFailed(OrchestratorError):
    """Training cannot go on (the loss stays NaN, a data loader worker died, ...)."""


class PeerLost(StageFailed):
    """A DDP rank of the stage was lost (its node or its process), failed, or could not
    start; the line names the rank, its node and, where known, its log."""

    def __init__(self, line: str, lost: list[int] | None = None) -> None:
        super().__init__(line)
        self.lost = lost or []  # the ranks that went
