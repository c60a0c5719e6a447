"""What CI can check of the CUDA backend without a GPU (tests/test_cuda_backend.py runs it on one).

1. Every csrc/cuda/*.cu compiles with ``nvcc -c`` for sm_80 and sm_90, with the flags torch's CUDAExtension
   adds (-D__CUDA_NO_HALF_OPERATORS__ etc.) and setup.py's nvcc flags (skipped when nvcc is not found); for
   sm_90 ptxas reports every kernel variant's registers, and none may spill.
2. The torch binding (csrc/cuda/*.cpp) passes a full ``-fsyntax-only`` compile against this torch's headers
   and the CUDA runtime headers. A CPU build of torch ships the c10/cuda headers but not the generated
   ``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stand-in is supplied. It cannot be linked here (no
   libc10_cuda), so symbol resolution waits for a CUDA build of torch.
3. The kernels' block programs (csrc/cuda/stats_kernels.cuh, the code the GPU runs) execute through the host
   emulation (tests/cuda_emulation): under AddressSanitizer + UBSan over a sweep of shapes, dtypes, options,
   variants and out-of-range labels (memory safety), and against calibops.reference (values and gradients, with
   the tolerances of tests/test_cuda_backend.py) on what is CUDA-specific: every kernel variant (mode, R = 1 / 3,
   moments, scheme, activation, dtype), launch geometry and tile / block boundaries, the plan's limits, the
   determinism of the reduction and the 64-bit offsets past 2^31 elements. Cross-backend comparisons over every
   option: tests/test_conformance.py (the ``cuda-emu`` backend).
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from . import cuda_emulation as emu
from .test_cuda_backend import (
    DENSE_DTYPES,
    INPUT_DTYPES,
    LABEL_DTYPES,
    check_grad,
    check_stats,
    describe,
    make_case,
    op_args,
    random_grads,
    reference_grad,
    reference_stats,
)

CUDA_DIR = emu.CUDA_DIR
NVCC = emu.NVCC
CXX = emu.CXX
CUDA_INCLUDE = emu.CUDA_INCLUDE
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
H100_SMEM = emu.H100_SMEM
A100_SMEM = emu.A100_SMEM

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
needs_host = pytest.mark.skipif(emu.why_unavailable() is not None, reason=str(emu.why_unavailable()))


def _run(cmd, cwd=None, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


def test_sources_exist_and_cu_files_include_no_torch():
    cu = sorted(CUDA_DIR.glob("*.cu"))
    assert cu, "no .cu file under csrc/cuda"
    assert sorted(CUDA_DIR.glob("*.cpp")), "no torch binding (.cpp) under csrc/cuda"
    assert (CUDA_DIR / "schemes.cuh").exists(), "the binning schemes' membership functions live in schemes.cuh"
    assert not (CUDA_DIR / "host_emulation.cuh").exists(), "the host emulation is test code (tests/cuda_emulation)"
    kernel_side = [*cu, *CUDA_DIR.glob("*.cuh"), CUDA_DIR.parent / "contract_types.h"]
    for f in kernel_side:
        text = f.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/", '"torch/', '"ATen/', '/contract.h"'):
            assert banned not in text, f"{f.name} includes a torch header ({banned}); kernels must not"


def ptxas_resources(stderr: str) -> dict[str, dict[str, int]]:
    """Kernel (mangled name) -> registers / stack / spill bytes, from ``nvcc --resource-usage`` output."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            out[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
    return out


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cu_compiles_with_nvcc(source, arch, tmp_path):
    cc = arch.split("_")[1]
    res = _run(
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
            "--resource-usage",
            "-Xcompiler",
            "-Wall",
            "-Werror",
            "all-warnings",
        ]
    )
    if arch != "sm_90":
        return
    kernels = ptxas_resources(res.stdout + res.stderr)
    # 8 variants (mode x raters x moments) x 3 input dtypes, forward and backward, plus the reduction
    assert sum("forward_kernel" in k for k in kernels) == 24 and sum("backward_kernel" in k for k in kernels) == 24
    spilling = {k: v for k, v in kernels.items() if v.get("spill_stores", 0) or v.get("spill_loads", 0)}
    assert not spilling, f"kernel variants spill registers on sm_90: {spilling}"


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
    cmd = emu.host_compile_command(
        emu.EMU_DIR / "asan_sweep.cpp", exe, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"
    )
    _run(cmd)
    res = _run([str(exe)], timeout=900)
    assert res.stdout.strip().startswith("ok"), res.stdout


@pytest.fixture(scope="module")
def lib():
    why = emu.why_unavailable()
    if why is not None:
        pytest.skip(why)
    emu._library()  # build once (cached per source content)
    return emu


