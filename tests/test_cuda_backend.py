"""The CUDA C++ backend (calibops::binned_stats / _backward, CUDA dispatch key) against the reference and Triton.

Runs only where a CUDA device exists and calibops._C was built with the CUDA kernels (otherwise every test
here is skipped, and says why). The case builders and the tolerance checks at the top are also used by
tests/test_cuda_compile.py, which runs the very same block programs through the host emulation on machines
without a GPU.

Tolerances (float64 oracle = the reference, which sums in float64 and rounds once):
- statistics: the kernel sums float32 terms in float32 runs of at most K*V/G = 256 terms per histogram slot
  (plan in csrc/cuda/launchers.cuh), then in float64. A float32 run of n non-negative terms is within
  (n-1)·2^-24 ≤ 1.6e-5 of their sum, so ``STAT_RTOL = 2e-5`` relative to ``|stat| + count`` (a bound on the
  sum of the absolute terms: p, y, w ≤ 1). Soft memberships are computed in float32 ((c1 - p) / d, one
  rounding, ≤ 2 ulp of 1 each: at most ``8·eps32`` per voxel), and a probability that differs from torch's by
  a few ulps (the kernels' exp is not torch's; both ~1 ulp) moves a membership by M times that, with
  independent signs over voxels: atol ``8·eps32·(N + M·sqrt(N))``.
  Counts of hard bins are exact. Inputs are conditioned so that no float32 probability lies within 1e-5 of an
  inner bin edge: softmax/sigmoid differ from torch's by a few ulps (the device exp is not torch's), which must
  not move a voxel into another bin; a separate test puts probabilities exactly on the edges (activation 0,
  bit-exact on both sides) to pin the edge rule.
- gradients: computed in float32, rounded once to the input dtype: per element rtol ``GRAD_RTOL[dtype]``
  (float32 1e-5, a few ulps of the chain rule's terms; float16 2^-10, bfloat16 2^-7: one rounding of the
  output, doubled) plus atol 1e-5·max|grad|.
"""

from __future__ import annotations

import pytest
import torch

from calibops.reference import bin_centres, bin_edges, binned_stats_prepared

EPS32 = float(torch.finfo(torch.float32).eps)
STAT_RTOL = 2e-5
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ACT = {"none": 0, "softmax": 1, "sigmoid": 2}
EDGE_MARGIN = 1e-5

LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
DENSE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8]
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------------------------------
# case builders and checks (shared with tests/test_cuda_compile.py)
# --------------------------------------------------------------------------------------------------------------


def _probs64(x: torch.Tensor, act: str) -> torch.Tensor:
    x = x.double()
    if act == "softmax":
        return torch.softmax(x, 1)
    if act == "sigmoid":
        return torch.sigmoid(x)
    return x


