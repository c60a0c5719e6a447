"""What CI can check of the CUDA backend without a GPU (tests/test_cuda_backend.py runs it on one).

1. Every csrc/cuda/*.cu compiles with ``nvcc -c`` for sm_80 and sm_90, with the flags torch's CUDAExtension
   adds (-D__CUDA_NO_HALF_OPERATORS__ etc.) and setup.py's nvcc flags (skipped when nvcc is not found).
2. The torch binding (csrc/cuda/*.cpp) passes a full ``-fsyntax-only`` compile against this torch's headers
   and the CUDA runtime headers. A CPU build of torch ships the c10/cuda headers but not the generated
   ``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stand-in is supplied. It cannot be linked here (no
   libc10_cuda), so symbol resolution waits for a CUDA build of torch.
3. The kernels' block programs (csrc/cuda/stats_kernels.cuh, the code the GPU runs) execute through the host
   emulation (csrc/cuda/host_emulation.cuh): under AddressSanitizer + UBSan over a sweep of shapes, dtypes,
   options and out-of-range labels (memory safety), and through ctypes against calibops.reference (values and
   gradients, every option, with the tolerances of tests/test_cuda_backend.py).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from .test_cuda_backend import (
    ACT,
    DENSE_DTYPES,
    INPUT_DTYPES,
    LABEL_DTYPES,
    check_grad,
    check_stats,
    edges_for,
    make_case,
    random_grads,
    reference_grad,
    reference_stats,
)

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
# The defines torch.utils.cpp_extension adds to every nvcc compile, and setup.py's own nvcc flags.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
# setup.py passes no -std; torch >= 2.10 adds -std=c++20 (the GPU machine runs 2.11), older torch c++17
SETUP_NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
H100_SMEM = 227 * 1024
A100_SMEM = 163 * 1024


def _cuda_include() -> str | None:
    if NVCC is None:
        return None
    real = Path(os.path.realpath(NVCC))
    for cand in (real.parent.parent / "include", Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"):
        if (cand / "cuda_runtime_api.h").exists():
            return str(cand)
    # nvcc may be a wrapper script: ask it where the toolkit is
    out = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            for tok in line.split('"'):
                if tok.startswith("-I") and (Path(tok[2:]) / "cuda_runtime_api.h").exists():
                    return tok[2:]
    return None


CUDA_INCLUDE = _cuda_include()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
needs_host = pytest.mark.skipif(
    CXX is None or CUDA_INCLUDE is None, reason="needs a host C++ compiler and the CUDA headers (cuda_fp16.h)"
)


def _run(cmd, cwd=None, timeout=300):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


def test_sources_exist_and_cu_files_include_no_torch():
    cu = sorted(CUDA_DIR.glob("*.cu"))
    assert cu, "no .cu file under csrc/cuda"
    assert sorted(CUDA_DIR.glob("*.cpp")), "no torch binding (.cpp) under csrc/cuda"
    for f in [*cu, *CUDA_DIR.glob("*.cuh")]:
        text = f.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/", '"torch/', '"ATen/'):
            assert banned not in text, f"{f.name} includes a torch header ({banned}); kernels must not"


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cu_compiles_with_nvcc(source, arch, tmp_path):
    cc = arch.split("_")[1]
    _run(
        [
            NVCC,
            "-c",
            str(CUDA_DIR / source),
            "-o",
            str(tmp_path / "k.o"),
            *SETUP_NVCC_FLAGS,
            *TORCH_NVCC_DEFINES,
            "-DCALIBOPS_WITH_CUDA",
            f"-gencode=arch=compute_{cc},code={arch}",
            "-Xcompiler",
            "-Wall",
            "-Werror",
            "all-warnings",
        ]
    )


@needs_host
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cpp")))
def test_binding_syntax(source, tmp_path):
    from torch.utils import cpp_extension

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    inc = []
    for d in [str(tmp_path / "stub"), *cpp_extension.include_paths(), CUDA_INCLUDE]:
        inc += ["-isystem", d]
    _run(
        [
            CXX,
            "-std=c++20",  # what torch 2.13's cpp_extension uses for the binding
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-DCALIBOPS_WITH_CUDA",
            *inc,
            str(CUDA_DIR / source),
        ]
    )


# --------------------------------------------------------------------------------------------------------------
# host emulation of the block programs
# --------------------------------------------------------------------------------------------------------------


@needs_host
def test_emulation_memory_safety_sweep(tmp_path):
    exe = tmp_path / "emu"
    _run(
        [
            CXX,
            "-std=c++17",
            "-O1",
            "-g",
            "-x",
            "c++",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-DCALIBOPS_EMU_MAIN",
            "-fno-strict-aliasing",
            "-Wall",
            "-Wno-pragma-once-outside-header",
            "-I",
            CUDA_INCLUDE,
            str(CUDA_DIR / "host_emulation.cuh"),
            "-o",
            str(exe),
        ]
    )
    res = _run([str(exe)], timeout=600)
    assert res.stdout.strip().startswith("ok"), res.stdout


KIND = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.uint8: 3,
    torch.bool: 3,
    torch.int8: 4,
    torch.int16: 5,
    torch.int32: 6,
    torch.int64: 7,
}


class Emu:
    """ctypes front end of csrc/cuda/host_emulation.cuh, with the kernel-op signatures."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        common = [P, I, P, I, P, L, L, L, L, I, I, I, I, L, I, L]
        lib.calibops_emu_forward.argtypes = [*common, P, P, P, P]
        lib.calibops_emu_forward.restype = ctypes.c_char_p
        lib.calibops_emu_backward.argtypes = [*common, P, P, P, P]
        lib.calibops_emu_backward.restype = ctypes.c_char_p
        lib.calibops_emu_plan.argtypes = [L, L, L, L, I, I, I, I, L, P]
        lib.calibops_emu_plan.restype = ctypes.c_char_p
        self.lib = lib

    @staticmethod
    def _common(x, t, edges, M, soft, act, labels, ignore_index, right, smem):
        B, C, N = x.shape
        return (
            x.data_ptr(),
            KIND[x.dtype],
            t.data_ptr(),
            KIND[t.dtype],
            edges.data_ptr(),
            B,
            C,
            N,
            M,
            int(soft),
            ACT[act],
            int(labels),
            int(ignore_index is not None),
            int(ignore_index or 0),
            int(right),
            smem,
        )

    def stats(self, x, t, M, soft, act, labels, ignore_index=None, right=False, smem=H100_SMEM):
        x, t = x.contiguous(), t.contiguous()
        edges = edges_for(M, soft).contiguous()
        B, C, _ = x.shape
        outs = [torch.full((B, C, M), float("nan")) for _ in range(3)]
        bad = torch.full((2,), -1, dtype=torch.int64)  # [bad labels, non-finite p]
        err = self.lib.calibops_emu_forward(
            *self._common(x, t, edges, M, soft, act, labels, ignore_index, right, smem),
            *(o.data_ptr() for o in outs),
            bad.data_ptr(),
        )
        if err:
            raise RuntimeError(err.decode())
        return (*outs, bad)

    def grad(self, x, t, grads, M, soft, act, labels, ignore_index=None, right=False, smem=H100_SMEM):
        x, t = x.contiguous(), t.contiguous()
        edges = edges_for(M, soft).contiguous()
        gc, gp, gy = (g.contiguous().float() for g in grads)
        out = torch.full_like(x, float("nan"))
        err = self.lib.calibops_emu_backward(
            *self._common(x, t, edges, M, soft, act, labels, ignore_index, right, smem),
            gc.data_ptr(),
            gp.data_ptr(),
            gy.data_ptr(),
            out.data_ptr(),
        )
        if err:
            raise RuntimeError(err.decode())
        return out

    def plan(self, B, C, N, M, soft=False, act="softmax", labels=True, backward=False, smem=H100_SMEM):
        out = (ctypes.c_int64 * 8)()
        err = self.lib.calibops_emu_plan(B, C, N, M, int(soft), ACT[act], int(labels), int(backward), smem, out)
        keys = ("threads", "tile", "tiles_per_block", "group", "slots", "slot_stride", "P", "smem_bytes")
        return dict(zip(keys, list(out))), (err.decode() if err else None)


