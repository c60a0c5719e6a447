"""Which backend runs, why, and the fallback rules. The only place that decides.

Rules (docs/backends.md):
- ``"reference"``: pure PyTorch, autograd-native, any device; always available.
- ``"cpu"``: the fused C++ kernel (calibops._C), CPU tensors.
- ``"cuda"``: the fused CUDA C++ kernel (calibops._C built with CUDA), CUDA tensors.
- ``"triton"``: the Triton kernels, CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
- ``"auto"``: CPU tensor -> cpu if built, else reference. CUDA tensor -> the first of cuda, triton that is
  available *and* known to be right on this GPU: its (backend, architecture) pair is in the record of
  :mod:`calibops._verified`, or the one-time self-check of :mod:`calibops._selfcheck` passed for this
  (device, backend, input dtype); else reference. A failed self-check gives one ``SelfCheckWarning`` saying
  what disagreed. The decision is cached per (device, dtype): after the first call it is a dict lookup, no
  device synchronisation. While ``torch.compile`` traces (or a CUDA graph is captured) nothing is checked: a
  decision made by an earlier eager call is used, and without one the graph uses the reference (the safe
  choice; call the loss once eagerly on that device and dtype first to get the kernel in compiled graphs;
  dynamo guards on the decision, so a graph compiled before it is recompiled once it is made).
  The environment variable ``CALIBOPS_BACKEND`` overrides auto (and is then treated like an explicit
  request: no self-check). Auto never raises for a missing backend; an explicit request that cannot run
  raises ``RuntimeError`` with the reason, and an explicit request always runs what was asked.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable

import torch

from . import _ops

__all__ = ["BACKENDS", "available_backends", "backend_for", "resolve_backend", "stats_function"]

BACKENDS = ("reference", "cpu", "cuda", "triton")


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERROR: list[str | None] = []  # filled on first use: [None] or [reason]


def _triton_import_error() -> str | None:
    """Why the Triton backend cannot be imported (None if it can); decided once, then a plain lookup."""
    if not _TRITON_ERROR:
        if torch.compiler.is_compiling():
            # importing cannot be traced; a first call outside torch.compile decides it for good
            mod = sys.modules.get("calibops.triton")
            if mod is not None and callable(getattr(mod, "binned_stats", None)):
                return None
            return "calibops.triton is not imported yet: call the loss once outside torch.compile first"
        if importlib.util.find_spec("triton") is None:
            err = "triton is not installed (pip install triton)"
        else:
            try:
                mod = importlib.import_module("calibops.triton")
                err = None if callable(getattr(mod, "binned_stats", None)) else "calibops.triton has no kernel"
            except Exception as exc:  # noqa: BLE001
                err = f"calibops.triton failed to import: {type(exc).__name__}: {exc}"
        _TRITON_ERROR.append(err)
    return _TRITON_ERROR[0]


def _why_unavailable(name: str, device: torch.device | None) -> str | None:
    """None if backend ``name`` can run on ``device`` (None: on some device of this machine), else why not."""
    if name == "reference":
        return None
    if name == "cpu":
        if not _ops.extension_loaded():
            return f"the compiled extension calibops._C is not loaded ({_ops.EXTENSION_ERROR})"
        if not _ops.has_cpu_kernels():
            return "calibops._C has no CPU kernels"
        if device is not None and device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got a {device.type} tensor"
        return None
    if name == "cuda":
        if not _ops.extension_loaded():
            return f"the compiled extension calibops._C is not loaded ({_ops.EXTENSION_ERROR})"
        if not _ops.has_cuda_kernels():
            return "calibops._C was built without CUDA kernels (torch without CUDA, or no nvcc at build time)"
        if device is not None and device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        err = _triton_import_error()
        if err is not None:
            return err
        if device is not None and device.type == "cpu" and not _triton_interpret():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"the triton backend runs on CUDA tensors, got a {device.type} tensor"
        if device is None and not (torch.cuda.is_available() or _triton_interpret()):
            return "no CUDA device is available (and TRITON_INTERPRET is not set)"
        return None
    raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")


def available_backends() -> dict[str, str | None]:
    """Every backend name mapped to ``None`` if it can run on this machine, else the reason it cannot."""
    return {name: _why_unavailable(name, None) for name in BACKENDS}


GPU_CANDIDATES = ("cuda", "triton")  # auto's order on a CUDA tensor

# (device type, device index, kernel dtype) -> the backend auto runs there; filled by the first eager call
_AUTO_GPU: dict[tuple[str, int | None, torch.dtype], str] = {}


def _kernel_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a kernel reads: float16/bfloat16 as they are, everything else converted to float32."""
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return dtype
    return torch.float32


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _decide_gpu(
    device: torch.device, dtype: torch.dtype, arch: str | None = None, candidates: tuple[str, ...] = GPU_CANDIDATES
) -> tuple[str, list]:
    """Auto's choice for a GPU tensor (no cache): the first available candidate whose (backend, ``arch``) is in
    the record or whose self-check passes on ``device`` for ``dtype``, else reference; and the failed checks.
    ``arch`` defaults to the device's; tests pass a made-up one with a CPU device (Triton interpreter)."""
    from . import _selfcheck

    failed = []
    for name in candidates:
        if _why_unavailable(name, device) is not None:
            continue
        if arch is None:
            arch = _selfcheck.device_arch(device)
        if _selfcheck.is_verified(name, arch):
            return name, failed
        result = _selfcheck.check(name, device, dtype, arch=arch)
        if result.ok:
            return name, failed
        failed.append(result)
    return "reference", failed


