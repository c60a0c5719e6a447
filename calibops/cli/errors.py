"""The errors of the command line (``calibops evaluate``, ``compare``, ``nnunet``): each is reported as one line
without a traceback."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["EvaluationError", "UsageError", "UsageParser"]


class EvaluationError(Exception):
    """A problem with the data; reported as one line without a traceback, exit status 1."""


class UsageError(EvaluationError):
    """A problem with the command line; reported as one line without a traceback, exit status 2."""


class UsageParser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`UsageError` (one line that names ``PROG --help``, exit status 2
    where the command reports it) instead of printing the usage and exiting; sub-parsers inherit this."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        raise UsageError(f"{message} (see {self.prog} --help)")
