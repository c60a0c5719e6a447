"""Which backend runs, why, and the fallback rules. The only place that decides.

Rules (README "Backends"):
- ``"reference"``: pure PyTorch, autograd-native, any device; always available.
- ``"cpu"``: the fused C++ kernel (calibops._C), CPU tensors.
- ``"cuda"``: the fused CUDA C++ kernel (calibops._C built with CUDA), CUDA tensors.
- ``"triton"``: the Triton kernels, CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
- ``"auto"``: float64 tensor -> reference (float64 in, float64 out). CPU tensor -> cpu if built, else
  reference. CUDA tensor -> decided per kernel *specialisation* (:class:`calibops.backends.selfcheck.Spec`:
  mode, binning, activation, target kind and dtype, one or several raters, moments, ``num_bins`` and the
  kernel regime it selects, the class chunking, input dtype, edge rule, ``ignore_index``): the first of cuda,
  triton that is available *and* known to be right there: its (backend, architecture) pair is in the record
  ``calibops/backends/verified.json``, or the self-check of that specialisation passed (a small synthetic
  problem of it, several tiles per image, with out-of-range labels and non-finite inputs, against the
  reference, forward and backward); else reference. A failed self-check gives one ``SelfCheckWarning`` saying
  what disagreed. The engine resolves in two steps: :func:`resolve_backend` (device and dtype: which layout
  to prepare; on a CUDA tensor the first available kernel) and, once the op arguments exist,
  :func:`resolve_call`, which looks the call's specialisation up in a dict (filled by the first call of each
  specialisation; afterwards no check and no device synchronisation). While ``torch.compile`` traces (or a
  CUDA graph is captured) nothing is checked: a decision made by an earlier eager call is used, and without
  one the graph uses the reference (the safe choice; call the loss once eagerly with the same options first
  to get the kernel in compiled graphs; dynamo guards on the decision, so a graph compiled before it is
  recompiled once it is made).
  The environment variable ``CALIBOPS_BACKEND`` overrides auto (and is then treated like an explicit
  request: no self-check). Auto never raises for a missing backend; an explicit request that cannot run
  raises ``RuntimeError`` with the reason, and an explicit request always runs what was asked.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from ..contract import TARGET_LABELS
from . import registry as _registry
from . import selfcheck as _selfcheck
from .registry import BACKENDS, available_backends, stats_function, triton_interpret, why_unavailable

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_for",
    "call_key",
    "resolve_backend",
    "resolve_call",
    "stats_function",
    "triton_interpret",
    "why_unavailable",
]

GPU_CANDIDATES = ("cuda", "triton")  # auto's order on a CUDA tensor
#: Device types on which ``auto`` chooses among :data:`GPU_CANDIDATES` per specialisation (tests add "cpu",
#: with stand-in candidates, to run the same decision on CPU tensors).
SELF_CHECKED_DEVICES: tuple[str, ...] = ("cuda",)

# the call key of resolve_call (device, dtypes, C, R or C, the op's scalar arguments) -> the backend auto runs;
# the hot path: one dict lookup. Filled from _AUTO_SPEC on the first call with each key.
_AUTO_GPU: dict[tuple, str] = {}
# (device type, device index, Spec) -> the backend auto runs for that specialisation (one self-check each)
_AUTO_SPEC: dict[tuple, str] = {}


def call_key(call: tuple) -> tuple:
    """The dict key of an op call (kernel-contract arguments): cheap to build, and it determines the call's
    :class:`~calibops.backends.selfcheck.Spec` (sizes other than C and R do not enter it)."""
    x, t = call[0], call[1]
    dev = x.device
    return (dev.type, dev.index, x.dtype, t.dtype, x.size(1), t.size(1), call[3:])


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _decide_gpu(
    device: torch.device,
    spec: _selfcheck.Spec,
    C: int,
    R: int,
    arch: str | None = None,
    candidates: tuple[str, ...] | None = None,
) -> tuple[str, list]:
    """Auto's choice for one specialisation on ``device`` (no cache): the first available candidate whose
    (backend, ``arch``) is in the record or whose self-check of ``spec`` passes, else reference; and the failed
    checks. ``arch`` defaults to the device's; tests pass a made-up one."""
    failed = []
    for name in GPU_CANDIDATES if candidates is None else candidates:
        if _registry.why_unavailable(name, device) is not None:
            continue
        if arch is None:
            arch = _selfcheck.device_arch(device)
        if _selfcheck.is_verified(name, arch):
            return name, failed
        result = _selfcheck.check_spec(name, device, spec, C, R, arch=arch)
        if result.ok:
            return name, failed
        failed.append(result)
    return "reference", failed


