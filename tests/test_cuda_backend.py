"""The CUDA C++ backend (calibops::binned_stats / _backward, CUDA dispatch key) against the reference.

Runs only where a CUDA device exists and calibops._C was built with the CUDA kernels (otherwise every test
here is skipped, and says why; scripts/gpu_check.sh runs them on a GPU machine). The case builders and the
tolerance checks at the top are also used by tests/test_cuda_compile.py, which runs the very same block programs
through the host emulation (tests/cuda_emulation) on machines without a GPU. Cross-backend comparisons over every
option live in tests/test_conformance.py; this file keeps what is CUDA-specific.

Tolerances (float64 oracle = the reference, which sums in float64 and rounds once):
- statistics: the kernel sums float32 terms in float32 runs of at most K*V/G = 256 terms per histogram slot
  (plan in csrc/cuda/launchers.cuh), then in float64. A float32 run of n non-negative terms is within
  (n-1)·2^-24 ≤ 1.6e-5 of their sum, so ``STAT_RTOL = 2e-5`` relative to ``|stat| + count`` (a bound on the
  sum of the absolute terms: p, y, ȳ, w ≤ 1, so also w·p², w·p·ȳ ≤ w; each term itself carries one or two
  roundings, 2^-24 relative each, inside the same bound's slack). Soft memberships are computed in float32
  ((c1 - p) / d, one rounding, ≤ 2 ulp of 1 each: at most ``8·eps32`` per voxel), and a probability that differs
  from torch's by a few ulps (the kernels' exp is not torch's; both ~1 ulp) moves a membership by M times that,
  with independent signs over voxels: atol ``8·eps32·(N + M·sqrt(N))``. Counts of hard bins are exact.
  Inputs from logits are conditioned so that no float32 probability lies within 1e-5 of an inner bin edge or a
  soft centre, and the two largest probabilities of a voxel are 1e-5 apart (top-label ties): the fused
  softmax / sigmoid differ from torch's by a few ulps, which must not move an entry across a kink; separate tests
  put probabilities exactly on the edges and centres (activation 0, bit-exact on both sides) to pin the rules.
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
MODE = {"marginal": 0, "top_label": 1}
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


def _near_kink(p: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[B, N] bool: some class of the voxel has p within EDGE_MARGIN of an inner hard edge e_1 .. e_{M-1} or a soft
    centre (the kinks of the statistics and their gradients), or its two largest p are within EDGE_MARGIN (the
    top-label argmax switch)."""
    marks = torch.cat([bin_edges(num_bins).double()[1:-1], bin_centres(num_bins).double()])
    d = (p.unsqueeze(-1) - marks).abs().amin(-1)  # [B, C, N]
    near = (d < EDGE_MARGIN).any(1)
    if p.shape[1] > 1:
        top2 = p.topk(2, dim=1).values
        near |= (top2[:, 0] - top2[:, 1]) < EDGE_MARGIN
    return near


def make_case(
    B,
    C,
    N,
    *,
    act="softmax",
    labels=True,
    R=1,
    dtype=torch.float32,
    target_dtype=None,
    num_bins=20,
    ignore_index=None,
    bad_labels=False,
    seed=0,
    device="cpu",
):
    """A random kernel-layout problem: input [B, C, N] of ``dtype`` (logits, or probabilities for act "none"),
    target labels [B, R, N] or dense [B, C, N]; voxels whose probabilities lie within EDGE_MARGIN of a kink are
    redrawn (for act "none" probabilities are binned bit-identically on both sides, so no redraw)."""
    g = torch.Generator().manual_seed(seed)

    def draw(shape):
        z = torch.randn(*shape, generator=g) * 3
        if act == "none":
            z = torch.softmax(z, 1) if C > 1 else torch.rand(*shape, generator=g)
        return z.to(dtype)

    x = draw((B, C, N))
    if act != "none" and C > 0:
        for _ in range(50):
            near = _near_kink(_probs64(x.float(), act), num_bins)
            if not near.any():
                break
            x = torch.where(near.unsqueeze(1), draw((B, C, N)), x)
        else:
            raise AssertionError("could not draw logits away from the kinks")
    if labels:
        lo, hi = (-3, C + 3) if bad_labels else (0, max(C, 1))
        t = torch.randint(lo, hi, (B, R, N), generator=g)
        if ignore_index is not None:
            t[torch.rand(B, R, N, generator=g) < 0.1] = ignore_index
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