_DECIDING = threading.Lock()  # one first-use decision at a time (threads driving several GPUs at once)


def _auto_gpu(
    device: torch.device,
    dtype: torch.dtype | None,
    arch: str | None = None,
    candidates: tuple[str, ...] = GPU_CANDIDATES,
) -> str:
    """Auto's choice for a GPU tensor, decided once per (device, dtype) and then a dict lookup.

    While torch.compile traces or a CUDA graph is captured nothing is run: an earlier eager decision is used,
    and without one the reference (not cached, so the next eager call decides). A failed self-check gives one
    ``SelfCheckWarning``, after the decision is stored (so ``-W error`` raises once, then auto falls back)."""
    key = (device.type, device.index, _kernel_dtype(dtype))
    name = _AUTO_GPU.get(key)
    if name is not None:
        return name
    if torch.compiler.is_compiling() or _capturing(device):
        return "reference"
    with _DECIDING:
        name = _AUTO_GPU.get(key)
        if name is not None:
            return name
        name, failed = _decide_gpu(device, key[2], arch, candidates)
        _AUTO_GPU[key] = name
    if failed:
        from . import _selfcheck

        warnings.warn(_selfcheck.failure_message(failed, name), _selfcheck.SelfCheckWarning, stacklevel=3)
    return name


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run for a tensor on ``device`` (of ``dtype``) when ``backend`` is requested.

    ``dtype`` matters only to ``auto`` on a GPU (the self-check is per input dtype; None means float32)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        env = os.environ.get("CALIBOPS_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
        else:
            if device.type == "cuda":
                return _auto_gpu(device, dtype)
            if device.type == "cpu" and _why_unavailable("cpu", device) is None:
                return "cpu"
            return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    why = _why_unavailable(backend, device)
    if why is not None:
        raise RuntimeError(f"calibops backend {backend!r} is not available: {why}")
    return backend


def backend_for(tensor: torch.Tensor, backend: str = "auto") -> str:
    """The backend that ``backend`` (default auto) resolves to for ``tensor`` (its device and dtype)."""
    return resolve_backend(backend, tensor.device, tensor.dtype)


def stats_function(name: str) -> Callable:
    """The statistics forward (with autograd) of a resolved backend, kernel-contract signature."""
    if name == "reference":
        from .reference import binned_stats_prepared

        return binned_stats_prepared
    if name in ("cpu", "cuda"):
        return torch.ops.calibops.binned_stats
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend.binned_stats
    raise ValueError(f"unknown backend {name!r}")
