"""The CUDA kernels' block programs run on the host, behind the v2 op signature (test code, no GPU needed).

``csrc/cuda/stats_kernels.cuh`` (the code the GPU runs) is compiled with the host C++ compiler together with
``host_emulation.h`` (an executor that runs every phase for thread 0 .. T-1 in turn, every block in turn, then the
same fixed-order reduction) into a shared library, built once per session and cached by content hash in the temp
folder. :func:`forward` / :func:`backward` take exactly the arguments of ``calibops::binned_stats`` /
``calibops::binned_stats_backward`` (docs/kernel_contract.md) on CPU tensors, check them with
``calibops.contract`` like every Python-side implementation, and return what the CUDA binding returns.

Needs a host C++ compiler and the CUDA headers (``cuda_fp16.h``, ``cuda_bf16.h``); :func:`why_unavailable` says
what is missing. Used by tests/test_cuda_compile.py and, as the ``cuda-emu`` backend, by the cross-backend tests.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from calibops.contract import TARGET_LABELS, Geometry, check_args, check_grads, empty_outputs

__all__ = [
    "CUDA_DIR",
    "CUDA_INCLUDE",
    "CXX",
    "EMU_DIR",
    "H100_SMEM",
    "A100_SMEM",
    "backward",
    "backward_image",
    "build_emulation_library",
    "forward",
    "forward_image",
    "plan",
    "unavailable_reason",
    "why_unavailable",
]

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = Path(__file__).resolve().parent
CXX = shutil.which("g++") or shutil.which("c++")
NVCC = shutil.which("nvcc")
H100_SMEM = 227 * 1024
A100_SMEM = 163 * 1024

#: ElemKind ids of csrc/contract_types.h.
KIND = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.uint8: 3,
    torch.int8: 4,
    torch.int16: 5,
    torch.int32: 6,
    torch.int64: 7,
    torch.bool: 8,
}


def _cuda_include() -> str | None:
    """The CUDA toolkit's include folder (cuda_fp16.h), from nvcc or CUDA_HOME."""
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    if NVCC is not None:
        cands.insert(0, Path(os.path.realpath(NVCC)).parent.parent / "include")
    for cand in cands:
        if (cand / "cuda_fp16.h").exists() and (cand / "cuda_runtime_api.h").exists():
            return str(cand)
    if NVCC is None:
        return None
    # nvcc may be a wrapper script: ask it where the toolkit is
    out = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            for tok in line.split('"'):
                if tok.startswith("-I") and (Path(tok[2:]) / "cuda_runtime_api.h").exists():
                    return tok[2:]
    return None


CUDA_INCLUDE = _cuda_include()


def why_unavailable() -> str | None:
    """None when the emulation can be built here, else what is missing."""
    if CXX is None or CUDA_INCLUDE is None:
        return "needs a host C++ compiler and the CUDA headers (cuda_fp16.h)"
    return None


#: Alias of :func:`why_unavailable` (both names are used by the cross-backend helpers).
unavailable_reason = why_unavailable


def _compile(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")


def host_compile_command(source: Path, out: Path, *extra: str) -> list[str]:
    """The host compiler line for an emulation source (emulation_lib.cpp, asan_sweep.cpp)."""
    if why_unavailable() is not None:
        raise RuntimeError(f"cuda emulation unavailable: {why_unavailable()}")
    return [
        str(CXX),
        "-std=c++17",
        "-fno-strict-aliasing",
        "-Wall",
        "-Wextra",
        *extra,
        "-I",
        str(CUDA_DIR),
        "-I",
        str(CUDA_INCLUDE),
        str(source),
        "-o",
        str(out),
    ]


def build_emulation_library(so: Path) -> None:
    """Compile the host emulation of the CUDA kernels (tests/cuda_emulation/emulation_lib.cpp) into ``so``."""
    _compile(host_compile_command(EMU_DIR / "emulation_lib.cpp", Path(so), "-O2", "-shared", "-fPIC"))


def _sources() -> list[Path]:
    return sorted(
        [*CUDA_DIR.glob("*.cuh"), ROOT / "csrc" / "contract_types.h", *EMU_DIR.glob("*.h"), *EMU_DIR.glob("*.cpp")]
    )


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    """The emulation library, built once per content of its sources (cached in the temp folder)."""
    why = why_unavailable()
    if why is not None:
        raise RuntimeError(f"cuda emulation unavailable: {why}")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _sources())).hexdigest()[:16]
    so = Path(tempfile.gettempdir()) / f"calibops_emu_v2_{digest}.so"
    if not so.exists():
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        build_emulation_library(tmp)
        tmp.replace(so)
    lib = ctypes.CDLL(str(so))
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    # input, input_kind, target, target_elem, edges, B, C, N, R, M, scheme, activation, target_kind, mode,
    # moments, has_ignore, ignore_index, right, smem_limit
    common = [P, I, P, I, P, L, L, L, L, L, I, I, I, I, I, I, L, I, L]
    lib.calibops_emu_forward.argtypes = [*common, P, P, P, P, P, P]
    lib.calibops_emu_backward.argtypes = [*common, P, P, P, P, P, P]
    lib.calibops_emu_forward_image.argtypes = [*common, L, P, P, P, P, P, P]
    lib.calibops_emu_backward_image.argtypes = [*common, L, P, P, P, P, P, P]
    lib.calibops_emu_plan.argtypes = [L, L, L, L, L, I, I, I, I, I, I, L, P]
    for f in ("forward", "backward", "forward_image", "backward_image", "plan"):
        getattr(lib, f"calibops_emu_{f}").restype = ctypes.c_char_p
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None and t.numel() > 0 else None