def _check(
    B,
    C,
    N,
    *,
    soft,
    act,
    labels,
    mode="marginal",
    moments=False,
    R=1,
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
        R=R,
        dtype=dtype,
        target_dtype=target_dtype,
        num_bins=M,
        ignore_index=ignore_index,
        bad_labels=bad_labels,
        seed=seed,
    )
    opts = op_args(M, soft, act, labels, mode, moments, ignore_index, right)
    what = describe(B, C, N, M, soft, act, labels, mode, moments, R, dtype, t, ignore_index, right)
    got = emu.forward(x, t, *opts, smem_limit=smem)
    ref = reference_stats(x, t, opts)
    check_stats(got, ref, N, soft, what)
    grads = random_grads(ref, seed=seed + 1)
    g = emu.backward(*grads, x, t, *opts, smem_limit=smem)
    check_grad(g, reference_grad(x, t, grads, opts), dtype, what)


@pytest.mark.parametrize("mode", ["marginal", "top_label"])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("moments", [False, True])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("act", ["none", "softmax", "sigmoid"])
def test_every_kernel_variant_matches_reference(lib, mode, R, moments, soft, act):
    _check(2, 4, 1500, soft=soft, act=act, labels=True, mode=mode, moments=moments, R=R, ignore_index=2, seed=3)


@pytest.mark.parametrize("dtype", INPUT_DTYPES[1:])
@pytest.mark.parametrize("act", ["none", "softmax", "sigmoid"])
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_half_input_dtypes(lib, dtype, act, mode):
    _check(1, 3, 1100, soft=act != "none", act=act, labels=True, mode=mode, moments=True, R=3, dtype=dtype, seed=5)


@pytest.mark.parametrize("target_dtype", LABEL_DTYPES)
def test_label_dtypes_bad_and_ignored(lib, target_dtype):
    ii = 0 if target_dtype == torch.uint8 else -1
    for R, mode in ((1, "marginal"), (3, "top_label")):
        _check(
            2,
            3,
            1001,
            soft=False,
            act="softmax",
            labels=True,
            R=R,
            mode=mode,
            target_dtype=target_dtype,
            bad_labels=True,
            ignore_index=ii,
        )
    _check(1, 3, 700, soft=True, act="softmax", labels=True, R=3, target_dtype=target_dtype, bad_labels=True)


@pytest.mark.parametrize("target_dtype", DENSE_DTYPES)
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_dense_target_dtypes(lib, target_dtype, mode):
    _check(1, 5, 777, soft=True, act="sigmoid", labels=False, mode=mode, moments=True, target_dtype=target_dtype)
    _check(1, 5, 777, soft=False, act="softmax", labels=False, mode=mode, target_dtype=target_dtype)


@pytest.mark.parametrize(
    "B,C,N,M",
    [
        (1, 1, 1, 1),  # smallest
        (3, 2, 33, 1),  # one bin
        (1, 4, 16384 + 1, 20),  # two blocks per image, one voxel in the second
        (2, 16, 4099, 20),  # tile 256, 16 slots per class
        (1, 3, 20000, 7),  # G = 85 slots per class (not a power of two)
        (1, 130, 100, 5),  # tile 32, slot stride padded (130 -> 160)
        (1, 300, 65, 10),  # more slots than threads; backward grads from global memory (> 32 KiB)
        (2, 4, 1000, 200),  # many bins: G halved until the histograms fit (unpadded stride 16)
        (4, 2, 0, 5),  # no voxel at all
    ],
)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("variant", ["v1", "top_label_R3_moments", "marginal_R3_moments"])
def test_launch_geometry_and_tile_boundaries(lib, B, C, N, M, soft, variant):
    act = "softmax" if C > 1 else "sigmoid"
    kw = {
        "v1": {},
        "top_label_R3_moments": {"mode": "top_label", "R": 3, "moments": True},
        "marginal_R3_moments": {"R": 3, "moments": True},
    }[variant]
    if C * N > 300_000 and variant != "v1":
        N = N // 4 + 1  # keep the emulated work small; still several tiles
    _check(B, C, N, soft=soft, act=act, labels=True, M=M, ignore_index=0 if C > 2 else None, seed=7, **kw)


def test_many_raters_shrink_the_tile(lib):
    # R * V <= 4096 label words per tile: R = 40 raters give V = 64 (several tiles per block), R = 3 keeps 1024
    p40, err = emu.plan(1, 4, 5000, 20, R=40)
    assert err is None and p40["tile"] == 64 and p40["nstat"] == 42
    p3, _ = emu.plan(1, 4, 5000, 20, R=3)
    assert p3["tile"] == 1024
    _check(1, 4, 700, soft=True, act="softmax", labels=True, R=40, ignore_index=1, moments=True, M=5, seed=9)


