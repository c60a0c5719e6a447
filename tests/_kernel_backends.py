"""Every kernel backend, behind the v2 kernel-op signature (docs/kernel_contract.md), on CPU tensors, for the
cross-backend tests (tests/test_conformance.py, tests/test_kinks.py, tests/test_nonfinite.py,
tests/test_properties.py).

    forward(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right)
      -> (count, sum_p, sum_y, sum_p2, sum_py, bad)
    backward(grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py, input, target, edges, num_bins, scheme,
             activation, target_kind, mode, moments, ignore_index, right) -> grad_input

- ``reference``: :func:`calibops.reference.binned_stats_prepared` (the definition); its backward is autograd of
  ``Σ count·Gc + sum_p·Gp + sum_y·Gy + sum_p2·Gp2 + sum_py·Gpy``.
- ``cpu``: the compiled C++ ops ``torch.ops.calibops.binned_stats`` / ``_backward`` (calibops._C), when built
  with the v2 schema.
- ``triton``: ``torch.ops.calibops.triton_binned_stats`` / ``_backward``, on CPU tensors through the Triton
  interpreter (TRITON_INTERPRET=1, set by tests/conftest.py on machines without a GPU), or on the GPU.
- ``cuda``: the compiled CUDA ops on a GPU (tensors moved there and back).
- ``cuda-emu``: the CUDA kernels' block programs run on the host (tests/cuda_emulation, built with the host C++
  compiler and the CUDA headers).

:func:`backends` returns those available here, each proven by one tiny call (so a stale v1 build is reported,
not run); :data:`reason_missing` says why each other one is not. Nothing is dropped silently:
tests/test_conformance.py parametrises over :data:`ALL_BACKENDS` and skips an unavailable one with its reason.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from calibops.reference import binned_stats_prepared

#: Every backend the tests know about, in report order.
ALL_BACKENDS = ("reference", "cpu", "triton", "cuda", "cuda-emu")


@dataclass(frozen=True)
class KernelBackend:
    """One backend's forward and backward with the v2 kernel-op arguments, CPU tensors in and out."""

    name: str
    forward: Callable[..., tuple[torch.Tensor, ...]]
    backward: Callable[..., torch.Tensor]
    slow: bool = False  # interpreted / emulated: keep its problems tiny


def reference_backward(
    gc: torch.Tensor,
    gp: torch.Tensor,
    gy: torch.Tensor,
    gp2: torch.Tensor,
    gpy: torch.Tensor,
    x: torch.Tensor,
    *opts: object,
) -> torch.Tensor:
    """d/dx of Σ(count·gc + sum_p·gp + sum_y·gy + sum_p2·gp2 + sum_py·gpy) through the reference, in x's dtype.

    ``opts`` are the forward's arguments after ``input``. Zero (not None) where no output depends on x.
    """
    xr = x.detach().clone().requires_grad_(True)
    outs = binned_stats_prepared(xr, *opts)
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs[:5], (gc, gp, gy, gp2, gpy)))
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
    return xr.grad if xr.grad is not None else torch.zeros_like(x)


reason_missing: dict[str, str] = {}


def _probe(forward: Callable, backward: Callable) -> None:
    """One tiny v2 call of each op (raises when the backend has another signature or is broken)."""
    x = torch.tensor([[[0.25], [0.75]]])
    t = torch.tensor([[[1]]])
    e = torch.linspace(0.0, 1.0 + float(torch.finfo(torch.float32).eps), 3)
    out = forward(x, t, e, 2, 0, 0, 0, 1, True, None, False)
    if len(out) != 6 or tuple(out[2].shape) != (1, 1, 1, 2):
        raise RuntimeError(f"forward returned {len(out)} outputs, sum_y {tuple(out[2].shape)}: not the v2 op")
    g = [torch.ones(1, 1, 2), torch.ones(1, 1, 2), torch.ones(1, 1, 1, 2), torch.ones(1, 1, 2), torch.ones(1, 1, 2)]
    gx = backward(*g, x, t, e, 2, 0, 0, 0, 1, True, None, False)
    if tuple(gx.shape) != (1, 2, 1):
        raise RuntimeError(f"backward returned shape {tuple(gx.shape)}")