def _common(x, t, edges, g: Geometry, scheme, activation, target_kind, mode, moments, ignore_index, right, smem):
    return (
        x.data_ptr(),
        KIND[x.dtype],
        t.data_ptr(),
        KIND[t.dtype],
        edges.data_ptr(),
        g.B,
        g.C,
        g.N,
        g.R,
        g.M,
        int(scheme),
        int(activation),
        int(target_kind),
        int(mode),
        int(bool(moments)),
        int(ignore_index is not None),
        int(ignore_index or 0),
        int(bool(right)),
        int(smem),
    )


def _check_cpu(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"the cuda emulation runs on CPU tensors, got a tensor on {t.device}")


def _outputs(g: Geometry, moments: bool, fill: float) -> tuple[torch.Tensor, ...]:
    """The five float32 statistics of the contract's shapes (calibops/contract.py), filled with ``fill``."""
    like = torch.empty(0, dtype=torch.float32)
    return tuple(o.fill_(fill) for o in empty_outputs(like, g, moments)[:5])


def forward(
    input: torch.Tensor,
    target: torch.Tensor,
    edges: torch.Tensor,
    num_bins: int,
    scheme: int,
    activation: int,
    target_kind: int,
    mode: int,
    moments: bool,
    ignore_index: int | None,
    right: bool,
    *,
    smem_limit: int = H100_SMEM,
) -> tuple[torch.Tensor, ...]:
    """``calibops::binned_stats`` through the emulated CUDA kernels: ``(count, sum_p, sum_y, sum_p2, sum_py, bad)``.

    ``smem_limit``: the device's opt-in shared memory per block the launch plan is made for (H100 default).
    Raises ``RuntimeError`` with the plan's message where the CUDA backend refuses the problem.
    """
    g = check_args(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right)
    _check_cpu(input, target, edges)
    x, t, e = input.contiguous(), target.contiguous(), edges.contiguous()
    bad = torch.zeros(2, dtype=torch.int64)
    if g.B == 0 or g.N == 0 or g.C == 0:  # as the binding: zero statistics, nothing read, nothing bad
        return (*_outputs(g, moments, 0.0), bad)
    outs = _outputs(g, moments, float("nan"))  # every entry must be written
    bad.fill_(-1)
    err = _library().calibops_emu_forward(
        *_common(x, t, e, g, scheme, activation, target_kind, mode, moments, ignore_index, right, smem_limit),
        *(_ptr(o) for o in outs),
        bad.data_ptr(),
    )
    if err:
        raise RuntimeError(f"calibops (cuda emulation): {err.decode()}")
    return (*outs, bad)


