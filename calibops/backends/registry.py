"""Which kernel backends this machine has, why the others are missing, and each backend's statistics op.

The availability rules of every backend (the compiled extension's CPU and CUDA kernels, Triton and its
interpreter) and the mapping from a backend name to its statistics function live here; *choosing* a backend
(``auto``, the environment override, the first-use self-check) is :mod:`calibops.backends.resolve`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

import torch

from ..contract import BACKENDS
from . import extension as _ops

__all__ = ["BACKENDS", "available_backends", "stats_function", "triton_interpret", "why_unavailable"]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERROR: list[str | None] = []  # filled on first use: [None] or [reason]


def _triton_import_error() -> str | None:
    """Why the Triton backend cannot be imported (None if it can); decided once, then a plain lookup."""
    if not _TRITON_ERROR:
        if torch.compiler.is_compiling():
            # importing cannot be traced; a first call outside torch.compile decides it for good
            mod = sys.modules.get("calibops.backends.triton")
            if mod is not None and callable(getattr(mod, "binned_stats", None)):
                return None
            return "calibops.backends.triton is not imported yet: call the loss once outside torch.compile first"
        if importlib.util.find_spec("triton") is None:
            err = "triton is not installed (pip install triton)"
        else:
            try:
                mod = importlib.import_module("calibops.backends.triton")
                err = None if callable(getattr(mod, "binned_stats", None)) else "calibops.backends.triton has no kernel"
            except Exception as exc:  # noqa: BLE001
                err = f"calibops.backends.triton failed to import: {type(exc).__name__}: {exc}"
        _TRITON_ERROR.append(err)
    return _TRITON_ERROR[0]


_NOT_BUILT = {
    "cpu": "calibops._C has no CPU kernels",
    "cuda": "calibops._C was built without CUDA kernels (torch without CUDA, or no nvcc at build time)",
}


def why_unavailable(name: str, device: torch.device | None) -> str | None:
    """None if backend ``name`` can run on ``device`` (None: on some device of this machine), else why not."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if not _ops.extension_loaded():
            return f"the compiled extension calibops._C is not loaded ({_ops.EXTENSION_ERROR})"
        if not (_ops.has_cpu_kernels() if name == "cpu" else _ops.has_cuda_kernels()):
            return _NOT_BUILT[name]
        if device is not None and device.type != name:
            return f"the {name} backend runs on {name.upper()} tensors, got a {device.type} tensor"
        if name == "cuda" and device is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        err = _triton_import_error()
        if err is not None:
            return err
        if device is not None and device.type == "cpu" and not triton_interpret():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"the triton backend runs on CUDA tensors, got a {device.type} tensor"
        if device is None and not (torch.cuda.is_available() or triton_interpret()):
            return "no CUDA device is available (and TRITON_INTERPRET is not set)"
        return None
    raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")


def available_backends() -> dict[str, str | None]:
    """Every backend name mapped to ``None`` if it can run on this machine, else the reason it cannot."""
    return {name: why_unavailable(name, None) for name in BACKENDS}


def stats_function(name: str) -> Callable:
    """The statistics forward (with autograd) of a resolved backend, kernel-contract signature."""
    if name == "reference":
        from ..reference import binned_stats_prepared

        return binned_stats_prepared
    fn = _KERNEL_FUNCTIONS.get(name)
    if fn is not None:
        return fn
    if name in ("cpu", "cuda"):
        fn = _ops.eager_autograd(torch.ops.calibops.binned_stats, torch.ops.calibops.binned_stats_backward)
    elif name == "triton":
        from . import triton as triton_backend

        fn = _ops.eager_autograd(triton_backend.binned_stats, triton_backend.binned_stats_backward)
    else:
        raise ValueError(f"unknown backend {name!r}")
    if not torch.compiler.is_compiling():
        _KERNEL_FUNCTIONS[name] = fn
    return fn


_KERNEL_FUNCTIONS: dict[str, Callable] = {}
