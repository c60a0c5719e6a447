"""The Triton backend (calibops::triton_binned_stats / _backward) against the reference.

Without a GPU the kernels run on CPU tensors through the Triton interpreter: TRITON_INTERPRET=1 must be set
before triton is imported (tests/conftest.py does it; it is repeated here so this module also works alone).
With a GPU the same tests run on CUDA tensors with the compiled kernels.

Tolerances (from the float64-accumulating reference, which bins the same float32 p):
- statistics: the kernel sums float32 values in float32 (blocked), the reference sums them in float64 and
  rounds once, so the error is a few float32 ulps of the largest partial sum: rtol 1e-5 relative to the
  bin's magnitude (|stat| + count, a bound on the summed absolute values), for every input dtype (inputs are
  read exactly in their own dtype and converted to float32 by both sides).
- gradients: computed in float32 and rounded once to the input dtype; the float32 error is a few ulps of the
  largest term of the chain rule, so per element rtol(dtype) + atol = 1e-5 * max|grad| with rtol from
  ``GRAD_RTOL`` (float32 1e-5 over ~1e-7 seen; float16 2^-10 and bfloat16 2^-7: one rounding of the output).
- hard bins from logits: the kernel's softmax/sigmoid is not torch's (compiled: ``ex2.approx`` and
  ``div.full``; interpreted: NumPy's exp), so p may differ from the reference's by a few float32 ulps and
  land one bin over when it lies that close to an inner edge. ``_run_both`` therefore redraws the logits of
  voxels whose float64 probability lies within ``EDGE_MARGIN`` = 1e-5 (over 100 ulps of 1) of an inner edge,
  as tests/test_cuda_backend.py does; the edge rule itself is pinned with probabilities given directly
  (activation none, bit-identical on both sides) in test_probabilities_exactly_on_edges_and_centres.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import calibops.functional as F  # noqa: E402
from calibops.reference import bin_centres, bin_edges, binned_stats_prepared  # noqa: E402

from . import _oracle  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"

tb = pytest.importorskip("calibops.triton.binned_stats")

# Every distinct constexpr/dtype combination is a separate Triton compile on a GPU (~1 s each on a fresh
# machine); the interpreter has no such cost. Parameter sets marked with this run on CPU always and on a GPU
# only without `-m "not slow"` (the GPU check script's quick pass keeps the softmax and core-option cases).
SLOW_ON_GPU = pytest.mark.slow if torch.cuda.is_available() else ()

GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
STAT_RTOL = 1e-5
ACT = {"none": 0, "softmax": 1, "sigmoid": 2}
EDGE_MARGIN = 1e-5


def test_kernels_are_interpreted_on_cpu_and_compiled_on_gpu():
    # On a CPU-only machine the kernels only run if triton was imported with TRITON_INTERPRET=1.
    assert tb.INTERPRETED == INTERPRET, (
        "calibops.triton was imported before TRITON_INTERPRET was set (or set on a GPU machine); "
        "set it in tests/conftest.py before anything imports triton"
    )


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _make(B, C, N, *, act, labels, dtype=torch.float32, target_dtype=None, soft_target=True, ignore_index=None,
          bad_labels=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, N, generator=g) * 2
    if act == "none":
        x = torch.softmax(x, 1) if C > 1 else torch.rand(B, C, N, generator=g)
    x = x.to(dtype)
    if labels:
        lo, hi = (-2, C + 2) if bad_labels else (0, C)
        t = torch.randint(lo, hi, (B, N), generator=g)
        if ignore_index is not None:
            t[torch.rand(B, N, generator=g) < 0.2] = ignore_index
        t = t.to(target_dtype or torch.int64)
    else:
        if soft_target:
            t = torch.rand(B, C, N, generator=g)
        else:
            t = torch.nn.functional.one_hot(torch.randint(0, C, (B, N), generator=g), C).permute(0, 2, 1)
        td = target_dtype or torch.float32
        t = (t > 0.5) if td == torch.bool else t.to(td)
    return x.to(DEVICE), t.to(DEVICE)


def _edges(num_bins, soft):
    return (bin_centres if soft else bin_edges)(num_bins, DEVICE)


def _check_stats(out, ref, label="", soft=False, act="none"):
    count, sum_p, sum_y, bad = out
    rc, rp, ry, rbad = ref
    # Soft memberships have slope 1/(c[j+1]-c[j]) ~ M in p: the kernel's softmax/sigmoid and torch's differ by
    # a few float32 ulps (<= 4 eps32 for p <= 1), which moves each voxel's weights by up to M * 4 eps32.
    slack = 0.0
    if soft and act != "none":
        slack = rc.double().sum(-1, keepdim=True) * rc.shape[-1] * 4 * torch.finfo(torch.float32).eps
    for name, a, r in (("count", count, rc), ("sum_p", sum_p, rp), ("sum_y", sum_y, ry)):
        assert a.dtype == torch.float32 and a.shape == r.shape, (name, a.dtype, a.shape, r.shape)
        scale = r.double().abs() + rc.double().abs()
        err = (a.double() - r.double()).abs()
        worst = (err - STAT_RTOL * scale - slack).max().item()
        assert worst <= 1e-6, f"{label} {name}: max error {err.max().item():.3g} exceeds tolerance"
    assert bad.dtype == torch.int64 and bad.shape == (2,), (bad.dtype, bad.shape)  # [bad labels, non-finite p]
    assert bad.tolist() == rbad.tolist(), f"{label} bad: {bad.tolist()} != {rbad.tolist()}"


def _away_from_edges(x, act, num_bins, seed=0):
    """``x`` with the logits of every voxel redrawn whose float64 probability (any class) lies within EDGE_MARGIN
    of an inner hard edge (module docstring); ``x`` itself when act is "none" (probabilities given directly)."""
    if act == "none":
        return x
    inner = bin_edges(num_bins).double()[1:-1].to(x.device)
    if inner.numel() == 0:
        return x
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        z = x.double()
        p = torch.softmax(z, 1) if act == "softmax" else torch.sigmoid(z)
        near = ((p.unsqueeze(-1) - inner).abs().amin(-1) < EDGE_MARGIN).any(1, keepdim=True)  # [B, 1, N]
        if not bool(near.any()):
            return x
        fresh = (torch.randn(x.shape, generator=g) * 2).to(device=x.device, dtype=x.dtype)
        x = torch.where(near, fresh, x)
    raise AssertionError("could not draw logits away from the bin edges")


def _run_both(x, t, num_bins, soft, act, labels, ignore_index, right, seed=1):
    """Forward and backward (random upstream grads on all three statistics) on triton and reference. Hard bins
    from logits: voxels near an inner edge are redrawn first (``_away_from_edges``)."""
    if not soft:
        x = _away_from_edges(x, act, num_bins, seed)
    e = _edges(num_bins, soft)
    B, C = x.shape[:2]
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(B, C, num_bins, generator=g).to(DEVICE) for _ in range(3)]
    xk = x.detach().clone().requires_grad_()
    out = tb.binned_stats(xk, t, e, num_bins, soft, ACT[act], labels, ignore_index, right)
    sum((u * o).sum() for u, o in zip(ups, out[:3])).backward()
    xr = x.detach().float().clone().requires_grad_()
    ref = binned_stats_prepared(xr, t, e, num_bins, soft, ACT[act], labels, ignore_index, right)
    sum((u * o).sum() for u, o in zip(ups, ref[:3])).backward()
    return out, ref, xk.grad, xr.grad


def _check_grad(gk, gr, dtype, label=""):
    assert gk.dtype == dtype and gk.shape == gr.shape
    err = (gk.double() - gr.double()).abs()
    tol = GRAD_RTOL[dtype] * gr.double().abs() + 1e-5 * gr.double().abs().max() + 1e-30
    bad = err > tol
    assert not bool(bad.any()), (
        f"{label}: {int(bad.sum())} gradient elements off, max abs error {err.max().item():.3g} "
        f"(max |grad| {gr.abs().max().item():.3g})"
    )


# --------------------------------------------------------------------------------------------------------------
# statistics and gradients vs the reference, every option
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("act", ["none", "softmax", "sigmoid"])
@pytest.mark.parametrize("target", ["labels", "dense"])
@pytest.mark.parametrize("right", [False, True], ids=["left", "right"])
def test_stats_and_grad_every_option(soft, act, target, right):
    labels = target == "labels"
    x, t = _make(2, 5, 75, act=act, labels=labels, seed=hash((soft, act, target, right)) % 1000)
    out, ref, gk, gr = _run_both(x, t, 5, soft, act, labels, None, right)
    _check_stats(out, ref, f"{soft=} {act=} {target=}", soft, act)
    _check_grad(gk, gr, torch.float32, f"{soft=} {act=} {target=}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("act", ["none", "softmax", "sigmoid"])
def test_half_inputs_read_in_own_dtype(dtype, soft, act):
    x, t = _make(2, 3, 61, act=act, labels=True, dtype=dtype, seed=7)
    out, ref, gk, gr = _run_both(x, t, 20, soft, act, True, None, False)
    _check_stats(out, ref, f"{dtype}", soft, act)
    _check_grad(gk, gr, dtype, f"{dtype} {soft=} {act=}")


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(label_dtype):
    x, t = _make(1, 4, 50, act="softmax", labels=True, target_dtype=label_dtype, seed=3)
    out, ref, gk, gr = _run_both(x, t, 5, False, "softmax", True, None, False)
    _check_stats(out, ref, str(label_dtype), False, "softmax")
    _check_grad(gk, gr, torch.float32, str(label_dtype))


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_dense_target_dtypes(target_dtype, soft):
    soft_target = target_dtype.is_floating_point
    x, t = _make(2, 3, 40, act="sigmoid", labels=False, target_dtype=target_dtype, soft_target=soft_target, seed=5)
    out, ref, gk, gr = _run_both(x, t, 5, soft, "sigmoid", False, None, False)
    _check_stats(out, ref, str(target_dtype), soft, "sigmoid")
    _check_grad(gk, gr, torch.float32, str(target_dtype))


@pytest.mark.parametrize("ignore_index,label_dtype", [(-100, torch.int64), (255, torch.uint8), (0, torch.int32)])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_ignore_index_and_bad_labels(ignore_index, label_dtype, soft):
    # labels outside [0, C) that are not ignore_index are counted in `bad` and left out, like ignored voxels
    x, t = _make(2, 4, 90, act="softmax", labels=True, target_dtype=torch.int64, ignore_index=ignore_index,
                 bad_labels=label_dtype != torch.uint8, seed=11)
    t = t.to(label_dtype)
    out, ref, gk, gr = _run_both(x, t, 5, soft, "softmax", True, ignore_index, False)
    _check_stats(out, ref, f"ignore_index={ignore_index}", soft, "softmax")
    _check_grad(gk, gr, torch.float32, f"ignore_index={ignore_index}")
    skipped = (t == ignore_index) | (t.long() < 0) | (t.long() >= 4)
    assert bool(skipped.any())
    assert bool((gk.permute(0, 2, 1)[skipped] == 0).all()), "ignored / out-of-range voxels must get zero gradient"


@pytest.mark.parametrize(
    "B,C,N,M",
    [(1, 1, 1, 1), (3, 1, 33, 5), (1, 2, 1025, 20), (2, 17, 19, 5), (1, 33, 23, 5), (2, 40, 11, 20), (1, 3, 5, 64)],
    ids=["tiny", "C1", "N1025", "C17", "C33-chunks", "C40-chunks", "M64"],
)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("act", [pytest.param("none", marks=SLOW_ON_GPU), "softmax",
                                 pytest.param("sigmoid", marks=SLOW_ON_GPU)])
def test_odd_shapes_and_many_classes(B, C, N, M, soft, act):
    # C > 32 exercises the class-chunk path (online softmax normaliser over chunks)
    x, t = _make(B, C, N, act=act, labels=True, ignore_index=C - 1 if C > 2 else None, seed=B * 1000 + C + N)
    ignore = C - 1 if C > 2 else None
    out, ref, gk, gr = _run_both(x, t, M, soft, act, True, ignore, False)
    _check_stats(out, ref, f"{B=} {C=} {N=} {M=}", soft, act)
    if not soft and act == "none":
        assert torch.equal(out[0], ref[0]), "hard counts of probabilities must be exact"
    _check_grad(gk, gr, torch.float32, f"{B=} {C=} {N=} {M=}")


@pytest.mark.parametrize("num_bins", [1, pytest.param(2, marks=SLOW_ON_GPU), 5, 20])
@pytest.mark.parametrize("right", [False, True], ids=["left", "right"])
def test_probabilities_exactly_on_edges_and_centres(num_bins, right):
    # every edge, every centre, their float32 neighbours, 0 and 1: the bin rule must match bucketize exactly
    e = bin_edges(num_bins).double()
    c = bin_centres(num_bins).double()
    pts = torch.cat([e, c, torch.tensor([0.0, 1.0, 0.5])]).float()
    pts = torch.cat([pts, torch.nextafter(pts, torch.tensor(2.0)), torch.nextafter(pts, torch.tensor(-1.0))])
    pts = pts.clamp(0, 1).unique()
    x = pts.view(1, 1, -1).to(DEVICE)
    t = (torch.arange(pts.numel()) % 2).float().view(1, 1, -1).to(DEVICE)
    for soft in (False, True):
        out, ref, gk, gr = _run_both(x, t, num_bins, soft, "none", False, None, right)
        assert torch.equal(out[0], ref[0]) or soft, "hard counts must be exact"
        _check_stats(out, ref, f"edges {soft=}")
        _check_grad(gk, gr, torch.float32, f"edges {soft=}")


@pytest.mark.parametrize("fill", [0, 1])
def test_full_tiles_of_one_label_are_exact(fill):
    # count and sum_y of label tiles are carried packed in one float per tile: full tiles of 1s are the extreme
    N = 5000
    x = torch.full((1, 2, N), 0.3, device=DEVICE)
    x[0, 1] = 0.7
    t = torch.full((1, N), fill, dtype=torch.int64, device=DEVICE)
    count, sum_p, sum_y, _ = tb.binned_stats(x, t, _edges(5, False), 5, False, 0, True, None, False)
    expect = torch.zeros(1, 2, 5, device=DEVICE)
    expect[0, 0, 1] = N
    expect[0, 1, 3] = N
    assert torch.equal(count, expect)
    assert float(sum_y[0, fill].sum()) == N and float(sum_y[0, 1 - fill].sum()) == 0


def test_grad_of_single_statistic_and_zero_grads():
    # gradient flowing from sum_p only (the others get zeros from the autograd glue)
    x, t = _make(2, 4, 30, act="softmax", labels=True, seed=2)
    e = _edges(5, True)
    xk = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    w = torch.linspace(-2.0, 3.5, 5, device=DEVICE)  # per-bin upstream weights (a constant would cancel in softmax)
    (tb.binned_stats(xk, t, e, 5, True, 1, True, None, False)[1] * w).sum().backward()
    (binned_stats_prepared(xr, t, e, 5, True, 1, True, None, False)[1] * w).sum().backward()
    _check_grad(xk.grad, xr.grad, torch.float32, "sum_p only")


def test_empty_volume():
    x = torch.zeros(2, 3, 0, device=DEVICE)
    t = torch.zeros(2, 0, dtype=torch.int64, device=DEVICE)
    count, sum_p, sum_y, bad = tb.binned_stats(x, t, _edges(4, False), 4, False, 1, True, None, False)
    assert count.shape == (2, 3, 4) and not bool(count.any()) and bad.tolist() == [0, 0]
    g = tb.binned_stats_backward(count, sum_p, sum_y, x, t, _edges(4, False), 4, False, 1, True, None, False)
    assert g.shape == x.shape


def test_deterministic_bitwise():
    x, t = _make(2, 6, 3000, act="softmax", labels=True, seed=4)
    e = _edges(20, True)
    a = tb.binned_stats(x, t, e, 20, True, 1, True, None, False)
    b = tb.binned_stats(x, t, e, 20, True, 1, True, None, False)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    g1 = tb.binned_stats_backward(a[0], a[1], a[2], x, t, e, 20, True, 1, True, None, False)
    g2 = tb.binned_stats_backward(a[0], a[1], a[2], x, t, e, 20, True, 1, True, None, False)
    assert torch.equal(g1, g2)


def test_many_programs_partial_merge():
    # more tiles than one program takes (forces several partial histograms per image, merged over P)
    cfg = tb.launch_config(1, 2, 300_000, 5, DEVICE)
    assert cfg["P"] > 1 or DEVICE.type == "cpu"
    x, t = _make(1, 2, 40_000 if INTERPRET else 300_000, act="sigmoid", labels=False, seed=9)
    out, ref, gk, gr = _run_both(x, t, 5, False, "sigmoid", False, None, False)
    _check_stats(out, ref, "many programs")
    _check_grad(gk, gr, torch.float32, "many programs")


# --------------------------------------------------------------------------------------------------------------
# launch heuristic
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 2, 3, 4, 16, 17, 32, 33, 100])
def test_launch_config_heuristic(C):
    cfg = tb.launch_config(2, C, 7_225_344, 20, torch.device("cpu"))
    assert cfg["C_BLOCK"] == min(triton.next_power_of_2(C), tb.MAX_C_BLOCK)
    assert cfg["num_cc"] * cfg["C_BLOCK"] >= C
    assert cfg["P"] * cfg["tiles_per_prog"] * cfg["BLOCK_N"] >= 7_225_344
    assert cfg["tiles_per_prog"] <= tb.MAX_TILES_PER_PROG
    assert cfg["M_PAD"] == 32
    bw = tb.launch_config(2, C, 7_225_344, 20, torch.device("cpu"), backward=True)
    assert bw["P"] * bw["tiles_per_prog"] * bw["BLOCK_N"] >= 7_225_344


# --------------------------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument():
    x, t = _make(1, 3, 10, act="softmax", labels=True)
    e = _edges(4, False)
    with pytest.raises(ValueError, match="num_bins"):
        tb.binned_stats(x, t, e, 0, False, 1, True, None, False)
    with pytest.raises(ValueError, match="edges"):
        tb.binned_stats(x, t, _edges(4, True), 4, False, 1, True, None, False)
    with pytest.raises(ValueError, match="activation"):
        tb.binned_stats(x, t, e, 4, False, 3, True, None, False)
    with pytest.raises(ValueError, match="target"):
        tb.binned_stats(x, t[:, :5], e, 4, False, 1, True, None, False)
    with pytest.raises(TypeError, match="target"):
        tb.binned_stats(x, t.float(), e, 4, False, 1, True, None, False)
    with pytest.raises(TypeError, match="input"):
        tb.binned_stats(x.double(), t, e, 4, False, 1, True, None, False)
    with pytest.raises(ValueError, match="input"):
        tb.binned_stats(x[0], t, e, 4, False, 1, True, None, False)
    with pytest.raises(ValueError, match="ignore_index"):
        tb.binned_stats(x, torch.rand_like(x), e, 4, False, 1, False, 0, False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 2.0, -1.0])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_invalid_probabilities_stay_in_bounds(value, soft):
    # validation off: the kernel must still index only its own memory (bins clamped before any gather)
    x, t = _make(1, 2, 20, act="none", labels=True)
    x[0, 0, 3] = value
    e = _edges(5, soft)
    count, sum_p, sum_y, bad = tb.binned_stats(x, t, e, 5, soft, 0, True, None, False)
    assert count.shape == (1, 2, 5)
    finite = abs(value) != float("inf") and value == value  # non-finite p: left out and counted in bad[1]
    assert abs(float(count.sum()) - (40 if finite else 39)) < 1e-3
    assert bad.tolist() == [0, 0 if finite else 1]
    g = tb.binned_stats_backward(count, sum_p, sum_y, x, t, e, 5, soft, 0, True, None, False)
    assert g.shape == x.shape


# --------------------------------------------------------------------------------------------------------------
# registration: dispatcher, autograd glue, opcheck, torch.compile, autocast
# --------------------------------------------------------------------------------------------------------------


def test_dispatcher_uses_registered_op():
    from calibops import _backends

    assert _backends.stats_function("triton") is torch.ops.calibops.triton_binned_stats
    assert _backends.resolve_backend("triton", DEVICE) == "triton"


def test_opcheck():
    x, t = _make(1, 3, 20, act="softmax", labels=True)
    for soft in (False, True):
        e = _edges(5, soft)
        torch.library.opcheck(
            torch.ops.calibops.triton_binned_stats, (x.clone().requires_grad_(), t, e, 5, soft, 1, True, None, False)
        )
        g = [torch.randn(1, 3, 5, device=DEVICE) for _ in range(3)]
        torch.library.opcheck(
            torch.ops.calibops.triton_binned_stats_backward, (*g, x, t, e, 5, soft, 1, True, None, False)
        )


def test_compile_fullgraph():
    x, t = _make(2, 3, 40, act="softmax", labels=True, seed=6)
    e = _edges(5, True)

    def f(x, t):
        count, sum_p, sum_y, _ = tb.binned_stats(x, t, e, 5, True, 1, True, None, False)
        return ((sum_p - sum_y).abs() / count.clamp(min=1)).sum()

    backend = "aot_eager" if INTERPRET else "inductor"
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    le = f(xe, t)
    le.backward()
    lc = torch.compile(f, fullgraph=True, backend=backend)(xc, t)
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# end to end through the public API (shared epilogue), including grad_output != 1 and the float64 oracle
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binning", ["hard", "soft"])
@pytest.mark.parametrize("opts", [
    dict(softmax=True, to_onehot_y=True),
    dict(sigmoid=True, to_onehot_y=False, include_background=False),
    dict(softmax=True, to_onehot_y=True, ignore_index=2, reduction="none"),
    dict(to_onehot_y=True, reduction="sum", right=True, ignore_empty_classes=False),
], ids=["softmax-labels", "sigmoid-dense", "ignore-none", "probs-sum-right"])
def test_loss_matches_reference_and_oracle(binning, opts):
    g = torch.Generator().manual_seed(21)
    B, C, sp = 2, 4, (5, 3, 4)
    x = torch.randn(B, C, *sp, generator=g)
    if not (opts.get("softmax") or opts.get("sigmoid")):
        x = torch.softmax(x, 1)
    elif binning == "hard":
        act = "softmax" if opts.get("softmax") else "sigmoid"
        x = _away_from_edges(x.view(B, C, -1), act, 5).view_as(x)
    lab = torch.randint(0, C, (B, *sp), generator=g)
    target = lab if opts.get("to_onehot_y") else torch.nn.functional.one_hot(lab, C).movedim(-1, 1).float()
    x, target = x.to(DEVICE), target.to(DEVICE)
    losses, grads = {}, {}
    up = None
    for backend in ("triton", "reference"):
        xx = x.clone().requires_grad_()
        loss = F.marginal_l1_ace(xx, target, num_bins=5, binning=binning, backend=backend, **opts)
        if up is None:
            up = torch.rand(loss.shape, generator=g).to(DEVICE) * 3 + 0.5  # grad_output != 1
        loss.backward(up)
        losses[backend], grads[backend] = loss.detach(), xx.grad
    torch.testing.assert_close(losses["triton"], losses["reference"], rtol=1e-5, atol=1e-7)
    _check_grad(grads["triton"], grads["reference"], torch.float32, "loss")
    act = "softmax" if opts.get("softmax") else "sigmoid" if opts.get("sigmoid") else None
    keys = ("include_background", "to_onehot_y", "ignore_empty_classes", "reduction", "right", "ignore_index")
    value, gx = _oracle.loss_and_grad(
        x.cpu().numpy(), target.cpu().numpy(), num_bins=5, binning=binning, act=act,
        grad_output=up.cpu().numpy(), **{k: opts[k] for k in keys if k in opts},
    )
    torch.testing.assert_close(losses["triton"].cpu().double(), torch.as_tensor(value), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["triton"].cpu().double(), torch.as_tensor(gx), rtol=1e-3, atol=1e-6)


def test_autocast_passes_input_dtype_through():
    x, t = _make(1, 3, 40, act="softmax", labels=True, dtype=torch.float16, seed=8)
    e = _edges(5, False)
    plain = tb.binned_stats(x, t, e, 5, False, 1, True, None, False)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16 if INTERPRET else torch.float16):
        auto = tb.binned_stats(x, t, e, 5, False, 1, True, None, False)
    for a, b in zip(plain, auto):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# GPU only: > 2^31 elements (64-bit offsets)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (64-bit offsets need > 2^31 elements)")
def test_more_than_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip(f"needs ~14 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    B, C, N, M = 2, 2, 2**29 + 2**28 + 7, 10  # B*C*N > 2^31 + 2^30: image 1 class 1 starts beyond 2^31
    x = torch.empty(B, C, N, dtype=torch.float16, device="cuda")
    x[0].fill_(0.125)  # bin 1 of 10
    x[1, 0].fill_(0.625)  # bin 6
    x[1, 1].fill_(0.875)  # bin 8
    x[1, 1, -1] = 0.375  # the very last element: bin 3
    t = torch.zeros(B, N, dtype=torch.uint8, device="cuda")
    t[1, -1] = 1
    e = bin_edges(M, "cuda")
    count, sum_p, sum_y, bad = tb.binned_stats(x, t, e, M, False, 0, True, None, False)
    assert not bool(bad.any())
    # float32 cannot hold these counts: N = 805,306,375 and N - 1 are stored as 805,306,368 (spacing 64 above
    # 2^29). Error budget: every statistic is a float32 sum of non-negative terms (a tile's sum, the program's
    # running sum over its tiles, then the merge of the P program partials); each term reaches the result
    # through at most log2(BLOCK_N) + tiles_per_prog + P roundings of 2^-24 relative, so the result is within
    # that many times 2^-24 of the exact sum, relative.
    cfg = tb.launch_config(B, C, N, M, x.device)
    rtol = (math.log2(cfg["BLOCK_N"]) + cfg["tiles_per_prog"] + cfg["P"]) * 2.0**-24
    expect = torch.zeros(B, C, M, dtype=torch.float64)
    expect[0, :, 1] = N
    expect[1, 0, 6] = N
    expect[1, 1, 8] = N - 1
    expect[1, 1, 3] = 1
    # exact where float32 holds the value: empty bins are 0, the last element's bin counts 1
    torch.testing.assert_close(count.double().cpu(), expect, rtol=rtol, atol=0)
    y_expect = torch.zeros(B, C, M, dtype=torch.float64)
    y_expect[0, 0, 1] = N  # labels 0 everywhere but the last voxel of image 1
    y_expect[1, 0, 6] = N - 1
    y_expect[1, 1, 3] = 1
    torch.testing.assert_close(sum_y.double().cpu(), y_expect, rtol=rtol, atol=0)
    p_expect = expect * torch.tensor([0.125, 0.625, 0.875])[torch.tensor([[0, 0], [1, 2]])].unsqueeze(-1).double()
    p_expect[1, 1, 3] = 0.375
    torch.testing.assert_close(sum_p.double().cpu(), p_expect, rtol=rtol, atol=0)
    assert float(count[1, 1, 3]) == 1.0 and float(sum_y[1, 1, 3]) == 1.0 and float(sum_p[1, 1, 3]) == 0.375
    # backward: every element's gradient is Gp at its bin, exactly (values 0..39 are exact in float16)
    gp = torch.arange(B * C * M, dtype=torch.float32, device="cuda").view(B, C, M)
    z = torch.zeros_like(gp)
    grad = tb.binned_stats_backward(z, gp, z, x, t, e, M, False, 0, True, None, False)
    assert float(grad[1, 1, -1]) == float(gp[1, 1, 3])
    for (b, c), j in (((0, 0), 1), ((0, 1), 1), ((1, 0), 6)):
        assert bool((grad[b, c] == gp[b, c, j].to(grad.dtype)).all()), f"gradient of image {b} class {c}"
    assert bool((grad[1, 1, :-1] == gp[1, 1, 8].to(grad.dtype)).all()), "gradient beyond 2^31 elements"


# --------------------------------------------------------------------------------------------------------------
# Many bins (the scatter kernel), the non-finite rule, the `bad` pair, C = 0, and how kernels are launched
# --------------------------------------------------------------------------------------------------------------
#
# Above tb.MAX_REGISTER_BINS (64) the forward is the scatter kernel: per tile, the elements of a class row that
# share a bin are grouped and the group's leader adds the group sums to the program's float64 partial row. Its
# per-element work does not depend on M. CALIBOPS_TRITON_MAX_REGISTER_BINS=0 routes every M through it, so the
# option matrix below runs it at small M too. Tolerances are those of the module docstring (the float64 partials
# only make the kernel's sums more exact). Each M is a separate compile on a GPU: only a few cases run in the GPU
# quick pass.


def _expect_scatter(M):
    cfg = tb.launch_config(1, 3, 1000, M, DEVICE)
    assert cfg["SCATTER"] == (M > tb.MAX_REGISTER_BINS), cfg
    return cfg


def test_scatter_kernel_chosen_above_max_register_bins(monkeypatch):
    assert tb.MAX_REGISTER_BINS == 64
    assert not tb.launch_config(1, 3, 1000, 64, DEVICE)["SCATTER"]
    assert tb.launch_config(1, 3, 1000, 65, DEVICE)["SCATTER"]
    assert not tb.launch_config(1, 3, 1000, 2**24, DEVICE, backward=True)["SCATTER"]  # one backward for any M
    monkeypatch.setenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", "0")
    assert tb.launch_config(1, 3, 1000, 1, DEVICE)["SCATTER"]
    monkeypatch.setenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", "-1")
    with pytest.raises(ValueError, match="CALIBOPS_TRITON_MAX_REGISTER_BINS"):
        tb.launch_config(1, 3, 1000, 5, DEVICE)


@pytest.mark.parametrize("C", [1, 2, 3, 8, 16, 32, 40])
def test_scatter_work_per_element_does_not_depend_on_num_bins(C):
    import inspect

    # Structural: the scatter kernel's tile (the all-pairs grouping is C_BLOCK * BLOCK_N**2 per tile) and the
    # tiles a program walks are the same for every M above the switch, up to the documented cap 2**24; only P
    # shrinks (P * M <= N keeps the float64 partial rows within the input's size).
    N = 7_225_344
    cfgs = [tb.launch_config(2, C, N, M, torch.device("cpu")) for M in (65, 1000, 4097, 100_000, 2**24)]
    for cfg in cfgs:
        assert cfg["SCATTER"]
        assert cfg["C_BLOCK"] * cfg["BLOCK_N"] ** 2 <= tb.SCATTER_PAIRS and 8 <= cfg["BLOCK_N"] <= tb.SCATTER_MAX_N
        assert cfg["BLOCK_N"] == cfgs[0]["BLOCK_N"]
        assert cfg["P"] * cfg["tiles_per_prog"] * cfg["BLOCK_N"] >= N
    for cfg, M in zip(cfgs, (65, 1000, 4097, 100_000, 2**24)):
        assert cfg["P"] <= max(1, N // M)
    src = inspect.getsource(getattr(tb._stats_fwd_scatter_kernel, "fn", tb._stats_fwd_scatter_kernel))
    assert "range(NUM_BINS)" not in src and "M_PAD" not in src, "the scatter kernel must not loop over the bins"


def test_scatter_kernel_time_does_not_grow_with_num_bins():
    # Before the scatter kernel, the interpreter took 0.09 s at M=20, 3.2 s at M=1000 and did not finish M=100000
    # in 10 minutes (64 voxels). Same input, M=65 vs 4096 vs 100000: the forward time may not grow like M (a
    # factor of 1500 here); allowed: 3x plus 1 s for the (B, C, M) output and partial rows and a loaded machine.
    import time

    x, t = _make(1, 4, 64, act="softmax", labels=True, seed=31)
    times = {}
    for M in (65, 4096, 100_000):
        e = _edges(M, True)
        if not INTERPRET:
            tb.binned_stats(x, t, e, M, True, 1, True, None, False)  # warm-up: compile
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            out = tb.binned_stats(x, t, e, M, True, 1, True, None, False)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        assert abs(float(out[0].sum()) - 4 * 64) < 1e-3
        times[M] = best
    assert times[100_000] <= 3 * times[65] + 1.0, times
    assert times[4096] <= 3 * times[65] + 1.0, times


@pytest.mark.parametrize(
    "M,soft,act,target",
    [
        (1000, False, "softmax", "labels"),
        (1000, True, "softmax", "labels"),
        pytest.param(1000, False, "sigmoid", "dense", marks=SLOW_ON_GPU),
        pytest.param(1000, True, "none", "dense", marks=SLOW_ON_GPU),
        pytest.param(4097, False, "softmax", "labels", marks=SLOW_ON_GPU),
        pytest.param(4097, True, "sigmoid", "dense", marks=SLOW_ON_GPU),
        pytest.param(100_000, False, "none", "labels", marks=SLOW_ON_GPU),  # hard from logits: edges 1e-5 apart
        pytest.param(100_000, True, "softmax", "labels", marks=SLOW_ON_GPU),
        pytest.param(100_000, True, "none", "dense", marks=SLOW_ON_GPU),
    ],
)
def test_many_bins_match_reference(M, soft, act, target):
    _expect_scatter(M)
    labels = target == "labels"
    x, t = _make(2, 3, 37, act=act, labels=labels, ignore_index=2 if labels else None, seed=M % 997 + soft)
    out, ref, gk, gr = _run_both(x, t, M, soft, act, labels, 2 if labels else None, False)
    _check_stats(out, ref, f"{M=} {soft=} {act=}", soft, act)
    if not soft and act == "none":
        assert torch.equal(out[0], ref[0]), "hard counts of probabilities must be exact"
    _check_grad(gk, gr, torch.float32, f"{M=} {soft=} {act=}")


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("target", ["labels", "dense"])
def test_many_bins_repeated_bins_in_every_tile(soft, target):
    # few distinct probabilities over several tiles: every group has many members (and on a GPU the partial rows
    # are read back tile after tile, so a missing barrier between the updates would show here)
    labels = target == "labels"
    M, N = 1000, 120
    g = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.0, 0.1234, 0.5, 0.50004, 0.9, 1.0])
    x = levels[torch.randint(0, levels.numel(), (2, 3, N), generator=g)].to(DEVICE)
    if labels:
        t = torch.randint(0, 3, (2, N), generator=g).to(DEVICE)
    else:
        t = torch.rand(2, 3, N, generator=g).to(DEVICE)
    _expect_scatter(M)
    out, ref, gk, gr = _run_both(x, t, M, soft, "none", labels, None, False)
    _check_stats(out, ref, f"repeated bins {soft=} {target=}", soft)
    if not soft:
        assert torch.equal(out[0], ref[0]), "hard counts must be exact"
        if labels:
            assert torch.equal(out[2], ref[2]), "label sums of hard bins must be exact"
    _check_grad(gk, gr, torch.float32, f"repeated bins {soft=} {target=}")


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("act", ["none", "softmax", pytest.param("sigmoid", marks=SLOW_ON_GPU)])
@pytest.mark.parametrize("target", ["labels", pytest.param("dense", marks=SLOW_ON_GPU)])
@pytest.mark.parametrize("right", [False, pytest.param(True, marks=SLOW_ON_GPU)], ids=["left", "right"])
def test_scatter_kernel_every_option_at_small_num_bins(monkeypatch, soft, act, target, right):
    # the scatter kernel forced for M = 5 (and the edge/centre points of the exact-rule test): same results as
    # the reference and, for hard counts of probabilities, the same integers as the register kernel
    monkeypatch.setenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", "0")
    labels = target == "labels"
    seed = 100 * soft + 10 * list(ACT).index(act) + 2 * labels + right
    x, t = _make(2, 5, 75, act=act, labels=labels, seed=seed)
    assert tb.launch_config(2, 5, 75, 5, DEVICE)["SCATTER"]
    out, ref, gk, gr = _run_both(x, t, 5, soft, act, labels, None, right)
    _check_stats(out, ref, f"scatter {soft=} {act=} {target=}", soft, act)
    _check_grad(gk, gr, torch.float32, f"scatter {soft=} {act=} {target=}")
    if act == "none":
        e = bin_edges(5).double()
        pts = torch.cat([e, bin_centres(5).double(), torch.tensor([0.5])]).float()
        pts = torch.cat([pts, torch.nextafter(pts, torch.tensor(2.0)), torch.nextafter(pts, torch.tensor(-1.0))])
        xp = pts.clamp(0, 1).unique().view(1, 1, -1).to(DEVICE)
        tp = (torch.arange(xp.shape[-1]) % 2).float().view(1, 1, -1).to(DEVICE)
        out, ref, gk, gr = _run_both(xp, tp, 5, soft, "none", False, None, right)
        assert soft or torch.equal(out[0], ref[0]), "hard counts must be exact"
        _check_stats(out, ref, f"scatter edges {soft=}")
        _check_grad(gk, gr, torch.float32, f"scatter edges {soft=}")


@pytest.mark.parametrize("M", [1, 2], ids=["M1", "M2"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_scatter_kernel_one_and_two_bins(monkeypatch, M, soft):
    # soft with M = 1: no upper bin exists, so the second update round must write nothing
    monkeypatch.setenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", "0")
    x, t = _make(1, 3, 40, act="softmax", labels=True, seed=12 + M)
    out, ref, gk, gr = _run_both(x, t, M, soft, "softmax", True, None, False)
    _check_stats(out, ref, f"scatter {M=} {soft=}", soft, "softmax")
    _check_grad(gk, gr, torch.float32, f"scatter {M=} {soft=}")


def test_many_bins_class_chunks():
    # C > 32: class chunks (one program axis each, online softmax normaliser) on the scatter kernel
    x, t = _make(1, 40, 23, act="softmax", labels=True, ignore_index=39, seed=17)
    _expect_scatter(300)
    for soft in (False, True):
        out, ref, gk, gr = _run_both(x, t, 300, soft, "softmax", True, 39, False)
        _check_stats(out, ref, f"C40 M300 {soft=}", soft, "softmax")
        _check_grad(gk, gr, torch.float32, f"C40 M300 {soft=}")


@pytest.mark.parametrize("M", [20, 1000], ids=["register", "scatter"])
def test_deterministic_bitwise_many_bins(M):
    # on a GPU, several programs per image and partial rows read back tile after tile (the interpreter runs
    # programs one after the other, so a smaller volume suffices there)
    x, t = _make(2, 6, 150 if INTERPRET else 30_000, act="softmax", labels=True, seed=4)
    for soft in (False, True):
        e = _edges(M, soft)
        a = tb.binned_stats(x, t, e, M, soft, 1, True, None, False)
        b = tb.binned_stats(x, t, e, M, soft, 1, True, None, False)
        for u, v in zip(a, b):
            assert torch.equal(u, v), f"{M=} {soft=}"


# ---- the non-finite rule: NaN/+-inf probabilities are left out, get gradient 0 and are counted in bad[1] ----


def _rule_expectation(x, t, M, soft, act, labels, ups, right=False):
    """Statistics, `bad` and gradient by the rule itself, from the reference on the input with the non-finite
    entries removed. Softmax: a voxel with a NaN or +inf logit, or only -inf logits, has every p NaN, so the
    whole voxel is removed (as if ignored). Elementwise activations (none, sigmoid): each (b, c) row is reduced
    on its finite entries alone (rows are independent there); sigmoid(+-inf) = 1 / 0 is finite."""
    B, C, N = x.shape
    e = _edges(M, soft)
    if act == "softmax":
        bad_vox = torch.isnan(x).any(1) | torch.isposinf(x).any(1) | torch.isneginf(x).all(1)  # [B, N]
        assert labels
        tt = torch.where(bad_vox, torch.full_like(t, -7), t)
        xc = torch.where(bad_vox.unsqueeze(1), torch.zeros_like(x), x).float().requires_grad_()
        ref = binned_stats_prepared(xc, tt, e, M, soft, 1, True, -7, right)
        sum((u * o).sum() for u, o in zip(ups, ref[:3])).backward()
        stats = [r.detach() for r in ref[:3]]
        grad = xc.grad
        nonfinite = int(bad_vox.sum()) * C
    else:
        p = x if act == "none" else torch.sigmoid(x.double())
        bad_entry = ~torch.isfinite(p)
        stats = [torch.zeros(B, C, M, device=x.device) for _ in range(3)]
        grad = torch.zeros(B, C, N, device=x.device)
        for b in range(B):
            for c in range(C):
                keep = ~bad_entry[b, c]
                y = (t[b] == c).float() if labels else t[b, c].float()
                xr = x[b, c, keep].float().view(1, 1, -1).clone().requires_grad_()
                r = binned_stats_prepared(xr, y[keep].view(1, 1, -1), e, M, soft, ACT[act], False, None, right)
                sum((u[b, c] * o[0, 0]).sum() for u, o in zip(ups, r[:3])).backward()
                for s in range(3):
                    stats[s][b, c] = r[s][0, 0].detach()
                grad[b, c, keep] = xr.grad[0, 0]
        nonfinite = int(bad_entry.sum())
    return stats, nonfinite, grad


NUMPY_INF_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter


@NUMPY_INF_WARNING
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize(
    "act,target,M",
    [
        ("none", "dense", 5),
        ("softmax", "labels", 5),
        pytest.param("sigmoid", "dense", 5, marks=SLOW_ON_GPU),
        pytest.param("sigmoid", "labels", 5, marks=SLOW_ON_GPU),
        pytest.param("none", "labels", 5, marks=SLOW_ON_GPU),
        pytest.param("none", "dense", 200, marks=SLOW_ON_GPU),  # M = 200: the scatter kernel
        ("softmax", "labels", 200),
        pytest.param("sigmoid", "dense", 200, marks=SLOW_ON_GPU),
    ],
)
def test_nonfinite_probabilities_left_out_and_counted(value, soft, act, target, M):
    labels = target == "labels"
    C, N = 4, 90
    x, t = _make(2, C, N, act=act, labels=labels, seed=23)
    if not soft:
        x = _away_from_edges(x, act, M)  # before the non-finite values go in (module docstring)
    g = torch.Generator().manual_seed(29)
    hit = torch.rand(2, C, N, generator=g) < 0.08
    x = torch.where(hit.to(DEVICE), torch.tensor(float(value), device=DEVICE), x)
    if act == "softmax":
        x[1, :, 7] = float("-inf")  # all logits -inf: every p NaN
        x[1, :2, 8] = float("-inf")  # some logits -inf: those p are 0, the voxel is used
    ups = [torch.randn(2, C, M, generator=g).to(DEVICE) for _ in range(3)]
    xk = x.clone().requires_grad_()
    out = tb.binned_stats(xk, t, _edges(M, soft), M, soft, ACT[act], labels, None, False)
    sum((u * o).sum() for u, o in zip(ups, out[:3])).backward()
    stats, nonfinite, grad = _rule_expectation(x, t, M, soft, act, labels, ups)
    if act == "sigmoid" and value != "nan":
        assert nonfinite == 0  # sigmoid(+-inf) is finite: binned like any other p
    else:
        assert nonfinite > 0
    assert out[3].tolist() == [0, nonfinite], (out[3].tolist(), nonfinite)
    fake_ref = (*stats, torch.tensor([0, nonfinite]))
    _check_stats(out, fake_ref, f"non-finite {value} {soft=} {act=} {target=}", soft, act)
    assert all(bool(torch.isfinite(s).all()) for s in out[:3]), "no NaN/inf may reach the statistics"
    assert bool(torch.isfinite(xk.grad).all()), "non-finite entries must get gradient 0, not NaN"
    _check_grad(xk.grad, grad, torch.float32, f"non-finite {value} {soft=} {act=} {target=}")
    p = x if act == "none" else torch.softmax(x, 1) if act == "softmax" else torch.sigmoid(x)
    assert bool((xk.grad[~torch.isfinite(p)] == 0).all()), "gradient of non-finite entries must be exactly 0"
    # and the same as the reference backend, which implements the rule too
    xr = x.clone().requires_grad_()
    ref = binned_stats_prepared(xr, t, _edges(M, soft), M, soft, ACT[act], labels, None, False)
    assert ref[3].tolist() == out[3].tolist()


@NUMPY_INF_WARNING
def test_bad_counts_skip_ignored_and_out_of_range_voxels():
    # bad = [labels outside [0, C) other than ignore_index, non-finite entries of the other voxels]
    C, N = 3, 40
    x, t = _make(1, C, N, act="softmax", labels=True, seed=41)
    t[0, 0] = 7  # out of range: counted in bad[0] only, even with a NaN logit
    t[0, 1] = -100  # ignored: never counted
    t[0, 2] = 1
    x[0, 0, 0] = float("nan")
    x[0, 1, 1] = float("nan")
    x[0, 2, 2] = float("inf")  # used voxel: all C probabilities NaN
    for M in (5, 200):
        for soft in (False, True):
            count, sum_p, sum_y, bad = tb.binned_stats(x, t, _edges(M, soft), M, soft, 1, True, -100, False)
            assert bad.dtype == torch.int64 and bad.shape == (2,) and bad.device == x.device
            assert bad.tolist() == [1, C], (M, soft, bad.tolist())
            assert abs(float(count.sum()) - C * (N - 3)) < 1e-3
            g = tb.binned_stats_backward(count, sum_p, sum_y, x, t, _edges(M, soft), M, soft, 1, True, -100, False)
            assert bool((g[0, :, :3] == 0).all()) and bool(torch.isfinite(g).all())
    # dense target: bad[0] is always 0
    xd = torch.rand(1, 2, 30, device=DEVICE)
    xd[0, 1, 4] = float("-inf")
    out = tb.binned_stats(xd, torch.rand_like(xd), _edges(5, False), 5, False, 0, False, None, False)
    assert out[3].tolist() == [0, 1]


def test_chunked_softmax_with_a_chunk_of_minus_inf_logits():
    # C = 40: classes 0-31 form the first chunk. All -inf there and finite logits in the second chunk: p = 0 for
    # the first 32 classes, a normal softmax over the rest (an online normaliser must not turn it into NaN)
    x, t = _make(1, 40, 20, act="softmax", labels=True, seed=43)
    x[0, :32, :5] = float("-inf")
    t[0, :5] = 35
    for soft in (False, True):
        out, ref, gk, gr = _run_both(x, t, 5, soft, "softmax", True, None, False)
        assert out[3].tolist() == [0, 0]
        _check_stats(out, ref, f"-inf chunk {soft=}", soft, "softmax")
        _check_grad(gk, gr, torch.float32, f"-inf chunk {soft=}")


def test_num_bins_cap_is_checked_by_the_kernel_op():
    # the documented cap num_bins <= 2**24 (checked in Python first; the op keeps its own guard)
    x, t = _make(1, 2, 10, act="softmax", labels=True)
    with pytest.raises(ValueError, match="num_bins"):
        tb.binned_stats(x, t, _edges(5, False), 2**24 + 1, False, 1, True, None, False)


@pytest.mark.parametrize("M", [5, 100], ids=["register", "scatter"])
def test_no_classes_gives_empty_statistics(M):
    # C = 0 at the op level (the Python API rejects it before): empty (B, 0, M) statistics and zero `bad`
    x = torch.zeros(2, 0, 7, device=DEVICE)
    t = torch.zeros(2, 7, dtype=torch.int64, device=DEVICE)
    count, sum_p, sum_y, bad = tb.binned_stats(x, t, _edges(M, False), M, False, 1, True, None, False)
    assert count.shape == sum_p.shape == sum_y.shape == (2, 0, M) and count.dtype == torch.float32
    assert bad.shape == (2,) and bad.dtype == torch.int64 and bad.tolist() == [0, 0]
    g = tb.binned_stats_backward(count, sum_p, sum_y, x, t, _edges(M, False), M, False, 1, True, None, False)
    assert g.shape == (2, 0, 7)


# ---- launching: interpreted kernels never go through torch.library.wrap_triton -------------------------------


def test_interpreted_kernels_launch_without_wrap_triton(monkeypatch):
    # torch <= 2.12's wrap_triton raises on interpreted kernels, so the interpreter path must launch them
    # directly; compiled kernels must keep going through it (torch.compile traces the triton_op through it).
    calls = []
    real = tb.wrap_triton

    def spy(kernel):
        calls.append(kernel)
        if INTERPRET:
            raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")
        return real(kernel)

    monkeypatch.setattr(tb, "wrap_triton", spy)
    monkeypatch.setattr(torch.library, "wrap_triton", spy)
    x, t = _make(1, 3, 20, act="softmax", labels=True, seed=3)
    for M in (5, 100):  # register and scatter forward, and the backward
        xk = x.clone().requires_grad_()
        out = tb.binned_stats(xk, t, _edges(M, True), M, True, 1, True, None, False)
        out[1].sum().backward()
        assert xk.grad is not None and out[0].shape == (1, 3, M)
    assert (len(calls) == 0) if INTERPRET else (len(calls) >= 3)


@pytest.mark.skipif(not INTERPRET, reason="interpreter only")
def test_interpreter_gets_0d_scalar_arguments():
    # Triton <= 3.6's interpreter calls int() on one-element arrays for range(C), which numpy >= 2.4 rejects; the
    # op passes 0-d scalars instead (int32 when the value fits, int64 otherwise)
    vals = tb._interpreter_scalars(5, -3, 2**31, -(2**40))
    assert [v.handle.data.ndim for v in vals] == [0, 0, 0, 0]
    assert [int(v.handle.data) for v in vals] == [5, -3, 2**31, -(2**40)]
    assert [str(v.dtype) for v in vals] == ["int32", "int32", "int64", "int64"]