def backward(
    grad_count: torch.Tensor,
    grad_sum_p: torch.Tensor,
    grad_sum_y: torch.Tensor,
    grad_sum_p2: torch.Tensor,
    grad_sum_py: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    edges: torch.Tensor,
    num_bins: int,
    scheme: int,
    activation: int,
    target_kind: int,
    mode: int,
    moments: bool,
    ignore_index: int | None,
    right: bool,
    *,
    smem_limit: int = H100_SMEM,
) -> torch.Tensor:
    """``calibops::binned_stats_backward`` through the emulated CUDA kernels: ``grad_input`` in input's dtype."""
    g = check_args(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right)
    check_grads(g, moments, grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py)
    _check_cpu(input, target, edges, grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py)
    x, t, e = input.contiguous(), target.contiguous(), edges.contiguous()
    if g.B == 0 or g.N == 0 or g.C == 0:
        return torch.zeros_like(x)
    grads = [v.contiguous() for v in (grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py)]
    out = torch.full_like(x, float("nan"))  # every entry must be written
    err = _library().calibops_emu_backward(
        *_common(x, t, e, g, scheme, activation, target_kind, mode, moments, ignore_index, right, smem_limit),
        *(_ptr(v) for v in grads),
        out.data_ptr(),
    )
    if err:
        raise RuntimeError(f"calibops (cuda emulation): {err.decode()}")
    return out


def forward_image(
    B: int, b: int, input: torch.Tensor, target: torch.Tensor, edges: torch.Tensor, *opts, smem_limit=H100_SMEM
) -> tuple[torch.Tensor, ...]:
    """Image ``b`` of a ``B``-image forward whose tensors (batch size 1) hold only that image: the kernels'
    offsets (``b*C*N``, ``b*R*N``, block ``b*P``, output ``b*K*M``) are computed for the full problem, so
    ``b*C*N > 2**31`` exercises the 64-bit offset arithmetic without allocating it. ``opts``: the op arguments
    after ``edges``. Returns the image's statistics with batch size 1."""
    num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right = opts
    g = check_args(input, target, edges, *opts)
    if g.B != 1 or not 0 <= b < B:
        raise ValueError("forward_image: input must hold one image and 0 <= b < B")
    x, t, e = input.contiguous(), target.contiguous(), edges.contiguous()
    full = Geometry(B, g.C, g.N, g.R, g.K, g.M)
    outs = _outputs(g, moments, float("nan"))
    bad = torch.full((2,), -1, dtype=torch.int64)
    err = _library().calibops_emu_forward_image(
        *_common(x, t, e, full, scheme, activation, target_kind, mode, moments, ignore_index, right, smem_limit),
        b,
        *(_ptr(o) for o in outs),
        bad.data_ptr(),
    )
    if err:
        raise RuntimeError(f"calibops (cuda emulation): {err.decode()}")
    return (*outs, bad)


def backward_image(
    B: int,
    b: int,
    grads: tuple[torch.Tensor, ...],
    input: torch.Tensor,
    target: torch.Tensor,
    edges,
    *opts,
    smem_limit=H100_SMEM,
) -> torch.Tensor:
    """Backward counterpart of :func:`forward_image` (``grads``: the five gradients of the one image)."""
    num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right = opts
    g = check_args(input, target, edges, *opts)
    check_grads(g, moments, *grads)
    x, t, e = input.contiguous(), target.contiguous(), edges.contiguous()
    full = Geometry(B, g.C, g.N, g.R, g.K, g.M)
    gs = [v.contiguous() for v in grads]
    out = torch.full_like(x, float("nan"))
    err = _library().calibops_emu_backward_image(
        *_common(x, t, e, full, scheme, activation, target_kind, mode, moments, ignore_index, right, smem_limit),
        b,
        *(_ptr(v) for v in gs),
        out.data_ptr(),
    )
    if err:
        raise RuntimeError(f"calibops (cuda emulation): {err.decode()}")
    return out


def plan(
    B: int,
    C: int,
    N: int,
    M: int,
    *,
    R: int = 1,
    scheme: int = 0,
    activation: int = 1,
    target_kind: int = TARGET_LABELS,
    mode: int = 0,
    moments: bool = False,
    backward: bool = False,
    smem_limit: int = H100_SMEM,
) -> tuple[dict[str, int], str | None]:
    """The CUDA launch plan (csrc/cuda/launchers.cuh::make_plan) of a problem, and its error message or None."""
    out = (ctypes.c_int64 * 9)()
    err = _library().calibops_emu_plan(
        B, C, N, R, M, scheme, activation, target_kind, mode, int(moments), int(backward), smem_limit, out
    )
    keys = ("threads", "tile", "tiles_per_block", "group", "slots", "slot_stride", "P", "smem_bytes", "nstat")
    return dict(zip(keys, list(out))), (err.decode() if err else None)