def _checked(name: str, make: Callable[[], KernelBackend | None]) -> KernelBackend | None:
    try:
        be = make()
        if be is None:
            return None
        _probe(be.forward, be.backward)
        return be
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here", with its reason
        reason_missing[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None


def _on(device: torch.device, fwd: Callable, bwd: Callable) -> tuple[Callable, Callable]:
    """Wrap device ops to take and return CPU tensors."""

    def forward(x, t, edges, *opts):
        return tuple(v.cpu() for v in fwd(x.to(device), t.to(device), edges.to(device), *opts))

    def backward(gc, gp, gy, gp2, gpy, x, t, edges, *opts):
        g = [v.to(device).contiguous() for v in (gc, gp, gy, gp2, gpy)]
        return bwd(*g, x.to(device), t.to(device), edges.to(device), *opts).cpu()

    return forward, backward


def _cpu() -> KernelBackend | None:
    from calibops.backends import extension as _ops

    if not _ops.has_cpu_kernels():
        reason_missing["cpu"] = f"calibops._C not built: {_ops.EXTENSION_ERROR}"
        return None
    return KernelBackend("cpu", torch.ops.calibops.binned_stats, torch.ops.calibops.binned_stats_backward)


def _triton() -> KernelBackend | None:
    try:
        tb = importlib.import_module("calibops.backends.triton.binned_stats")  # the module (the package re-exports the op)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        reason_missing["triton"] = f"{type(exc).__name__}: {exc}"
        return None
    if getattr(tb, "INTERPRETED", None) == torch.cuda.is_available():
        reason_missing["triton"] = "triton imported without TRITON_INTERPRET=1 on a machine without a GPU"
        return None
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fwd, bwd = _on(dev, torch.ops.calibops.triton_binned_stats, torch.ops.calibops.triton_binned_stats_backward)
    return KernelBackend("triton", fwd, bwd, slow=not torch.cuda.is_available())


def _cuda() -> KernelBackend | None:
    from calibops.backends import extension as _ops

    if not torch.cuda.is_available():
        reason_missing["cuda"] = "no CUDA device on this machine"
        return None
    if not _ops.has_cuda_kernels():
        reason_missing["cuda"] = f"calibops._C built without the CUDA kernels: {_ops.EXTENSION_ERROR}"
        return None
    fwd, bwd = _on(torch.device("cuda"), torch.ops.calibops.binned_stats, torch.ops.calibops.binned_stats_backward)
    return KernelBackend("cuda", fwd, bwd)


def _cuda_emu() -> KernelBackend | None:
    try:
        emu = importlib.import_module(".cuda_emulation", __package__)
    except ModuleNotFoundError as exc:
        reason_missing["cuda-emu"] = f"tests/cuda_emulation (the v2 host emulation wrapper) not importable: {exc}"
        return None
    why = emu.why_unavailable()
    if why:
        reason_missing["cuda-emu"] = str(why)
        return None
    return KernelBackend("cuda-emu", emu.forward, emu.backward, slow=True)


@functools.lru_cache(maxsize=1)
def backends() -> tuple[KernelBackend, ...]:
    """The reference first, then every kernel backend available here (each proven by one tiny call)."""
    found = [KernelBackend("reference", binned_stats_prepared, reference_backward)]
    for name, make in (("cpu", _cpu), ("triton", _triton), ("cuda", _cuda), ("cuda-emu", _cuda_emu)):
        b = _checked(name, make)
        if b is not None:
            found.append(b)
    return tuple(found)


def backend_names() -> list[str]:
    """Names of the backends available here, the reference first."""
    return [b.name for b in backends()]


def kernel_names() -> list[str]:
    """Names of the kernel backends available here (every one but the reference)."""
    return [b.name for b in backends() if b.name != "reference"]


def get(name: str) -> KernelBackend:
    """The available backend ``name``; ``pytest.skip`` with the reason when it is not available here."""
    for b in backends():
        if b.name == name:
            return b
    import pytest

    pytest.skip(f"backend {name} unavailable: {reason_missing.get(name, 'unknown backend')}")
    raise AssertionError("unreachable")