def build_emulation_library(so: Path) -> None:
    """Compile the host emulation of the CUDA kernels (csrc/cuda/host_emulation.cuh) into the shared library ``so``."""
    _run(
        [
            CXX,
            "-std=c++17",
            "-O2",
            "-x",
            "c++",
            "-shared",
            "-fPIC",
            "-DCALIBOPS_EMU_LIB",
            "-fno-strict-aliasing",
            "-Wno-pragma-once-outside-header",
            "-I",
            CUDA_INCLUDE,
            str(CUDA_DIR / "host_emulation.cuh"),
            "-o",
            str(so),
        ]
    )


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if CXX is None or CUDA_INCLUDE is None:
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    so = tmp_path_factory.mktemp("emu") / "libcalibops_emu.so"
    build_emulation_library(so)
    return Emu(so)


def _check(
    emu,
    B,
    C,
    N,
    *,
    soft,
    act,
    labels,
    dtype=torch.float32,
    target_dtype=None,
    M=20,
    ignore_index=None,
    right=False,
    bad_labels=False,
    seed=0,
    smem=H100_SMEM,
):
    x, t = make_case(
        B,
        C,
        N,
        act=act,
        labels=labels,
        dtype=dtype,
        target_dtype=target_dtype,
        num_bins=M,
        ignore_index=ignore_index,
        bad_labels=bad_labels,
        seed=seed,
    )
    what = (
        f"B{B} C{C} N{N} M{M} soft={soft} act={act} labels={labels} {dtype} {t.dtype} ii={ignore_index} right={right}"
    )
    got = emu.stats(x, t, M, soft, act, labels, ignore_index, right, smem)
    check_stats(got, reference_stats(x, t, M, soft, act, labels, ignore_index, right), N, soft, what)
    grads = random_grads(B, C, M, seed=seed + 1)
    g = emu.grad(x, t, grads, M, soft, act, labels, ignore_index, right, smem)
    check_grad(g, reference_grad(x, t, grads, M, soft, act, labels, ignore_index, right), dtype, what)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("act", ["none", "softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("labels", [True, False])
def test_emulated_kernels_match_reference(emu, soft, act, dtype, labels):
    _check(
        emu,
        2,
        4,
        1500,
        soft=soft,
        act=act,
        labels=labels,
        dtype=dtype,
        ignore_index=2 if labels else None,
        right=(act == "sigmoid"),
        seed=3,
    )


@pytest.mark.parametrize("target_dtype", LABEL_DTYPES)
def test_emulated_label_dtypes_bad_and_ignored(emu, target_dtype):
    ii = 0 if target_dtype == torch.uint8 else -1
    _check(
        emu,
        2,
        3,
        1001,
        soft=False,
        act="softmax",
        labels=True,
        target_dtype=target_dtype,
        bad_labels=True,
        ignore_index=ii,
    )
    _check(emu, 1, 3, 700, soft=True, act="softmax", labels=True, target_dtype=target_dtype, bad_labels=True)


@pytest.mark.parametrize("target_dtype", DENSE_DTYPES)
@pytest.mark.parametrize("soft", [False, True])
def test_emulated_dense_target_dtypes(emu, target_dtype, soft):
    _check(emu, 1, 5, 777, soft=soft, act="sigmoid", labels=False, target_dtype=target_dtype)


@pytest.mark.parametrize(
    "B,C,N,M",
    [
        (1, 1, 1, 1),  # smallest
        (3, 2, 33, 1),  # one bin
        (1, 4, 16384 + 1, 20),  # two blocks per image, one voxel in the second
        (2, 16, 4099, 20),  # tile 256, 16 slots per class
        (1, 3, 20000, 7),  # G = 85 slots per class (not a power of two)
        (1, 130, 100, 5),  # tile 32, slot stride padded (130 -> 160)
        (1, 300, 65, 10),  # more slots than threads; backward grads from global memory (3*C*M*4 > 32 KiB)
        (2, 4, 1000, 200),  # many bins: G halved until the histograms fit (unpadded stride 16)
        (4, 2, 0, 5),  # no voxel at all
    ],
)
@pytest.mark.parametrize("soft", [False, True])
def test_emulated_odd_shapes(emu, B, C, N, M, soft):
    act = "softmax" if C > 1 else "sigmoid"
    _check(emu, B, C, N, soft=soft, act=act, labels=True, M=M, ignore_index=0 if C > 2 else None, seed=7)


def test_emulated_small_shared_memory(emu):
    # the A100's limit changes nothing here, a tight one forces a smaller G: same results either way
    _check(emu, 1, 4, 5000, soft=True, act="softmax", labels=True, smem=A100_SMEM, seed=4)
    plan, err = emu.plan(1, 4, 5000, 20, smem=A100_SMEM)
    assert err is None and plan["smem_bytes"] <= A100_SMEM


@pytest.mark.parametrize("right", [False, True])
def test_emulated_probabilities_exactly_on_edges(emu, right):
    from calibops.reference import bin_edges

    # several M: int(p * M) under- and over-estimates the bin of an edge value for some of them
    e = torch.cat([bin_edges(m) for m in (3, 7, 10, 13, 20)])
    p = torch.cat([e, torch.nextafter(e, e + 1), torch.nextafter(e, e - 1), torch.tensor([0.0, 1.0, 0.5])]).clamp(0, 1)
    x = torch.stack([p, 1 - p], 0).unsqueeze(0).contiguous()
    t = (torch.arange(p.numel()) % 2).unsqueeze(0)
    for M in (3, 7, 10, 13, 20):
        for soft in (False, True):
            got = emu.stats(x, t, M, soft, "none", True, None, right)
            ref = reference_stats(x, t, M, soft, "none", True, None, right)
            check_stats(got, ref, p.numel(), soft, f"edges M={M} right={right}")


def test_emulated_out_of_range_probabilities_stay_in_bounds(emu):
    # activation 0 with validation off: finite p outside [0, 1] lands in a bin, never outside; inf and NaN are left
    # out and counted in bad[1] with gradient 0 (the non-finite rule; every backend: tests/test_nonfinite.py)
    x = torch.tensor([[[-5.0, -0.0, 0.0, 1.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e30]]])
    t = torch.zeros(1, 9, dtype=torch.int64)
    for soft in (False, True):
        cnt, _, _, bad = emu.stats(x, t, 4, soft, "none", True)
        assert bad.tolist() == [0, 3] and float(cnt.sum()) == 6.0
        g = emu.grad(x, t, random_grads(1, 1, 4), 4, soft, "none", True)
        assert g.shape == x.shape and bool((g[0, 0, 5:8] == 0).all()) and bool(torch.isfinite(g).all())


def test_plan_layout_and_limits(emu):
    p, err = emu.plan(2, 4, 224 * 224 * 144, 20)
    assert err is None
    assert p["threads"] == 256 and p["tile"] == 1024 and p["group"] == 32 and p["slot_stride"] == 128
    # every histogram slot sums at most K*V/G float32 terms (the tolerance derivation relies on it)
    assert p["tiles_per_block"] * p["tile"] // p["group"] <= 256
    p16, err = emu.plan(2, 16, 176 * 176 * 64, 20)
    assert err is None and p16["tile"] == 256 and p16["group"] == 8
    assert p16["tiles_per_block"] * p16["tile"] // p16["group"] <= 256
    _, err = emu.plan(1, 2000, 100, 1000)
    assert err is not None and "num_bins" in err
