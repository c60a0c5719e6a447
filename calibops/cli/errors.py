"""The errors of ``calibops evaluate``: each is reported as one line without a traceback."""

from __future__ import annotations

__all__ = ["EvaluationError", "UsageError"]


class EvaluationError(Exception):
    """A problem with the data; reported as one line without a traceback, exit status 1."""


class UsageError(EvaluationError):
    """A problem with the command line; reported as one line without a traceback, exit status 2."""
