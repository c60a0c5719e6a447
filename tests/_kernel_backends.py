"""Every kernel backend this machine can run, behind the kernel-op signature, for the cross-backend tests
(tests/test_nonfinite.py, tests/test_properties.py).

- ``reference``: calibops.reference.binned_stats_prepared (backward through autograd): the definition.
- ``cpu``: the compiled C++ ops (calibops._C), when built.
- ``triton``: calibops::triton_binned_stats on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
  set by tests/conftest.py on machines without a GPU), or on the GPU.
- ``cuda-emu``: the CUDA kernels' block programs (csrc/cuda/stats_kernels.cuh) run on the host through
  csrc/cuda/host_emulation.cuh (tests/test_cuda_compile.py builds and checks it the same way); needs a host C++
  compiler and the CUDA headers. On a machine with a GPU and the CUDA build, ``cuda`` runs the real kernels.

``backends()`` returns those available here; ``reason_missing`` says why the others are not.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from calibops.reference import binned_stats_prepared

ACT_NAME = {0: "none", 1: "softmax", 2: "sigmoid"}


@dataclass(frozen=True)
class KernelBackend:
    """One backend's forward and backward with the kernel-op arguments (docs/kernel_contract.md), on CPU tensors
    in and out (``cuda`` moves them)."""

    name: str
    forward: Callable  # (x, t, edges, M, soft, act, labels, ignore_index, right) -> (count, sum_p, sum_y, bad)
    backward: Callable  # (gc, gp, gy, x, t, edges, M, soft, act, labels, ignore_index, right) -> grad_input
    slow: bool = False  # interpreted / emulated: keep its problems tiny


def reference_backward(gc, gp, gy, x, t, edges, M, soft, act, labels, ignore_index, right):
    """d/dx of sum(count*gc + sum_p*gp + sum_y*gy) through the reference (autograd), in x's dtype."""
    xr = x.detach().clone().requires_grad_(True)
    cnt, sp, sy, _ = binned_stats_prepared(xr, t, edges, M, soft, act, labels, ignore_index, right)
    loss = (cnt * gc).sum() + (sp * gp).sum() + (sy * gy).sum()
    if loss.requires_grad:
        loss.backward()
    return xr.grad if xr.grad is not None else torch.zeros_like(x)


reason_missing: dict[str, str] = {}


def _cpu() -> KernelBackend | None:
    from calibops import _ops

    if not _ops.has_cpu_kernels():
        reason_missing["cpu"] = f"calibops._C not built: {_ops.EXTENSION_ERROR}"
        return None
    return KernelBackend("cpu", torch.ops.calibops.binned_stats, torch.ops.calibops.binned_stats_backward)


def _triton() -> KernelBackend | None:
    try:
        tb = importlib.import_module("calibops.triton.binned_stats")  # the module (the package re-exports the op)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        reason_missing["triton"] = f"{type(exc).__name__}: {exc}"
        return None
    if tb.INTERPRETED == torch.cuda.is_available():
        reason_missing["triton"] = "triton imported without TRITON_INTERPRET=1 on a machine without a GPU"
        return None
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fwd, bwd = torch.ops.calibops.triton_binned_stats, torch.ops.calibops.triton_binned_stats_backward

    def forward(x, t, edges, *opts):
        return tuple(v.cpu() for v in fwd(x.to(dev), t.to(dev), edges.to(dev), *opts))

    def backward(gc, gp, gy, x, t, edges, *opts):
        g = [v.to(dev).contiguous() for v in (gc, gp, gy)]
        return bwd(*g, x.to(dev), t.to(dev), edges.to(dev), *opts).cpu()

    return KernelBackend("triton", forward, backward, slow=not torch.cuda.is_available())


def _cuda() -> KernelBackend | None:
    from calibops import _ops

    if not (torch.cuda.is_available() and _ops.has_cuda_kernels()):
        return None
    fwd, bwd = torch.ops.calibops.binned_stats, torch.ops.calibops.binned_stats_backward

    def forward(x, t, edges, *opts):
        return tuple(v.cpu() for v in fwd(x.cuda(), t.cuda(), edges.cuda(), *opts))

    def backward(gc, gp, gy, x, t, edges, *opts):
        g = [v.cuda().contiguous() for v in (gc, gp, gy)]
        return bwd(*g, x.cuda(), t.cuda(), edges.cuda(), *opts).cpu()

    return KernelBackend("cuda", forward, backward)


@functools.lru_cache(maxsize=1)
def _emulation_library() -> Path | None:
    from .test_cuda_compile import CUDA_DIR, CUDA_INCLUDE, CXX, build_emulation_library

    if CXX is None or CUDA_INCLUDE is None:
        reason_missing["cuda-emu"] = "needs a host C++ compiler and the CUDA headers (cuda_fp16.h)"
        return None
    sources = sorted(CUDA_DIR.glob("*.cuh"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    so = Path(tempfile.gettempdir()) / f"calibops_emu_{digest}.so"
    if not so.exists():
        tmp = so.with_suffix(f".{id(so)}.tmp")
        build_emulation_library(tmp)
        tmp.replace(so)
    return so


def _cuda_emu() -> KernelBackend | None:
    so = _emulation_library()
    if so is None:
        return None
    from .test_cuda_compile import Emu

    emu = Emu(so)

    def forward(x, t, edges, M, soft, act, labels, ignore_index, right):
        return emu.stats(x, t, M, soft, ACT_NAME[act], labels, ignore_index, right)

    def backward(gc, gp, gy, x, t, edges, M, soft, act, labels, ignore_index, right):
        return emu.grad(x, t, (gc, gp, gy), M, soft, ACT_NAME[act], labels, ignore_index, right)

    return KernelBackend("cuda-emu", forward, backward, slow=True)


@functools.lru_cache(maxsize=1)
def backends() -> tuple[KernelBackend, ...]:
    """The reference first, then every kernel backend available here."""
    found = [KernelBackend("reference", binned_stats_prepared, reference_backward)]
    for make in (_cpu, _triton, _cuda, _cuda_emu):
        b = make()
        if b is not None:
            found.append(b)
    return tuple(found)


def backend_names() -> list[str]:
    return [b.name for b in backends()]


def get(name: str) -> KernelBackend:
    for b in backends():
        if b.name == name:
            return b
    raise KeyError(name)