def op_args(num_bins, soft, act, labels, mode="marginal", moments=False, ignore_index=None, right=False, device="cpu"):
    """The v2 op arguments after (input, target): (edges, num_bins, scheme, activation, target_kind, mode, moments,
    ignore_index, right)."""
    return (
        edges_for(num_bins, soft, device),
        num_bins,
        int(soft),
        ACT[act],
        0 if labels else 1,
        MODE[mode],
        moments,
        ignore_index if labels else None,
        right,
    )


def reference_stats(x, t, opts):
    return binned_stats_prepared(x, t, *opts)


def reference_grad(x, t, grads, opts):
    """d/dx of sum(stat * grad) over the five statistics, through the reference (autograd)."""
    xr = x.detach().clone().requires_grad_(True)
    outs = reference_stats(xr, t, opts)
    loss = sum((o * g.to(o.device)).sum() for o, g in zip(outs[:5], grads) if o.numel() > 0)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
    return xr.grad if xr.grad is not None else torch.zeros_like(x)


def random_grads(stats, seed=1, device="cpu"):
    """float32 gradients of the shapes of the five statistics ``stats`` (grad_output != 1, mixed signs)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.randn(tuple(s.shape), generator=g) * sc).to(device)
        for s, sc in zip(stats[:5], (0.5, 1.0, 0.7, 0.3, 0.6))
    )


def check_stats(got, ref, N, soft, what=""):
    """Kernel statistics vs the float64-accumulating reference (tolerances: module docstring)."""
    got = [v.detach().cpu() for v in got]
    ref = [v.detach().cpu() for v in ref]
    assert len(got) == 6, f"{what}: {len(got)} outputs"
    bad, rbad = got[5], ref[5]
    assert torch.equal(bad.reshape(-1), rbad.reshape(-1)), f"{what}: bad counts {bad.tolist()} != {rbad.tolist()}"
    cnt, rc = got[0], ref[0]
    assert cnt.shape == rc.shape and cnt.dtype == torch.float32, f"{what}: count {cnt.shape} vs {rc.shape}"
    if not soft:
        assert torch.equal(cnt, rc), f"{what}: hard counts differ (max {float((cnt - rc).abs().max())})"
    atol = 8 * EPS32 * (N + cnt.shape[-1] * N**0.5) if soft else 0.0
    scale = rc.abs()
    for name, a, b in zip(("count", "sum_p", "sum_y", "sum_p2", "sum_py"), got[:5], ref[:5]):
        assert a.shape == b.shape and a.dtype == torch.float32, f"{what}: {name} {a.shape} vs {b.shape}"
        if b.numel() == 0:
            continue
        base = scale.unsqueeze(-2) if name == "sum_y" else scale  # sum_y [B, K, R, M]
        tol = STAT_RTOL * (b.abs() + base) + atol + 1e-30
        err = torch.where(a.double() == b.double(), 0.0, (a.double() - b.double()).abs())  # equal infinities: 0
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


def describe(B, C, N, M, soft, act, labels, mode, moments, R, dtype, t, ignore_index, right) -> str:
    return (
        f"B{B} C{C} N{N} M{M} R{R} soft={soft} act={act} labels={labels} mode={mode} moments={moments} {dtype} "
        f"{t.dtype} ii={ignore_index} right={right}"
    )


# --------------------------------------------------------------------------------------------------------------
# GPU tests (need a CUDA device and calibops._C built with the CUDA kernels)
# --------------------------------------------------------------------------------------------------------------


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from calibops.backends import extension as _ops

    if not _ops.has_cuda_kernels():
        return f"calibops._C has no CUDA kernels (extension error: {_ops.EXTENSION_ERROR})"
    return None


_SKIP = _cuda_skip_reason()
gpu = pytest.mark.skipif(_SKIP is not None, reason=f"cuda backend not available: {_SKIP}")
pytestmark = pytest.mark.gpu


def cuda_stats(x, t, opts):
    return torch.ops.calibops.binned_stats(x, t, *opts)


def cuda_grad(x, t, grads, opts):
    gs = [g.to(x.device).contiguous() for g in grads]
    return torch.ops.calibops.binned_stats_backward(*gs, x, t, *opts)


def _run_case(
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
    num_bins=20,
    ignore_index=None,
    right=False,
    bad_labels=False,
    seed=0,
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
        num_bins=num_bins,
        ignore_index=ignore_index,
        bad_labels=bad_labels,
        seed=seed,
        device="cuda",
    )
    opts = op_args(num_bins, soft, act, labels, mode, moments, ignore_index, right, device="cuda")
    what = describe(B, C, N, num_bins, soft, act, labels, mode, moments, R, dtype, t, ignore_index, right)
    got = cuda_stats(x, t, opts)
    ref = reference_stats(x, t, opts)
    check_stats(got, ref, N, soft, what)
    grads = random_grads(ref, seed=seed + 1, device="cuda")
    g = cuda_grad(x, t, grads, opts)
    check_grad(g, reference_grad(x, t, grads, opts), dtype, what)
    return x, t


@gpu
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("act", ["none", "softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_options_grid(soft, act, dtype, labels, mode):
    ii = 2 if labels else None
    _run_case(2, 4, 5000, soft=soft, act=act, labels=labels, mode=mode, dtype=dtype, ignore_index=ii, seed=3)


@gpu
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("moments", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_raters_and_moments(mode, R, moments, soft):
    _run_case(2, 5, 7001, soft=soft, act="softmax", labels=True, mode=mode, moments=moments, R=R, ignore_index=1)


@gpu
@pytest.mark.parametrize("target_dtype", LABEL_DTYPES)
def test_label_dtypes_and_bad_labels(target_dtype):
    for R in (1, 3):
        _run_case(
            2,
            3,
            3001,
            soft=False,
            act="softmax",
            labels=True,
            R=R,
            target_dtype=target_dtype,
            bad_labels=True,
            ignore_index=-1 if target_dtype != torch.uint8 else 0,
        )


@gpu
@pytest.mark.parametrize("target_dtype", DENSE_DTYPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_dense_target_dtypes(target_dtype, soft, mode):
    _run_case(1, 5, 2049, soft=soft, act="sigmoid", labels=False, mode=mode, moments=True, target_dtype=target_dtype)


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
@pytest.mark.parametrize("variant", ["v1", "top_label_R3_moments"])
def test_odd_shapes(B, C, N, M, soft, variant):
    act = "softmax" if C > 1 else "sigmoid"
    kw = {} if variant == "v1" else {"mode": "top_label", "R": 3, "moments": True}
    _run_case(B, C, N, soft=soft, act=act, labels=True, num_bins=M, ignore_index=0 if C > 2 else None, seed=7, **kw)


@gpu
@pytest.mark.parametrize("right", [False, True])
def test_probabilities_exactly_on_edges_and_centres(right):
    # several M: int(p * M) under- and over-estimates the bin of an edge value for some of them
    marks = torch.cat([torch.cat([bin_edges(m), bin_centres(m)]) for m in (3, 7, 10, 13, 20)])
    p = torch.cat([marks, torch.nextafter(marks, marks + 1), torch.nextafter(marks, marks - 1)])
    p = torch.cat([p, torch.tensor([0.0, 1.0, 0.5])]).clamp(0, 1)
    x = torch.stack([p, 1 - p], 0).unsqueeze(0).contiguous().cuda()  # [1, 2, n]
    t = (torch.arange(p.numel()) % 2).view(1, 1, -1).cuda()
    for M in (3, 7, 10, 13, 20):
        for soft in (False, True):
            for mode in ("marginal", "top_label"):
                opts = op_args(M, soft, "none", True, mode, True, None, right, device="cuda")
                ref = reference_stats(x, t, opts)
                check_stats(cuda_stats(x, t, opts), ref, p.numel(), soft, f"edges M={M} right={right} {mode}")
                grads = random_grads(ref, device="cuda")
                check_grad(cuda_grad(x, t, grads, opts), reference_grad(x, t, grads, opts), torch.float32, "edges")


@gpu
@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_no_class_gives_empty_statistics(labels, mode):
    # C = 0 at the op level: empty (marginal) or zero (top-label) statistics, nothing bad, an empty gradient
    x = torch.empty(2, 0, 50, device="cuda")
    t = torch.zeros(2, 1, 50, dtype=torch.int64, device="cuda") if labels else torch.empty(2, 0, 50, device="cuda")
    for soft in (False, True):
        opts = op_args(20, soft, "softmax", labels, mode, True, device="cuda")
        got = cuda_stats(x, t, opts)
        ref = reference_stats(x, t, opts)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and a.device.type == "cuda" and torch.equal(a.cpu(), b.cpu().to(a.dtype))
        g = cuda_grad(x, t, random_grads(ref, device="cuda"), opts)
        assert g.shape == x.shape and g.dtype == x.dtype


@gpu
def test_deterministic_run_to_run():
    for mode, R, moments in (("marginal", 1, False), ("top_label", 3, True), ("marginal", 3, True)):
        x, t = make_case(2, 4, 400_000, act="softmax", labels=True, R=R, seed=11, device="cuda")
        for soft in (False, True):
            opts = op_args(20, soft, "softmax", True, mode, moments, device="cuda")
            a = cuda_stats(x, t, opts)
            b = cuda_stats(x, t, opts)
            for u, v in zip(a, b):
                assert torch.equal(u, v), "forward statistics differ between two identical runs"
            grads = random_grads(a, device="cuda")
            assert torch.equal(cuda_grad(x, t, grads, opts), cuda_grad(x, t, grads, opts)), "gradients differ"


@gpu
def test_strided_input_accepted():
    x, t = make_case(2, 4, 3000, act="softmax", labels=True, R=3, seed=5, device="cuda")
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channels-last strides
    ts = t.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xs.is_contiguous()
    opts = op_args(20, True, "softmax", True, "top_label", True, device="cuda")
    for u, v in zip(cuda_stats(xs, ts, opts), cuda_stats(x, t, opts)):
        assert torch.equal(u, v)


@gpu
def test_64bit_offsets():
    # [1, 2, N] with 2*N > 2^31: class 1 lives past 2^31 elements; compare with the two halves of N.
    N = (1 << 30) + 4099
    torch.manual_seed(0)
    x = torch.randn(1, 2, N, device="cuda", dtype=torch.float16)
    t = torch.randint(0, 2, (1, 1, N), device="cuda", dtype=torch.uint8)
    opts = op_args(20, False, "softmax", True, device="cuda")
    full = cuda_stats(x, t, opts)
    h = N // 2
    parts = [cuda_stats(x[:, :, s].contiguous(), t[:, :, s].contiguous(), opts) for s in (slice(0, h), slice(h, N))]
    # Statistics above 2^24 are not exact in float32. Each of full, parts[0], parts[1] is within STAT_RTOL of
    # its exact value (module docstring; their float32 runs split the voxels differently, so the errors do
    # not cancel), and adding the halves in float32 rounds once more: full and the sum of the halves agree
    # within 2 * STAT_RTOL + 2^-24, relative.
    for k in (0, 1, 2):
        torch.testing.assert_close(full[k], parts[0][k] + parts[1][k], rtol=2 * STAT_RTOL + EPS32 / 2, atol=0)
    assert torch.equal(full[5].reshape(-1), parts[0][5].reshape(-1) + parts[1][5].reshape(-1))
    grads = random_grads(full, device="cuda")
    g = cuda_grad(x, t, grads, opts)
    tail = slice(N - 5000, N)
    gt = cuda_grad(x[:, :, tail].contiguous(), t[:, :, tail].contiguous(), grads, opts)
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
    x, t = make_case(2, 3, 700, act="softmax", labels=True, R=3, seed=2, device="cuda")
    for mode, moments in (("marginal", False), ("top_label", True)):
        opts = op_args(20, False, "softmax", True, mode, moments, device="cuda")
        torch.library.opcheck(
            torch.ops.calibops.binned_stats, (x, t, *opts), test_utils=("test_schema", "test_faketensor")
        )
        grads = random_grads(reference_stats(x, t, opts), device="cuda")
        torch.library.opcheck(
            torch.ops.calibops.binned_stats_backward,
            (*grads, x, t, *opts),
            test_utils=("test_schema", "test_faketensor"),
        )


@gpu
def test_bad_arguments_raise():
    x, t = make_case(1, 3, 100, device="cuda")
    opts = list(op_args(20, False, "softmax", True, device="cuda"))
    with pytest.raises(ValueError, match="edges"):
        torch.ops.calibops.binned_stats(x, t, opts[0], 19, *opts[2:])
    with pytest.raises(ValueError, match="target"):
        torch.ops.calibops.binned_stats(x, t[:, :, :50], *opts)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.calibops.binned_stats(x, t, *opts[:3], 5, *opts[4:])
    with pytest.raises(ValueError, match="mode"):
        torch.ops.calibops.binned_stats(x, t, *opts[:5], 2, *opts[6:])
    with pytest.raises(ValueError, match="num_bins"):
        big = edges_for(4000, False, "cuda")
        torch.ops.calibops.binned_stats(x.repeat(1, 400, 1), t, big, 4000, *opts[2:])
