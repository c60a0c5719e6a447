"""Optional dependencies: imported when a feature needs them, with one error that names the pip line."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, *, extra: str, what: str, package: str | None = None) -> ModuleType:
    """Import ``module`` (a dotted name) and return it, or raise an ImportError that says what needs it and how to
    install it: the calibops extra ``extra``, or the distribution ``package`` (default: the top-level name)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(
            f"{what} needs {top}, an optional dependency of calibops: "
            f"pip install 'calibops[{extra}]' (or pip install {package or top})"
        ) from exc