_DECIDING = threading.Lock()  # one first-use decision at a time (threads driving several GPUs at once)


def _auto_gpu(call: tuple, arch: str | None = None, candidates: tuple[str, ...] | None = None) -> str:
    """Auto's choice for an op call on a GPU tensor (kernel-contract arguments ``call``): decided once per
    specialisation, then a dict lookup on :func:`call_key`.

    While torch.compile traces or a CUDA graph is captured nothing is run: an earlier eager decision is used,
    and without one the reference (not cached, so the next eager call decides). A failed self-check gives one
    ``SelfCheckWarning``, after the decision is stored (so ``-W error`` raises once, then auto falls back)."""
    key = call_key(call)
    name = _AUTO_GPU.get(key)
    if name is not None:
        return name
    device = call[0].device
    if torch.compiler.is_compiling() or _capturing(device):
        return "reference"
    failed: list = []
    with _DECIDING:
        name = _AUTO_GPU.get(key)
        if name is not None:
            return name
        spec = _selfcheck.spec_of(*call)
        skey = (device.type, device.index, spec)
        name = _AUTO_SPEC.get(skey)
        if name is None:
            C = int(call[0].shape[1])
            R = int(call[1].shape[1]) if spec.target_kind == TARGET_LABELS else 1
            name, failed = _decide_gpu(device, spec, C, R, arch, candidates)
            _AUTO_SPEC[skey] = name
        _AUTO_GPU[key] = name
    if failed:
        warnings.warn(_selfcheck.failure_message(failed, name), _selfcheck.SelfCheckWarning, stacklevel=4)
    return name


_FIRST: dict[tuple[str, int | None], str] = {}  # (device type, index) -> _first_candidate's answer


def _first_candidate(device: torch.device) -> str:
    """The first GPU candidate available on ``device`` (auto's layout choice before the call is known)."""
    key = (device.type, device.index)
    name = _FIRST.get(key)
    if name is None:
        name = next((n for n in GPU_CANDIDATES if _registry.why_unavailable(n, device) is None), "reference")
        if not torch.compiler.is_compiling():
            _FIRST[key] = name
    return name


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run for a tensor on ``device`` (of ``dtype``) when ``backend`` is requested.

    ``dtype`` matters to ``auto``: float64 input runs on the reference (computed and returned in float64, so
    ``gradcheck`` passes with default arguments; the kernels accumulate in float32). On a CUDA tensor ``auto``
    answers the first available GPU kernel backend: the one a call uses unless its specialisation is neither
    recorded nor passes its first-use self-check (then the next one, or the reference); :func:`resolve_call`
    makes that decision per call."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        env = os.environ.get("CALIBOPS_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
        else:
            if dtype == torch.float64:
                return "reference"
            if device.type in SELF_CHECKED_DEVICES:
                return _first_candidate(device)
            if device.type == "cpu" and why_unavailable("cpu", device) is None:
                return "cpu"
            return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    why = why_unavailable(backend, device)
    if why is not None:
        raise RuntimeError(f"calibops backend {backend!r} is not available: {why}")
    return backend


def resolve_call(backend: str, name: str, call: tuple) -> str:
    """The backend that runs the op call ``call`` (kernel-contract arguments, prepared for ``name`` =
    ``resolve_backend(backend, device, dtype)``): ``name`` itself, except under ``auto`` on a GPU tensor,
    where it is auto's decision for the call's specialisation (a dict lookup after its first call)."""
    if backend != "auto" or name == "reference" or call[0].device.type not in SELF_CHECKED_DEVICES:
        return name
    env = os.environ.get("CALIBOPS_BACKEND", "").strip()
    if env and env != "auto":
        return name
    return _auto_gpu(call)


def backend_for(tensor: torch.Tensor, backend: str = "auto") -> str:
    """The backend that ``backend`` (default auto) resolves to for ``tensor`` (its device and dtype)."""
    return resolve_backend(backend, tensor.device, tensor.dtype)