def test_small_shared_memory(lib):
    # the plan depends on the problem only (G from the 32 KiB histogram budget): the A100's limit gives the same
    # launch and results; a limit below the plan's need is refused with a message naming the remedy
    _check(1, 4, 5000, soft=True, act="softmax", labels=True, smem=A100_SMEM, seed=4)
    _check(1, 4, 3000, soft=True, act="softmax", labels=True, R=3, moments=True, smem=A100_SMEM, seed=4)
    plan, err = emu.plan(1, 4, 5000, 20, R=3, moments=True, smem_limit=A100_SMEM)
    assert err is None and plan["smem_bytes"] <= A100_SMEM
    _, err = emu.plan(1, 4, 5000, 20, R=3, moments=True, smem_limit=plan["smem_bytes"] - 4)
    assert err is not None and "triton or reference" in err


@pytest.mark.parametrize("right", [False, True])
def test_probabilities_exactly_on_edges_and_centres(lib, right):
    from calibops.reference import bin_centres, bin_edges

    # several M: int(p * M) under- and over-estimates the bin of an edge value for some of them; the soft
    # centres are the gradient kinks (the contract's side: t = k - 1 at q == c[k], t = k with right=True)
    marks = torch.cat([torch.cat([bin_edges(m), bin_centres(m)]) for m in (3, 7, 10, 13, 20)])
    p = torch.cat([marks, torch.nextafter(marks, marks + 1), torch.nextafter(marks, marks - 1)])
    p = torch.cat([p, torch.tensor([0.0, 1.0, 0.5])]).clamp(0, 1)
    x = torch.stack([p, 1 - p], 0).unsqueeze(0).contiguous()
    t = (torch.arange(p.numel()) % 2).view(1, 1, -1)
    for M in (3, 7, 10, 13, 20):
        for soft in (False, True):
            for mode in ("marginal", "top_label"):
                opts = op_args(M, soft, "none", True, mode, True, None, right)
                ref = reference_stats(x, t, opts)
                what = f"edges M={M} soft={soft} right={right} {mode}"
                check_stats(emu.forward(x, t, *opts), ref, p.numel(), soft, what)
                grads = random_grads(ref)
                check_grad(emu.backward(*grads, x, t, *opts), reference_grad(x, t, grads, opts), torch.float32, what)


def test_top_label_ties_take_the_lowest_class(lib):
    # exact float32 ties: the argmax is the lowest index (as torch.argmax); the gradient goes to that class only
    # classes (rows) x voxels (columns): voxel 0 p = (0.4, 0.4, 0.2), voxel 1 (0.3, 0.35, 0.35), voxel 2 (0.2, 0.5, 0.3)
    x = torch.tensor([[[0.4, 0.3, 0.2], [0.4, 0.35, 0.5], [0.2, 0.35, 0.3]]]).contiguous()  # [1, 3, 3]
    t = torch.tensor([[[0, 2, 1]]])  # voxel 0: argmax 0 (tie with 1) correct; voxel 1: argmax 1 wrong; voxel 2 correct
    opts = op_args(5, False, "none", True, "top_label", True)
    got, ref = emu.forward(x, t, *opts), reference_stats(x, t, opts)
    check_stats(got, ref, 3, False, "ties")
    assert float(got[2].sum()) == 2.0 and float(got[1].sum()) == float(x[0, :, 0].max() + 0.35 + 0.5)
    grads = random_grads(ref)
    g = emu.backward(*grads, x, t, *opts)
    check_grad(g, reference_grad(x, t, grads, opts), torch.float32, "ties")
    assert g[0, 1, 0] == 0 and g[0, 0, 0] != 0 and g[0, 2, 1] == 0 and g[0, 1, 1] != 0