def _near_edge(p: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[B, N] bool: some class of the voxel has p within EDGE_MARGIN of an inner hard edge e_1 .. e_{M-1} (the
    only places where the statistics jump; soft memberships are continuous in p)."""
    marks = bin_edges(num_bins).double()[1:-1]
    if marks.numel() == 0:
        return torch.zeros(p.shape[0], p.shape[2], dtype=torch.bool)
    d = (p.unsqueeze(-1) - marks).abs().amin(-1)  # [B, C, N]
    return (d < EDGE_MARGIN).any(1)


def make_case(
    B,
    C,
    N,
    *,
    act="softmax",
    labels=True,
    dtype=torch.float32,
    target_dtype=None,
    num_bins=20,
    ignore_index=None,
    bad_labels=False,
    seed=0,
    device="cpu",
):
    """A random kernel-layout problem: input [B, C, N] of ``dtype`` (logits, or probabilities for act "none"),
    target labels [B, N] or dense [B, C, N]; voxels whose probability lies within EDGE_MARGIN of a bin edge
    are redrawn (for act "none" probabilities are binned bit-identically on both sides, so no redraw)."""
    g = torch.Generator().manual_seed(seed)

    def draw(shape):
        z = torch.randn(*shape, generator=g) * 3
        if act == "none":
            z = torch.softmax(z, 1) if C > 1 else torch.rand(*shape, generator=g)
        return z.to(dtype)

    x = draw((B, C, N))
    if act != "none":
        for _ in range(50):
            near = _near_edge(_probs64(x.float(), act), num_bins)
            if not near.any():
                break
            x = torch.where(near.unsqueeze(1), draw((B, C, N)), x)
        else:
            raise AssertionError("could not draw logits away from the bin edges")
    if labels:
        lo, hi = (-3, C + 3) if bad_labels else (0, C)
        t = torch.randint(lo, hi, (B, N), generator=g)
        if ignore_index is not None:
            t[torch.rand(B, N, generator=g) < 0.2] = ignore_index
        td = target_dtype or torch.int64
        if td == torch.uint8:
            t = t.clamp(min=0) if not bad_labels else t % 256
        t = t.to(td)
    else:
        td = target_dtype or torch.float32
        if td in (torch.bool, torch.uint8):
            t = (torch.rand(B, C, N, generator=g) < 0.4).to(td)
        else:
            t = torch.rand(B, C, N, generator=g).to(td)
    return x.contiguous().to(device), t.contiguous().to(device)


def edges_for(num_bins: int, soft: bool, device="cpu") -> torch.Tensor:
    return (bin_centres(num_bins) if soft else bin_edges(num_bins)).to(device)


def reference_stats(x, t, num_bins, soft, act, labels, ignore_index=None, right=False):
    edges = edges_for(num_bins, soft, x.device)
    return binned_stats_prepared(x, t, edges, num_bins, soft, ACT[act], labels, ignore_index, right)


def reference_grad(x, t, grads, num_bins, soft, act, labels, ignore_index=None, right=False):
    """d/dx of sum(count*Gc + sum_p*Gp + sum_y*Gy) through the reference (autograd)."""
    xr = x.detach().clone().requires_grad_(True)
    cnt, sp, sy, _ = reference_stats(xr, t, num_bins, soft, act, labels, ignore_index, right)
    gc, gp, gy = grads
    loss = (cnt * gc).sum() + (sp * gp).sum() + (sy * gy).sum()
    if loss.requires_grad:
        loss.backward()
    return xr.grad if xr.grad is not None else torch.zeros_like(x)


def random_grads(B, C, M, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, C, M, generator=g) * s).to(device) for s in (0.5, 1.0, 0.7))


def check_stats(got, ref, N, soft, what=""):
    """Kernel statistics vs the float64-accumulating reference (tolerances: module docstring)."""
    cnt, sp, sy, bad = (v.detach().cpu() for v in got)
    rc, rsp, rsy, rbad = (v.detach().cpu() for v in ref)
    assert torch.equal(bad.reshape(-1), rbad.reshape(-1)), f"{what}: bad counts {bad.tolist()} != {rbad.tolist()}"
    assert cnt.shape == rc.shape and cnt.dtype == torch.float32
    if not soft:
        assert torch.equal(cnt, rc), f"{what}: hard counts differ (max {float((cnt - rc).abs().max())})"
    atol = 8 * EPS32 * (N + cnt.shape[-1] * N**0.5) if soft else 0.0
    for name, a, b in (("count", cnt, rc), ("sum_p", sp, rsp), ("sum_y", sy, rsy)):
        tol = STAT_RTOL * (b.abs() + rc.abs()) + atol + 1e-30
        err = (a.double() - b.double()).abs()
        worst = float((err / tol).max())
        assert worst <= 1.0, f"{what}: {name} off by {worst:.3g}x its tolerance (max abs err {float(err.max()):.3g})"


def check_grad(got, ref, dtype, what=""):
    got, ref = got.detach().cpu(), ref.detach().cpu()
    assert got.dtype == dtype and got.shape == ref.shape, f"{what}: {got.dtype} {got.shape} vs {dtype} {ref.shape}"
    ref32 = ref.float()
    if ref32.numel() == 0:
        return
    atol = 1e-5 * float(ref32.abs().max()) + 1e-30
    torch.testing.assert_close(got.float(), ref32, rtol=GRAD_RTOL[dtype], atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------------
# GPU tests (need a CUDA device and calibops._C built with the CUDA kernels)
# --------------------------------------------------------------------------------------------------------------


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from calibops import _ops

    if not _ops.has_cuda_kernels():
        return f"calibops._C has no CUDA kernels (extension error: {_ops.EXTENSION_ERROR})"
    return None


_SKIP = _cuda_skip_reason()
gpu = pytest.mark.skipif(_SKIP is not None, reason=f"cuda backend not available: {_SKIP}")
pytestmark = pytest.mark.gpu


def cuda_stats(x, t, num_bins, soft, act, labels, ignore_index=None, right=False):
    edges = edges_for(num_bins, soft, x.device)
    return torch.ops.calibops.binned_stats(x, t, edges, num_bins, soft, ACT[act], labels, ignore_index, right)


def cuda_grad(x, t, grads, num_bins, soft, act, labels, ignore_index=None, right=False):
    edges = edges_for(num_bins, soft, x.device)
    gc, gp, gy = (g.to(x.device).contiguous() for g in grads)
    return torch.ops.calibops.binned_stats_backward(
        gc, gp, gy, x, t, edges, num_bins, soft, ACT[act], labels, ignore_index, right
    )


def _run_case(
    B,
    C,
    N,
    *,
    soft,
    act,
    labels,
    dtype=torch.float32,
    target_dtype=None,
    num_bins=20,
    ignore_index=None,
    right=False,
    bad_labels=False,
    seed=0,
    triton_too=False,
):
    x, t = make_case(
        B,
        C,
        N,
        act=act,
        labels=labels,
        dtype=dtype,
        target_dtype=target_dtype,
        num_bins=num_bins,
        ignore_index=ignore_index,
        bad_labels=bad_labels,
        seed=seed,
        device="cuda",
    )
    what = f"B{B} C{C} N{N} M{num_bins} soft={soft} act={act} labels={labels} {dtype} {t.dtype} ii={ignore_index}"
    got = cuda_stats(x, t, num_bins, soft, act, labels, ignore_index, right)
    ref = reference_stats(x, t, num_bins, soft, act, labels, ignore_index, right)
    check_stats(got, ref, N, soft, what)
    grads = random_grads(B, C, num_bins, seed=seed + 1, device="cuda")
    g = cuda_grad(x, t, grads, num_bins, soft, act, labels, ignore_index, right)
    check_grad(g, reference_grad(x, t, grads, num_bins, soft, act, labels, ignore_index, right), dtype, what)
    if triton_too:
        from calibops._backends import _why_unavailable

        if _why_unavailable("triton", x.device) is None:
            import calibops.triton as tb

            edges = edges_for(num_bins, soft, x.device)
            tri = tb.binned_stats(x, t, edges, num_bins, soft, ACT[act], labels, ignore_index, right)
            # against the reference, like the cuda kernel: the budget bounds each kernel's distance from the
            # float64 reference, not the distance between two kernels (which can be twice that)
            check_stats(tri, ref, N, soft, what + " (triton)")
    return x, t


@gpu
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("act", ["none", "softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("labels", [True, False])
def test_options_grid(soft, act, dtype, labels):
    ii = 2 if labels else None
    _run_case(2, 4, 5000, soft=soft, act=act, labels=labels, dtype=dtype, ignore_index=ii, seed=3, triton_too=True)


@gpu
@pytest.mark.parametrize("target_dtype", LABEL_DTYPES)
def test_label_dtypes_and_bad_labels(target_dtype):
    _run_case(
        2,
        3,
        3001,
        soft=False,
        act="softmax",
        labels=True,
        target_dtype=target_dtype,
        bad_labels=True,
        ignore_index=-1 if target_dtype != torch.uint8 else 0,
    )


@gpu
@pytest.mark.parametrize("target_dtype", DENSE_DTYPES)
@pytest.mark.parametrize("soft", [False, True])
def test_dense_target_dtypes(target_dtype, soft):
    _run_case(1, 5, 2049, soft=soft, act="sigmoid", labels=False, target_dtype=target_dtype)


@gpu
@pytest.mark.parametrize(
    "B,C,N,M",
    [
        (1, 1, 1, 1),
        (3, 2, 33, 1),
        (1, 4, 16384 * 2 + 1, 20),
        (2, 16, 4099, 20),
        (1, 3, 70000, 7),
        (1, 130, 300, 5),
        (1, 300, 257, 10),
        (2, 4, 1000, 200),
        (4, 2, 0, 5),
    ],
)
@pytest.mark.parametrize("soft", [False, True])
def test_odd_shapes(B, C, N, M, soft):
    act = "softmax" if C > 1 else "sigmoid"
    _run_case(B, C, N, soft=soft, act=act, labels=True, num_bins=M, ignore_index=0 if C > 2 else None, seed=7)


@gpu
@pytest.mark.parametrize("right", [False, True])
def test_probabilities_exactly_on_edges(right):
    # several M: int(p * M) under- and over-estimates the bin of an edge value for some of them
    e = torch.cat([bin_edges(m) for m in (3, 7, 10, 13, 20)])
    p = torch.cat([e, torch.nextafter(e, e + 1), torch.nextafter(e, e - 1), torch.tensor([0.0, 1.0, 0.5])]).clamp(0, 1)
    x = torch.stack([p, 1 - p], 0).unsqueeze(0).contiguous().cuda()  # [1, 2, n]
    t = (torch.arange(p.numel()) % 2).unsqueeze(0).cuda()
    for M in (3, 7, 10, 13, 20):
        for soft in (False, True):
            got = cuda_stats(x, t, M, soft, "none", True, None, right)
            ref = reference_stats(x, t, M, soft, "none", True, None, right)
            check_stats(got, ref, p.numel(), soft, f"edges M={M} right={right}")


@gpu
@pytest.mark.parametrize("labels", [True, False])
def test_no_class_gives_empty_statistics(labels):
    # C = 0 at the op level: empty (B, 0, M) statistics, nothing bad, an empty gradient (docs/kernel_contract.md)
    x = torch.empty(2, 0, 50, device="cuda")
    t = torch.zeros(2, 50, dtype=torch.int64, device="cuda") if labels else torch.empty(2, 0, 50, device="cuda")
    for soft in (False, True):
        cnt, sp, sy, bad = cuda_stats(x, t, 20, soft, "softmax", labels)
        for v in (cnt, sp, sy):
            assert v.shape == (2, 0, 20) and v.dtype == torch.float32 and v.device.type == "cuda"
        assert bad.dtype == torch.int64 and not bool(bad.any())
        ref = reference_stats(x, t, 20, soft, "softmax", labels)
        assert bad.shape == ref[3].shape
        g = cuda_grad(x, t, random_grads(2, 0, 20, device="cuda"), 20, soft, "softmax", labels)
        assert g.shape == x.shape and g.dtype == x.dtype


@gpu
def test_deterministic_run_to_run():
    x, t = make_case(2, 4, 400_000, act="softmax", labels=True, seed=11, device="cuda")
    for soft in (False, True):
        a = cuda_stats(x, t, 20, soft, "softmax", True)
        b = cuda_stats(x, t, 20, soft, "softmax", True)
        for u, v in zip(a, b):
            assert torch.equal(u, v), "forward statistics differ between two identical runs"
        grads = random_grads(2, 4, 20, device="cuda")
        ga = cuda_grad(x, t, grads, 20, soft, "softmax", True)
        gb = cuda_grad(x, t, grads, 20, soft, "softmax", True)
        assert torch.equal(ga, gb), "gradients differ between two identical runs"


@gpu
def test_64bit_offsets():
    # [1, 2, N] with 2*N > 2^31: class 1 lives past 2^31 elements; compare with the two halves of N.
    N = (1 << 30) + 4099
    torch.manual_seed(0)
    x = torch.randn(1, 2, N, device="cuda", dtype=torch.float16)
    t = torch.randint(0, 2, (1, N), device="cuda", dtype=torch.uint8)
    full = cuda_stats(x, t, 20, False, "softmax", True)
    h = N // 2
    parts = [
        cuda_stats(x[:, :, s].contiguous(), t[:, s].contiguous(), 20, False, "softmax", True)
        for s in (slice(0, h), slice(h, N))
    ]
    # Statistics above 2^24 are not exact in float32. Each of full, parts[0], parts[1] is within STAT_RTOL of
    # its exact value (module docstring; their float32 runs split the voxels differently, so the errors do
    # not cancel), and adding the halves in float32 rounds once more: full and the sum of the halves agree
    # within 2 * STAT_RTOL + 2^-24, relative.
    for k in (0, 1, 2):
        torch.testing.assert_close(full[k], parts[0][k] + parts[1][k], rtol=2 * STAT_RTOL + EPS32 / 2, atol=0)
    assert torch.equal(full[3].reshape(-1), parts[0][3].reshape(-1) + parts[1][3].reshape(-1))
    grads = random_grads(1, 2, 20, device="cuda")
    g = cuda_grad(x, t, grads, 20, False, "softmax", True)
    tail = slice(N - 5000, N)
    gt = cuda_grad(x[:, :, tail].contiguous(), t[:, tail].contiguous(), grads, 20, False, "softmax", True)
    assert torch.equal(g[:, :, tail], gt), "gradient at the end of a >2^31-element tensor is wrong"
    del x, g, gt
    torch.cuda.empty_cache()


@gpu
def test_dispatch_and_public_api():
    import calibops
    import calibops.functional as F

    assert calibops.available_backends()["cuda"] is None
    x, t = make_case(2, 4, 3000, act="softmax", labels=True, seed=5, device="cuda")
    assert calibops.backend_for(x) == "cuda"
    logits = x.view(2, 4, 30, 100)
    labels = t.view(2, 1, 30, 100)
    for binning in ("hard", "soft"):
        outs = []
        for backend in ("cuda", "reference"):
            xx = logits.detach().clone().requires_grad_(True)
            loss = F.marginal_l1_ace(
                xx,
                labels,
                num_bins=20,
                binning=binning,
                softmax=True,
                to_onehot_y=True,
                reduction="none",
                backend=backend,
            )
            (loss * torch.linspace(0.5, 2.0, loss.numel(), device="cuda").view_as(loss)).sum().backward()
            outs.append((loss.detach(), xx.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-6)
        check_grad(outs[0][1], outs[1][1], torch.float32, f"functional {binning}")


@gpu
def test_opcheck():
    x, t = make_case(2, 3, 700, act="softmax", labels=True, seed=2, device="cuda")
    edges = edges_for(20, False, "cuda")
    torch.library.opcheck(
        torch.ops.calibops.binned_stats,
        (x, t, edges, 20, False, 1, True, None, False),
        test_utils=("test_schema", "test_faketensor"),
    )
    grads = random_grads(2, 3, 20, device="cuda")
    torch.library.opcheck(
        torch.ops.calibops.binned_stats_backward,
        (*grads, x, t, edges, 20, False, 1, True, None, False),
        test_utils=("test_schema", "test_faketensor"),
    )


@gpu
def test_bad_arguments_raise():
    x, t = make_case(1, 3, 100, device="cuda")
    edges = edges_for(20, False, "cuda")
    with pytest.raises(RuntimeError, match="edges must have"):
        torch.ops.calibops.binned_stats(x, t, edges, 19, False, 1, True, None, False)
    with pytest.raises(RuntimeError, match="label target must be"):
        torch.ops.calibops.binned_stats(x, t[:, :50], edges, 20, False, 1, True, None, False)
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.calibops.binned_stats(x, t, edges, 20, False, 5, True, None, False)
    with pytest.raises(RuntimeError, match="num_bins"):
        big = edges_for(4000, False, "cuda")
        torch.ops.calibops.binned_stats(x.repeat(1, 400, 1), t, big, 4000, False, 1, True, None, False)
