"""Which backend runs, why, and the fallback rules. The only place that decides.

Rules (README "Backends"):
- ``"reference"``: pure PyTorch, autograd-native, any device; always available.
- ``"cpu"``: the fused C++ kernel (calibops._C), CPU tensors.
- ``"cuda"``: the fused CUDA C++ kernel (calibops._C built with CUDA), CUDA tensors.
- ``"triton"``: the Triton kernels, CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
- ``"auto"``: float64 tensor -> reference (float64 in, float64 out). CPU tensor -> cpu if built, else
  reference. CUDA tensor -> the first of cuda, triton that is available *and* known to be right on this GPU: its
  (backend, architecture) pair is in the record of
  ``calibops/backends/verified.json``, or the one-time self-check of :mod:`calibops.backends.selfcheck` passed for this
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

import os
import threading
import warnings

import torch

from . import selfcheck as _selfcheck
from .registry import BACKENDS, available_backends, stats_function, triton_interpret, why_unavailable

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_for",
    "resolve_backend",
    "stats_function",
    "triton_interpret",
    "why_unavailable",
]

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
    failed = []
    for name in candidates:
        if why_unavailable(name, device) is not None:
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
        warnings.warn(_selfcheck.failure_message(failed, name), _selfcheck.SelfCheckWarning, stacklevel=3)
    return name


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run for a tensor on ``device`` (of ``dtype``) when ``backend`` is requested.

    ``dtype`` matters to ``auto``: float64 input runs on the reference (computed and returned in float64, so
    ``gradcheck`` passes with default arguments; the kernels accumulate in float32), and on a GPU the
    self-check is per input dtype (None means float32)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        env = os.environ.get("CALIBOPS_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
        else:
            if dtype == torch.float64:
                return "reference"
            if device.type == "cuda":
                return _auto_gpu(device, dtype)
            if device.type == "cpu" and why_unavailable("cpu", device) is None:
                return "cpu"
            return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    why = why_unavailable(backend, device)
    if why is not None:
        raise RuntimeError(f"calibops backend {backend!r} is not available: {why}")
    return backend


def backend_for(tensor: torch.Tensor, backend: str = "auto") -> str:
    """The backend that ``backend`` (default auto) resolves to for ``tensor`` (its device and dtype)."""
    return resolve_backend(backend, tensor.device, tensor.dtype)