def test_out_of_range_and_non_finite_probabilities(lib):
    # activation 0 with validation off: finite p outside [0, 1] lands in a bin, never outside; inf and NaN are left
    # out and counted in bad[1] with gradient 0 (top-label: the whole voxel is left out, every non-finite counted)
    v = [-5.0, -0.0, 0.0, 1.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e30]
    x = torch.tensor([[v, [0.5] * 9]])  # [1, 2, 9]
    t = torch.zeros(1, 1, 9, dtype=torch.int64)
    for soft in (False, True):
        for mode, kept in (("marginal", 6 + 9), ("top_label", 6)):
            opts = op_args(4, soft, "none", True, mode, True)
            got = emu.forward(x, t, *opts)
            assert got[5].tolist() == [0, 3] and float(got[0].sum()) == kept
            check_stats(got, reference_stats(x, t, opts), 9, soft, f"out of range {mode}")
            g = emu.backward(*random_grads(got), x, t, *opts)
            left_out = g[0, :, 5:8] if mode == "top_label" else g[0, 0, 5:8]  # marginal: class 1 (p = 0.5) is used
            assert g.shape == x.shape and bool((left_out == 0).all()) and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_empty_problems(lib, mode):
    for B, C, N in ((0, 3, 10), (2, 3, 0), (2, 0, 10)):
        x = torch.randn(B, C, N)
        t = torch.zeros(B, 2, N, dtype=torch.int64)
        opts = op_args(6, True, "softmax", True, mode, True)
        got, ref = emu.forward(x, t, *opts), reference_stats(x, t, opts)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and torch.equal(a, b.to(a.dtype)), f"B{B} C{C} N{N} {mode}"
        g = emu.backward(*random_grads(ref), x, t, *opts)
        assert g.shape == x.shape and not bool(g.any())


def test_reduction_is_deterministic_and_independent_of_block_order(lib):
    # run to run bitwise; and the per-image result does not depend on which other images share the launch
    x, t = make_case(3, 4, 40000, act="softmax", labels=True, R=3, seed=13)
    opts = op_args(20, True, "softmax", True, "marginal", True)
    a = emu.forward(x, t, *opts)
    b = emu.forward(x, t, *opts)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    one = emu.forward(x[2:].contiguous(), t[2:].contiguous(), *opts)
    for u, v in zip(a[:5], one[:5]):
        assert torch.equal(u[2:], v)
    grads = random_grads(a)
    assert torch.equal(emu.backward(*grads, x, t, *opts), emu.backward(*grads, x, t, *opts))


@pytest.mark.parametrize("mode,R", [("marginal", 1), ("top_label", 3), ("marginal", 3)])
def test_offsets_past_2_31_elements(lib, mode, R):
    # Image b of B = 2^20 images: b*C*N (input), b*R*N (labels), block b*P and the outputs' b*K*M exceed 2^31;
    # only image b's data exists (the emulation rebases the pointers), so a 32-bit offset anywhere would read or
    # write outside the buffers. Same data as image 0 of a one-image problem: bitwise equal results.
    B, C, N = 1 << 20, 4, 3000
    b = B - 1
    assert b * C * N > 2**31 and b * R * N > 2**31
    x, t = make_case(1, C, N, act="softmax", labels=True, R=R, ignore_index=0, seed=17)
    opts = op_args(20, True, "softmax", True, mode, True, ignore_index=0)
    alone = emu.forward(x, t, *opts)
    at_b = emu.forward_image(B, b, x, t, *opts)
    for u, v in zip(alone, at_b):
        assert torch.equal(u, v), f"image {b} of {B} differs from the same image alone"
    grads = random_grads(alone)
    g_alone = emu.backward(*grads, x, t, *opts)
    g_b = emu.backward_image(B, b, grads, x, t, *opts)
    assert torch.equal(g_alone, g_b)


def test_plan_layout_and_limits(lib):
    # v1 configurations (marginal, R = 1, no moments): the plan is unchanged (nstat = 3)
    p, err = emu.plan(2, 4, 224 * 224 * 144, 20)
    assert err is None and p["nstat"] == 3
    assert p["threads"] == 256 and p["tile"] == 1024 and p["group"] == 32 and p["slot_stride"] == 128
    p16, err = emu.plan(2, 16, 176 * 176 * 64, 20)
    assert err is None and p16["tile"] == 256 and p16["group"] == 8
    # top-label: one row of G slots; R = 3 raters and moments: 2 + R + 2 statistics, G halved to fit 32 KiB
    pt, err = emu.plan(2, 4, 224 * 224 * 144, 20, mode=1)
    assert err is None and pt["slots"] == pt["group"] == 128 and pt["nstat"] == 3
    pr, err = emu.plan(2, 4, 224 * 224 * 144, 20, R=3, moments=True)
    assert err is None and pr["nstat"] == 7 and pr["group"] == 8
    for q in (p, p16, pt, pr):
        # every histogram slot sums at most K*V/G float32 terms (the tolerance derivation relies on it)
        assert q["tiles_per_block"] * q["tile"] // q["group"] <= 256
        assert q["nstat"] * 20 * q["slot_stride"] * 4 <= 32 * 1024
    _, err = emu.plan(1, 2000, 100, 1000)
    assert err is not None and "num_bins" in err
