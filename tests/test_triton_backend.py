"""The Triton backend (calibops::triton_binned_stats / _backward, kernel contract v2) against the reference.

Without a GPU the kernels run on CPU tensors through the Triton interpreter: TRITON_INTERPRET=1 must be set
before triton is imported (tests/conftest.py does it; it is repeated here so this module also works alone).
With a GPU the same tests run on CUDA tensors with the compiled kernels. The cross-backend comparison over every
option lives in tests/test_conformance.py; this file checks the Triton kernels themselves on small cases (every
mode, R = 1 / 3 raters, moments, both schemes, activations, dtypes, grad_output != 1, the scatter kernel) and
what only Triton has (launch configurations, register vs scatter kernel, interpreter workarounds).

Tolerances (from the float64-accumulating reference, which bins the same float32 q):
- statistics: the kernel sums float32 values in float32 (blocked), the reference sums them in float64 and
  rounds once, so the error is a few float32 ulps of the largest partial sum: rtol 1e-5 relative to the
  bin's magnitude (|stat| + count, a bound on the summed absolute values of every statistic, moments included
  since |q| <= 1 and 0 <= y <= 1), for every input dtype (inputs are read exactly in their own dtype and
  converted to float32 by both sides).
- gradients: computed in float32 and rounded once to the input dtype; the float32 error is a few ulps of the
  largest term of the chain rule, so per element rtol(dtype) + atol = 1e-5 * max|grad| with rtol from
  ``GRAD_RTOL`` (float32 1e-5 over ~1e-7 seen; float16 2^-10 and bfloat16 2^-7: one rounding of the output).
- from logits: the kernel's softmax/sigmoid is not torch's (compiled: ``ex2.approx`` and ``div.full``;
  interpreted: NumPy's exp), so p may differ from the reference's by a few float32 ulps (docs/kernel_contract.md,
  "Kinks"). Hard bins: ``_run_both`` redraws the logits of voxels whose float64 probability (any class, so the
  top-label confidence too) lies within ``EDGE_MARGIN`` = 1e-5 of an inner edge. Soft bins: memberships have
  slope ~M in p, so statistics get a slack of count * M * 4 eps32. Top-label ties between two classes within a
  few ulps have probability ~1e-6 per voxel with these random logits; exact ties are tested with probabilities.
"""

from __future__ import annotations

import importlib
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import calibops.functional as F  # noqa: E402
from calibops.contract import OpCall  # noqa: E402
from calibops.reference import bin_centres, bin_edges, binned_stats_prepared, scheme_edges  # noqa: E402

from . import _oracle  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"

pytest.importorskip("calibops.backends.triton")
tb = importlib.import_module("calibops.backends.triton.binned_stats")  # the module (the package exports the op)
L = importlib.import_module("calibops.backends.triton.launch")
K = importlib.import_module("calibops.backends.triton.kernels")

# Every distinct constexpr/dtype combination is a separate Triton compile on a GPU (~1 s each on a fresh
# machine); the interpreter has no such cost. Parameter sets marked with this run on CPU always and on a GPU
# only without `-m "not slow"` (the GPU check script's quick pass keeps the softmax and core-option cases).
SLOW_ON_GPU = pytest.mark.slow if torch.cuda.is_available() else ()

GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
STAT_RTOL = 1e-5
ACT = {"none": 0, "softmax": 1, "sigmoid": 2}
SCHEME = {"hard": 0, "soft": 1}
MODE = {"marginal": 0, "top": 1}
LABELS, DENSE = 0, 1
EDGE_MARGIN = 1e-5
NAMES = ("count", "sum_p", "sum_y", "sum_p2", "sum_py")


def test_kernels_are_interpreted_on_cpu_and_compiled_on_gpu():
    # On a CPU-only machine the kernels only run if triton was imported with TRITON_INTERPRET=1.
    assert tb.INTERPRETED == INTERPRET, (
        "calibops.backends.triton was imported before TRITON_INTERPRET was set (or set on a GPU machine); "
        "set it in tests/conftest.py before anything imports triton"
    )


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _make(
    B,
    C,
    N,
    *,
    act,
    kind=LABELS,
    R=1,
    dtype=torch.float32,
    target_dtype=None,
    soft_target=True,
    ignore_index=None,
    bad_labels=False,
    seed=0,
):
    """Input [B, C, N] (probabilities when act == "none") and target: [B, R, N] labels or [B, C, N] dense."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, N, generator=g) * 2
    if act == "none":
        x = torch.softmax(x, 1) if C > 1 else torch.rand(B, C, N, generator=g)
    x = x.to(dtype)
    if kind == LABELS:
        lo, hi = (-2, C + 2) if bad_labels else (0, C)
        t = torch.randint(lo, hi, (B, R, N), generator=g)
        if ignore_index is not None:
            t[torch.rand(B, R, N, generator=g) < 0.1] = ignore_index
        t = t.to(target_dtype or torch.int64)
    else:
        if soft_target:
            t = torch.rand(B, C, N, generator=g)
        else:
            t = torch.nn.functional.one_hot(torch.randint(0, C, (B, N), generator=g), C).permute(0, 2, 1)
        td = target_dtype or torch.float32
        t = (t > 0.5) if td == torch.bool else t.to(td)
    return x.to(DEVICE), t.to(DEVICE)


def _edges(num_bins, scheme):
    return scheme_edges(num_bins, scheme, DEVICE)


def _op(x, t, M, scheme, act, kind, mode=0, moments=False, ignore_index=None, right=False):
    return tb.binned_stats(x, t, _edges(M, scheme), M, scheme, act, kind, mode, moments, ignore_index, right)


def _check_stats(out, ref, label="", soft=False, act=0):
    assert len(out) == 6
    rc = ref[0].double()
    # Soft memberships have slope 1/(c[j+1]-c[j]) ~ M in p: the kernel's softmax/sigmoid and torch's differ by
    # a few float32 ulps (<= 4 eps32 for p <= 1), which moves each entry's weights by up to M * 4 eps32.
    slack = 0.0
    if soft and act != 0:
        slack = rc.sum(-1, keepdim=True) * rc.shape[-1] * 4 * torch.finfo(torch.float32).eps
    for name, a, r in zip(NAMES, out[:5], ref[:5]):
        assert a.dtype == torch.float32 and a.shape == r.shape, (name, a.dtype, a.shape, r.shape)
        assert a.is_contiguous(), name
        if r.numel() == 0:
            continue
        cnt, sl = (
            (rc.unsqueeze(2), slack.unsqueeze(2) if torch.is_tensor(slack) else slack)
            if name == "sum_y"
            else (rc, slack)
        )
        scale = r.double().abs() + cnt.abs()
        err = (a.double() - r.double()).abs()
        worst = (err - STAT_RTOL * scale - sl).max().item()
        assert worst <= 1e-6, f"{label} {name}: max error {err.max().item():.3g} exceeds tolerance"
    bad = out[5]
    assert bad.dtype == torch.int64 and bad.shape == (2,), (bad.dtype, bad.shape)  # [bad labels, non-finite p]
    assert bad.tolist() == ref[5].tolist(), f"{label} bad: {bad.tolist()} != {ref[5].tolist()}"


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


def _run_both(x, t, M, scheme, act, kind, mode=0, moments=False, ignore_index=None, right=False, seed=1):
    """Forward and backward (random upstream grads on every statistic, so grad_output != 1) on triton and
    reference. Hard bins from logits: voxels near an inner edge are redrawn first (``_away_from_edges``)."""
    if scheme == 0:
        x = _away_from_edges(x, act, M, seed)
    a = ACT[act]
    xk = x.detach().clone().requires_grad_()
    out = _op(xk, t, M, scheme, a, kind, mode, moments, ignore_index, right)
    xr = x.detach().float().clone().requires_grad_()
    ref = binned_stats_prepared(xr, t, _edges(M, scheme), M, scheme, a, kind, mode, moments, ignore_index, right)
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(r.shape, generator=g).to(DEVICE) for r in ref[:5]]
    sum((u * o).sum() for u, o in zip(ups, out[:5])).backward()
    sum((u * o).sum() for u, o in zip(ups, ref[:5])).backward()
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


def _check(
    x, t, M, scheme, act, kind, mode=0, moments=False, ignore_index=None, right=False, dtype=torch.float32, label=""
):
    out, ref, gk, gr = _run_both(x, t, M, scheme, act, kind, mode, moments, ignore_index, right)
    _check_stats(out, ref, label, scheme == 1, ACT[act])
    _check_grad(gk, gr, dtype, label)
    return out, ref


# --------------------------------------------------------------------------------------------------------------
# statistics and gradients vs the reference: modes, raters, moments, schemes, activations, targets
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["hard", "soft"])
@pytest.mark.parametrize("act", ["none", "softmax", "sigmoid"])
@pytest.mark.parametrize("target", ["labels-R1", "labels-R3", "dense"])
@pytest.mark.parametrize("mode", ["marginal", "top"])
def test_every_mode_target_and_scheme_with_moments(scheme, act, target, mode):
    kind = DENSE if target == "dense" else LABELS
    R = 3 if target == "labels-R3" else 1
    s, m = SCHEME[scheme], MODE[mode]
    seed = 7 * s + 3 * ACT[act] + 11 * m + R
    x, t = _make(2, 5, 45, act=act, kind=kind, R=R, ignore_index=-1 if kind == LABELS else None, seed=seed)
    _check(
        x,
        t,
        5,
        s,
        act,
        kind,
        m,
        True,
        -1 if kind == LABELS else None,
        right=bool(m),
        label=f"{scheme} {act} {target} {mode}",
    )


@pytest.mark.parametrize("scheme", ["hard", "soft"])
@pytest.mark.parametrize("mode", ["marginal", "top"])
@pytest.mark.parametrize("R", [1, 3])
def test_moments_off_gives_empty_moments(scheme, mode, R):
    x, t = _make(2, 4, 30, act="softmax", R=R, seed=R)
    out, ref = _check(x, t, 5, SCHEME[scheme], "softmax", LABELS, MODE[mode], False, label="moments off")
    assert out[3].shape == out[4].shape == (0,)
    K = 4 if mode == "marginal" else 1
    assert out[0].shape == (2, K, 5) and out[2].shape == (2, K, R, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("scheme", ["hard", "soft"])
@pytest.mark.parametrize("mode", ["marginal", "top"])
def test_half_inputs_read_in_own_dtype(dtype, scheme, mode):
    act = "softmax" if mode == "top" else "sigmoid"
    x, t = _make(2, 3, 61, act=act, dtype=dtype, R=2, seed=7)
    _check(x, t, 20, SCHEME[scheme], act, LABELS, MODE[mode], True, dtype=dtype, label=f"{dtype} {scheme} {mode}")
    xp, tp = _make(1, 3, 40, act="none", dtype=dtype, seed=8)
    _check(xp, tp, 20, SCHEME[scheme], "none", LABELS, MODE[mode], True, dtype=dtype, label=f"{dtype} probs")


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(label_dtype):
    x, t = _make(1, 4, 50, act="softmax", R=3, target_dtype=label_dtype, seed=3)
    for mode in (0, 1):
        _check(x, t, 5, 0, "softmax", LABELS, mode, mode == 1, label=str(label_dtype))


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8])
@pytest.mark.parametrize("scheme", ["hard", "soft"])
def test_dense_target_dtypes(target_dtype, scheme):
    soft_target = target_dtype.is_floating_point
    x, t = _make(2, 3, 40, act="sigmoid", kind=DENSE, target_dtype=target_dtype, soft_target=soft_target, seed=5)
    for mode in (0, 1):
        _check(x, t, 5, SCHEME[scheme], "sigmoid", DENSE, mode, True, label=f"{target_dtype} {mode=}")


@pytest.mark.parametrize("ignore_index,label_dtype", [(-100, torch.int64), (255, torch.uint8), (0, torch.int32)])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("mode", ["marginal", "top"])
def test_ignore_index_and_bad_labels_per_rater(ignore_index, label_dtype, R, mode):
    # a voxel is used only when every rater's label is in [0, C) and != ignore_index; labels outside [0, C) that
    # are not ignore_index are counted in bad[0] over all raters (uint8 cannot hold the negative ones)
    x, t = _make(
        2, 4, 70, act="softmax", R=R, ignore_index=ignore_index, bad_labels=label_dtype != torch.uint8, seed=11 + R
    )
    t = t.to(label_dtype)
    for scheme in (0, 1):
        out, ref, gk, gr = _run_both(x, t, 5, scheme, "softmax", LABELS, MODE[mode], True, ignore_index)
        _check_stats(out, ref, f"ignore_index={ignore_index} {R=}", scheme == 1, 1)
        _check_grad(gk, gr, torch.float32, f"ignore_index={ignore_index} {R=}")
        tl_ = t.long()
        skipped = ((tl_ == ignore_index) | (tl_ < 0) | (tl_ >= 4)).any(1)  # [B, N]
        assert bool(skipped.any()) and not bool(skipped.all())
        assert bool((gk.permute(0, 2, 1)[skipped] == 0).all()), "unused voxels must get zero gradient"
        expect_bad = int((((tl_ < 0) | (tl_ >= 4)) & (tl_ != ignore_index)).sum())
        assert out[5].tolist()[0] == expect_bad


@pytest.mark.parametrize(
    "B,C,N,M",
    [(1, 1, 1, 1), (3, 1, 33, 5), (1, 2, 1025, 20), (2, 17, 19, 5), (1, 33, 23, 5), (2, 40, 11, 20), (1, 3, 5, 64)],
    ids=["tiny", "C1", "N1025", "C17", "C33-chunks", "C40-chunks", "M64"],
)
@pytest.mark.parametrize("scheme", ["hard", "soft"])
@pytest.mark.parametrize("mode", ["marginal", "top"])
def test_odd_shapes_and_many_classes(B, C, N, M, scheme, mode):
    # C > 32 exercises the class-chunk paths (online softmax normaliser; top-label's running argmax over chunks)
    ignore = C - 1 if C > 2 else None
    R = 2 if mode == "top" else 1
    x, t = _make(B, C, N, act="softmax", R=R, ignore_index=ignore, seed=B * 1000 + C + N)
    _check(x, t, M, SCHEME[scheme], "softmax", LABELS, MODE[mode], mode == "top", ignore, label=f"{B=} {C=} {N=} {M=}")
    xp, tp = _make(B, C, N, act="none", kind=DENSE, seed=C + N)
    out, ref = _check(xp, tp, M, SCHEME[scheme], "none", DENSE, MODE[mode], True, label=f"probs {B=} {C=} {N=}")
    if scheme == "hard":
        assert torch.equal(out[0], ref[0]), "hard counts of probabilities must be exact"


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
    for scheme in (0, 1):
        for mode in (0, 1):  # C = 1: the top-label confidence is p itself
            out, ref = _check(
                x, t, num_bins, scheme, "none", DENSE, mode, True, right=right, label=f"edges {scheme=} {mode=}"
            )
            assert scheme == 1 or torch.equal(out[0], ref[0]), "hard counts must be exact"


def test_top_label_ties_go_to_the_lowest_class():
    # exact float32 ties between classes (probabilities given directly): a = the first maximum, as torch.argmax
    p = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.45, 0.45], [0.3, 0.3, 0.3], [0.25, 0.5, 0.25]]).T.contiguous()
    x = p.unsqueeze(0).repeat(1, 1, 5).to(DEVICE)  # [1, 3, 20]
    n = x.shape[-1]
    for labels_of in (0, 1, 2):
        t = torch.full((1, 2, n), labels_of, dtype=torch.int64, device=DEVICE)
        out, ref = _check(x, t, 4, 0, "none", LABELS, 1, True, label=f"ties label {labels_of}")
        assert torch.equal(out[2], ref[2])
    # dense: y = target[a]
    td = torch.rand(1, 3, n, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    _check(x, td, 4, 1, "none", DENSE, 1, True, label="ties dense")
    # the gradient goes to the predicted class only
    xk = x.clone().requires_grad_()
    _op(xk, t, 4, 0, 0, LABELS, 1)[1].sum().backward()
    a = x.argmax(1)
    expect = torch.zeros_like(x).scatter_(1, a.unsqueeze(1), 1.0)
    assert torch.equal(xk.grad, expect)


@pytest.mark.parametrize("fill", [0, 1])
def test_full_tiles_of_one_label_are_exact(fill):
    # count and sum_y of label tiles are carried packed in one float per tile: full tiles of 1s are the extreme
    N = 5000
    x = torch.full((1, 2, N), 0.3, device=DEVICE)
    x[0, 1] = 0.7
    t = torch.full((1, 1, N), fill, dtype=torch.int64, device=DEVICE)
    count, sum_p, sum_y, _, _, _ = _op(x, t, 5, 0, 0, LABELS)
    expect = torch.zeros(1, 2, 5, device=DEVICE)
    expect[0, 0, 1] = N
    expect[0, 1, 3] = N
    assert torch.equal(count, expect)
    assert float(sum_y[0, fill].sum()) == N and float(sum_y[0, 1 - fill].sum()) == 0
    count, _, sum_y, _, _, _ = _op(x, t, 5, 0, 0, LABELS, mode=1)  # top-label: q = 0.7, a = 1
    assert float(count[0, 0, 3]) == N and float(sum_y[0, 0, 0, 3]) == (N if fill == 1 else 0)


@pytest.mark.parametrize("stat", [1, 2, 3, 4], ids=["sum_p", "sum_y", "sum_p2", "sum_py"])
def test_grad_of_single_statistic(stat):
    # gradient flowing from one statistic only (the autograd glue passes zeros for the others)
    for mode, R in ((0, 3), (1, 2)):
        x, t = _make(2, 4, 30, act="softmax", R=R, seed=2 + stat)
        e = _edges(5, 1)
        xk = x.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        w = torch.linspace(-2.0, 3.5, 5, device=DEVICE)  # per-bin weights (a constant would cancel in softmax)
        (tb.binned_stats(xk, t, e, 5, 1, 1, LABELS, mode, True, None, False)[stat] * w).sum().backward()
        (binned_stats_prepared(xr, t, e, 5, 1, 1, LABELS, mode, True, None, False)[stat] * w).sum().backward()
        _check_grad(xk.grad, xr.grad, torch.float32, f"stat {stat} {mode=}")


@pytest.mark.parametrize("mode", [0, 1])
def test_empty_volume(mode):
    x = torch.zeros(2, 3, 0, device=DEVICE)
    t = torch.zeros(2, 2, 0, dtype=torch.int64, device=DEVICE)
    out = _op(x, t, 4, 0, 1, LABELS, mode, True)
    K = 3 if mode == 0 else 1
    assert out[0].shape == (2, K, 4) and out[2].shape == (2, K, 2, 4) and out[3].shape == (2, K, 4)
    assert not any(bool(o.any()) for o in out[:5]) and out[5].tolist() == [0, 0]
    g = tb.binned_stats_backward(*out[:5], x, t, _edges(4, 0), 4, 0, 1, LABELS, mode, True, None, False)
    assert g.shape == x.shape


@pytest.mark.parametrize("M", [5, 100], ids=["register", "scatter"])
@pytest.mark.parametrize("mode", [0, 1])
def test_no_classes_gives_empty_statistics(M, mode):
    # C = 0 at the op level (the Python API rejects it before): marginal (B, 0, M) statistics, top-label zero
    # (B, 1, M) statistics, zero `bad`
    x = torch.zeros(2, 0, 7, device=DEVICE)
    t = torch.zeros(2, 1, 7, dtype=torch.int64, device=DEVICE)
    out = _op(x, t, M, 0, 1, LABELS, mode, True)
    ref = binned_stats_prepared(x, t, _edges(M, 0), M, 0, 1, LABELS, mode, True, None, False)
    for a, r in zip(out, ref):
        assert a.shape == r.shape and a.dtype == r.dtype and torch.equal(a, r)
    g = tb.binned_stats_backward(*out[:5], x, t, _edges(M, 0), M, 0, 1, LABELS, mode, True, None, False)
    assert g.shape == (2, 0, 7)


@pytest.mark.parametrize("M", [20, 1000], ids=["register", "scatter"])
def test_deterministic_bitwise(M):
    # on a GPU, several programs per image and partial rows read back tile after tile (the interpreter runs
    # programs one after the other, so a smaller volume suffices there)
    x, t = _make(2, 5, 70 if INTERPRET else 30_000, act="softmax", R=3, seed=4)
    for scheme in (0, 1):
        for mode in (0, 1):
            e = _edges(M, scheme)
            a = tb.binned_stats(x, t, e, M, scheme, 1, LABELS, mode, True, None, False)
            b = tb.binned_stats(x, t, e, M, scheme, 1, LABELS, mode, True, None, False)
            for u, v in zip(a, b):
                assert torch.equal(u, v), f"{M=} {scheme=} {mode=}"
            if M == 20:
                g1 = tb.binned_stats_backward(*a[:5], x, t, e, M, scheme, 1, LABELS, mode, True, None, False)
                g2 = tb.binned_stats_backward(*a[:5], x, t, e, M, scheme, 1, LABELS, mode, True, None, False)
                assert torch.equal(g1, g2)


def test_any_strides_accepted():
    # the op makes input, target and upstream gradients contiguous itself (docs/kernel_contract.md)
    x, t = _make(2, 3, 40, act="softmax", R=3, seed=13)
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)  # [B, C, N] with strides (C*N, 1, C)
    ts = torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]  # [B, R, N] with stride 2 along N
    assert not xs.is_contiguous() and not ts.is_contiguous() and torch.equal(ts, t)
    for mode in (0, 1):
        a = _op(x, t, 5, 1, 1, LABELS, mode, True)
        b = _op(xs, ts, 5, 1, 1, LABELS, mode, True)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        grads = [torch.randn(o.shape, device=DEVICE) for o in a[:5]]
        gs = [torch.stack([u, u], dim=-1).flatten(-2)[..., ::2] for u in grads]
        assert not gs[0].is_contiguous() and all(torch.equal(u, v) for u, v in zip(gs, grads))
        args = (_edges(5, 1), 5, 1, 1, LABELS, mode, True, None, False)
        g1 = tb.binned_stats_backward(*grads, x, t, *args)
        g2 = tb.binned_stats_backward(*gs, xs, ts, *args)
        assert torch.equal(g1, g2)


def test_many_programs_partial_merge():
    # more tiles than one program takes (forces several partial histograms per image, merged over P)
    cfg = L.launch_config(1, 2, 300_000, 5, DEVICE)
    assert cfg["P"] > 1 or DEVICE.type == "cpu"
    x, t = _make(1, 2, 20_000 if INTERPRET else 300_000, act="sigmoid", kind=DENSE, seed=9)
    _check(x, t, 5, 0, "sigmoid", DENSE, 0, True, label="many programs")


# --------------------------------------------------------------------------------------------------------------
# launch heuristic
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 2, 3, 4, 16, 17, 32, 33, 100])
def test_launch_config_heuristic(C):
    cfg = L.launch_config(2, C, 7_225_344, 20, torch.device("cpu"))
    assert cfg["C_BLOCK"] == min(triton.next_power_of_2(C), L.MAX_C_BLOCK) == cfg["K_BLOCK"]
    assert cfg["num_cc"] * cfg["C_BLOCK"] >= C and cfg["GRID_CC"] == cfg["num_cc"]
    assert cfg["P"] * cfg["tiles_per_prog"] * cfg["BLOCK_N"] >= 7_225_344
    assert cfg["tiles_per_prog"] <= L.MAX_TILES_PER_PROG
    assert cfg["M_PAD"] == 32
    bw = L.launch_config(2, C, 7_225_344, 20, torch.device("cpu"), backward=True)
    assert bw["P"] * bw["tiles_per_prog"] * bw["BLOCK_N"] >= 7_225_344
    # top-label: one histogram row per program, one program over all class chunks, the same probability tile
    top = L.launch_config(2, C, 7_225_344, 20, torch.device("cpu"), mode=1)
    assert top["K_BLOCK"] == 1 and top["GRID_CC"] == 1 and top["num_cc"] == cfg["num_cc"]
    assert top["C_BLOCK"] == cfg["C_BLOCK"] and top["BLOCK_N"] == cfg["BLOCK_N"]
    assert top["P"] * top["tiles_per_prog"] * top["BLOCK_N"] >= 7_225_344
    # marginal with several raters or moments: half the forward tile (more histogram planes per row); top-label
    # keeps its tile, the backward too
    for kw in (dict(raters=3), dict(moments=True)):
        half = L.launch_config(2, C, 7_225_344, 20, torch.device("cpu"), **kw)
        assert half["BLOCK_N"] == max(16, cfg["BLOCK_N"] // 2)
        assert L.launch_config(2, C, 7_225_344, 20, torch.device("cpu"), mode=1, **kw)["BLOCK_N"] == top["BLOCK_N"]
        assert L.launch_config(2, C, 7_225_344, 20, torch.device("cpu"), backward=True, **kw) == bw


def _call(num_bins, scheme, activation, target_kind, mode, moments):
    """The scalar part of an op call (what the launcher's flags read)."""
    return OpCall(None, None, None, num_bins, scheme, activation, target_kind, mode, moments, None, False)


def test_flags_specialise_new_features_at_compile_time():
    # the v1 configuration (marginal, one rater, no moments) is one constexpr setting of the v2 kernels
    cfg = L.launch_config(2, 4, 1000, 20, torch.device("cpu"))
    f = L.flags(cfg, _call(20, 0, 1, LABELS, 0, False), 1)
    assert (f["MODE"], f["MOMENTS"], f["NUM_RATERS"], f["R_PAD"], f["ONE_BIN"], f["PACKED"]) == (
        0,
        False,
        1,
        1,
        True,
        True,
    )
    f3 = L.flags(cfg, _call(20, 1, 1, LABELS, 1, True), 3)
    assert (f3["MODE"], f3["MOMENTS"], f3["NUM_RATERS"], f3["R_PAD"], f3["ONE_BIN"], f3["PACKED"]) == (
        1,
        True,
        3,
        4,
        False,
        False,
    )
    kernel_args = set(K._stats_fwd_kernel.arg_names)
    assert {k for k in f if k != "num_warps"} <= kernel_args
    bw_cfg = L.launch_config(2, 4, 1000, 20, torch.device("cpu"), backward=True)
    bw = L.flags(bw_cfg, _call(20, 0, 1, LABELS, 0, False), 1, backward=True)
    assert {k for k in bw if k != "num_warps"} <= set(K._stats_bwd_kernel.arg_names)


# The interpreter accepts code that the compiler rejects (and never allocates registers): every kernel is also
# compiled for sm_90 with the op's own launch arguments, in a process without TRITON_INTERPRET (no GPU needed,
# Triton's bundled ptxas). One variant per kernel and feature: modes, raters, moments, schemes, dense targets,
# class chunks, the scatter kernel.
_COMPILE_SCRIPT = """
import importlib, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from calibops.contract import OpCall
tb = importlib.import_module("calibops.backends.triton.binned_stats")
L = importlib.import_module("calibops.backends.triton.launch")
K = importlib.import_module("calibops.backends.triton.kernels")
assert not tb.INTERPRETED
N, target = 224 * 224 * 144, GPUTarget("cuda", 90, 32)
for C, scheme, mode, moments, R, kernel, M, kind in VARIANTS:
    bw = kernel == "bwd"
    cfg = L.launch_config(2, C, N, M, torch.device("cpu"), backward=bw, mode=mode, raters=R, moments=moments)
    fn = K._stats_bwd_kernel if bw else K._stats_fwd_kernel
    call = OpCall(None, None, None, M, scheme, 1, kind, mode, moments, None, False)
    consts = L.flags(cfg, call, R, backward=bw)
    num_warps = consts.pop("num_warps")
    ints = dict(C=C, N=N, P=cfg["P"], tiles_per_prog=cfg["tiles_per_prog"], ignore_index=0, has_ignore=0, right=0)
    dt = {"x_ptr": torch.bfloat16, "gx_ptr": torch.bfloat16, "t_ptr": torch.int64 if kind == 0 else torch.float32,
          "part_ptr": torch.float64 if cfg["SCATTER"] else torch.float32, "cnt_ptr": torch.int64}
    kw = {a: consts[a] if a in consts else ints[a] if a in ints else torch.empty(64, dtype=dt.get(a, torch.float32))
          for a in fn.arg_names}
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(**kw, num_warps=num_warps)
    options, sig, cx, attrs = fn._pack_args(backend, {"num_warps": num_warps}, bound, spec, options)
    k = triton.compile(ASTSource(fn, sig, cx, attrs), target=target, options=options.__dict__)
    assert len(k.asm["cubin"]) > 0
    print("compiled", fn.__name__, C, scheme, mode, moments, R, kernel, M, kind, flush=True)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    variants = [  # (C, scheme, mode, moments, R, kernel, M, target_kind)
        (4, 0, 0, False, 1, "fwd", 20, 0),  # the v1 configuration
        (16, 1, 1, True, 3, "fwd", 20, 0),
        (40, 1, 0, True, 3, "fwd", 20, 0),
        (4, 0, 1, True, 1, "fwd", 20, 1),
        (4, 1, 1, True, 3, "fwd", 1000, 0),
        (40, 0, 0, True, 1, "fwd", 1000, 1),
        (40, 1, 1, True, 3, "bwd", 20, 0),
        (4, 1, 0, True, 3, "bwd", 20, 0),
        (4, 0, 1, False, 1, "bwd", 20, 1),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    script = f"VARIANTS = {variants!r}\n" + _COMPILE_SCRIPT
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("compiled") == len(variants), res.stdout


# --------------------------------------------------------------------------------------------------------------
# bad arguments (calibops/contract.py: the real op and its fake check alike)
# --------------------------------------------------------------------------------------------------------------


def _bad_calls(x, t, e):
    f = tb.binned_stats
    return [
        (ValueError, "num_bins", lambda: f(x, t, e, 0, 0, 1, 0, 0, False, None, False)),
        (ValueError, "edges", lambda: f(x, t, _edges(4, 1), 4, 0, 1, 0, 0, False, None, False)),
        (ValueError, "activation", lambda: f(x, t, e, 4, 0, 3, 0, 0, False, None, False)),
        (ValueError, "scheme", lambda: f(x, t, e, 4, 2, 1, 0, 0, False, None, False)),
        (ValueError, "mode", lambda: f(x, t, e, 4, 0, 1, 0, 2, False, None, False)),
        (ValueError, "target_kind", lambda: f(x, t, e, 4, 0, 1, 5, 0, False, None, False)),
        (ValueError, "target", lambda: f(x, t[:, :, :5], e, 4, 0, 1, 0, 0, False, None, False)),
        (TypeError, "target", lambda: f(x, t.float(), e, 4, 0, 1, 0, 0, False, None, False)),
        (TypeError, "input", lambda: f(x.double(), t, e, 4, 0, 1, 0, 0, False, None, False)),
        (ValueError, "input", lambda: f(x[0], t, e, 4, 0, 1, 0, 0, False, None, False)),
        (ValueError, "target", lambda: f(x, t, e, 4, 0, 1, DENSE, 0, False, None, False)),
    ]


def test_bad_arguments_name_the_argument():
    x, t = _make(1, 3, 10, act="softmax", R=2)
    e = _edges(4, 0)
    for exc, name, call in _bad_calls(x, t, e):
        with pytest.raises(exc, match=name):
            call()
    out = tb.binned_stats(x, t, e, 4, 0, 1, LABELS, 0, True, None, False)
    grads = [torch.zeros_like(o) for o in out[:5]]
    with pytest.raises(ValueError, match="grad_sum_y"):
        tb.binned_stats_backward(*grads[:2], grads[0], *grads[3:], x, t, e, 4, 0, 1, LABELS, 0, True, None, False)
    with pytest.raises(ValueError, match="grad_sum_p2"):
        tb.binned_stats_backward(
            *grads[:3], grads[0][:0].reshape(0), grads[4], x, t, e, 4, 0, 1, LABELS, 0, True, None, False
        )


def test_fake_kernels_check_like_the_real_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, t = _make(1, 3, 10, act="softmax", R=2)
    e = _edges(4, 0)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, ft, fe = (mode.from_tensor(v) for v in (x, t, e))
        out = tb.binned_stats(fx, ft, fe, 4, 0, 1, LABELS, 1, True, None, False)
        assert [tuple(o.shape) for o in out] == [(1, 1, 4), (1, 1, 4), (1, 1, 2, 4), (1, 1, 4), (1, 1, 4), (2,)]
        for exc, name, call in _bad_calls(fx, ft, fe):
            with pytest.raises(exc, match=name):
                call()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 2.0, -1.0])
@pytest.mark.parametrize("scheme", [0, 1], ids=["hard", "soft"])
def test_invalid_probabilities_stay_in_bounds(value, scheme):
    # validation off: the kernel must still index only its own memory (bins clamped before any gather)
    x, t = _make(1, 2, 20, act="none")
    x[0, 0, 3] = value
    finite = abs(value) != float("inf") and value == value  # non-finite p: left out and counted in bad[1]
    for mode in (0, 1):
        out = _op(x, t, 5, scheme, 0, LABELS, mode, True)
        assert out[0].shape == (1, 2 if mode == 0 else 1, 5)
        assert abs(float(out[0].sum()) - (20 * (2 if mode == 0 else 1) - (0 if finite else 1))) < 1e-3
        assert out[5].tolist() == [0, 0 if finite else 1]
        g = tb.binned_stats_backward(*out[:5], x, t, _edges(5, scheme), 5, scheme, 0, LABELS, mode, True, None, False)
        assert g.shape == x.shape and bool(torch.isfinite(g).all())


# --------------------------------------------------------------------------------------------------------------
# registration: dispatcher, autograd glue, opcheck, torch.compile, autocast
# --------------------------------------------------------------------------------------------------------------


def test_dispatcher_uses_registered_op():
    from calibops.backends import resolve as _backends

    fn = _backends.stats_function("triton")
    assert fn is _backends.stats_function("triton")  # built once
    x, t = _make(1, 3, 20, act="softmax")
    args = (t, scheme_edges(20, 0, DEVICE), 20, 0, 1, 0, 0, False, None, False)
    for got, want in zip(fn(x, *args), torch.ops.calibops.triton_binned_stats(x, *args)):  # no grad: the op itself
        assert torch.equal(got, want)
    xg, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g_eager = torch.autograd.grad(fn(xg, *args)[1].sum(), xg)[0]  # eager: one autograd.Function, same formula
    g_op = torch.autograd.grad(torch.ops.calibops.triton_binned_stats(xo, *args)[1].sum(), xo)[0]
    assert torch.equal(g_eager, g_op)
    assert _backends.resolve_backend("triton", DEVICE) == "triton"


def test_op_schemas_come_from_the_contract():
    # one argument list (calibops/contract.py): the registered schemas name it in order, keywords work
    from calibops.contract import op_signature

    for op, backward in ((tb.binned_stats, False), (tb.binned_stats_backward, True)):
        assert tuple(a.name for a in op.default._schema.arguments) == tuple(op_signature(backward).parameters)
    x, t = _make(1, 3, 20, act="softmax")
    args = (x, t, _edges(5, 0), 5, 0, 1, LABELS, 0, False, None, False)
    keywords = dict(zip(OpCall._fields[3:], args[3:]))
    for got, want in zip(tb.binned_stats(*args[:3], **keywords), tb.binned_stats(*args)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode,R,moments", [(0, 1, False), (1, 3, True)])
def test_opcheck(mode, R, moments):
    x, t = _make(1, 3, 20, act="softmax", R=R)
    for scheme in (0, 1):
        e = _edges(5, scheme)
        args = (t, e, 5, scheme, 1, LABELS, mode, moments, None, False)
        torch.library.opcheck(torch.ops.calibops.triton_binned_stats, (x.clone().requires_grad_(), *args))
        out = tb.binned_stats(x, *args)
        g = [torch.randn(o.shape, device=DEVICE) for o in out[:5]]
        torch.library.opcheck(torch.ops.calibops.triton_binned_stats_backward, (*g, x, *args))


def test_compile_fullgraph():
    x, t = _make(2, 3, 40, act="softmax", R=2, seed=6)
    e = _edges(5, 1)

    def f(x, t):
        count, sum_p, sum_y, sum_p2, sum_py, _ = tb.binned_stats(x, t, e, 5, 1, 1, LABELS, 1, True, None, False)
        return ((sum_p - sum_y.mean(2)).abs() / count.clamp(min=1)).sum() + (sum_p2 - sum_py).sum()

    backend = "aot_eager" if INTERPRET else "inductor"
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    le = f(xe, t)
    le.backward()
    lc = torch.compile(f, fullgraph=True, backend=backend)(xc, t)
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)


def test_autocast_passes_input_dtype_through():
    x, t = _make(1, 3, 40, act="softmax", dtype=torch.float16, seed=8)
    plain = _op(x, t, 5, 0, 1, LABELS, 1, True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16 if INTERPRET else torch.float16):
        auto = _op(x, t, 5, 0, 1, LABELS, 1, True)
    for a, b in zip(plain, auto):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# end to end through the public API (shared epilogue), including grad_output != 1 and the float64 oracle
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binning", ["hard", "soft"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(softmax=True, to_onehot_y=True),
        dict(sigmoid=True, to_onehot_y=False, include_background=False),
        dict(softmax=True, to_onehot_y=True, ignore_index=2, reduction="none"),
        dict(to_onehot_y=True, reduction="sum", right=True, ignore_empty_classes=False),
    ],
    ids=["softmax-labels", "sigmoid-dense", "ignore-none", "probs-sum-right"],
)
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
        x.cpu().numpy(),
        target.cpu().numpy(),
        num_bins=5,
        binning=binning,
        act=act,
        grad_output=up.cpu().numpy(),
        **{k: opts[k] for k in keys if k in opts},
    )
    torch.testing.assert_close(losses["triton"].cpu().double(), torch.as_tensor(value), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["triton"].cpu().double(), torch.as_tensor(gx), rtol=1e-3, atol=1e-6)


def test_public_api_top_label_and_raters_match_reference():
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 4, 6, 5, generator=g).to(DEVICE)
    raters = torch.randint(0, 4, (2, 3, 6, 5), generator=g).to(DEVICE)
    for kw in (dict(mode="top_label", moments=True), dict(multi_rater=True, moments=True)):
        res = {
            b: F.binned_stats(
                x,
                raters if kw.get("multi_rater") else raters[:, 0],
                num_bins=7,
                softmax=True,
                to_onehot_y=True,
                backend=b,
                **kw,
            )
            for b in ("triton", "reference")
        }
        for name in NAMES:
            a, r = getattr(res["triton"], name), getattr(res["reference"], name)
            assert a.shape == r.shape, (kw, name)
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# the scatter kernel (num_bins > MAX_REGISTER_BINS) and its agreement with the register kernel
# --------------------------------------------------------------------------------------------------------------


def _expect_scatter(M):
    cfg = L.launch_config(1, 3, 1000, M, DEVICE)
    assert cfg["SCATTER"] == (M > L.MAX_REGISTER_BINS), cfg
    return cfg


def test_scatter_kernel_chosen_above_max_register_bins(monkeypatch):
    assert L.MAX_REGISTER_BINS == 64
    assert not L.launch_config(1, 3, 1000, 64, DEVICE)["SCATTER"]
    assert L.launch_config(1, 3, 1000, 65, DEVICE)["SCATTER"]
    assert L.launch_config(1, 3, 1000, 65, DEVICE, mode=1)["SCATTER"]
    assert not L.launch_config(1, 3, 1000, 2**24, DEVICE, backward=True)["SCATTER"]  # one backward for any M
    monkeypatch.setenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", "0")
    assert L.launch_config(1, 3, 1000, 1, DEVICE)["SCATTER"]
    monkeypatch.setenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", "-1")
    with pytest.raises(ValueError, match="CALIBOPS_TRITON_MAX_REGISTER_BINS"):
        L.launch_config(1, 3, 1000, 5, DEVICE)


@pytest.mark.parametrize("C", [1, 2, 3, 8, 16, 32, 40])
def test_scatter_work_per_element_does_not_depend_on_num_bins(C):
    import inspect

    # Structural: the scatter kernel's tile (the all-pairs grouping is K_BLOCK * BLOCK_N**2 per tile) and the
    # tiles a program walks are the same for every M above the switch, up to the documented cap 2**24; only P
    # shrinks (P * M <= N keeps the float64 partial rows within the input's size).
    N = 7_225_344
    for mode in (0, 1):
        Ms = (65, 1000, 4097, 100_000, 2**24)
        cfgs = [L.launch_config(2, C, N, M, torch.device("cpu"), mode=mode) for M in Ms]
        for cfg, M in zip(cfgs, Ms):
            assert cfg["SCATTER"]
            assert cfg["K_BLOCK"] * cfg["BLOCK_N"] ** 2 <= L.SCATTER_PAIRS
            assert 8 <= cfg["BLOCK_N"] <= L.SCATTER_MAX_N and cfg["BLOCK_N"] == cfgs[0]["BLOCK_N"]
            assert cfg["P"] * cfg["tiles_per_prog"] * cfg["BLOCK_N"] >= N
            assert cfg["P"] <= max(1, N // M)
    for helper in (K._scatter_tile, K._scatter_round):  # the forward kernel's SCATTER path, per tile
        src = inspect.getsource(getattr(helper, "fn", helper))
        assert "range(NUM_BINS)" not in src and "M_PAD" not in src, "the scatter path must not loop over the bins"


def test_scatter_kernel_time_does_not_grow_with_num_bins():
    # Before the scatter kernel, the interpreter took 0.09 s at M=20, 3.2 s at M=1000 and did not finish M=100000
    # in 10 minutes (64 voxels). Same input, M=65 vs 4096 vs 100000: the forward time may not grow like M (a
    # factor of 1500 here); allowed: 3x plus 1 s for the (B, C, M) output and partial rows and a loaded machine.
    import time

    x, t = _make(1, 4, 64, act="softmax", seed=31)
    times = {}
    for M in (65, 4096, 100_000):
        if not INTERPRET:
            _op(x, t, M, 1, 1, LABELS)  # warm-up: compile
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            out = _op(x, t, M, 1, 1, LABELS)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        assert abs(float(out[0].sum()) - 4 * 64) < 1e-3
        times[M] = best
    assert times[100_000] <= 3 * times[65] + 1.0, times
    assert times[4096] <= 3 * times[65] + 1.0, times


@pytest.mark.parametrize(
    "M,scheme,act,target,mode",
    [
        (1000, "hard", "softmax", "labels-R1", "marginal"),
        (1000, "soft", "softmax", "labels-R3", "marginal"),
        (1000, "hard", "softmax", "labels-R3", "top"),
        (1000, "soft", "sigmoid", "dense", "top"),
        pytest.param(4097, "hard", "sigmoid", "dense", "marginal", marks=SLOW_ON_GPU),
        pytest.param(4097, "soft", "none", "dense", "marginal", marks=SLOW_ON_GPU),
        pytest.param(100_000, "hard", "none", "labels-R1", "top", marks=SLOW_ON_GPU),
        pytest.param(100_000, "soft", "softmax", "labels-R1", "top", marks=SLOW_ON_GPU),
    ],
)
def test_many_bins_match_reference(M, scheme, act, target, mode):
    _expect_scatter(M)
    kind = DENSE if target == "dense" else LABELS
    R = 3 if target == "labels-R3" else 1
    ignore = 2 if kind == LABELS else None
    x, t = _make(2, 3, 37, act=act, kind=kind, R=R, ignore_index=ignore, seed=M % 997 + SCHEME[scheme])
    out, ref = _check(x, t, M, SCHEME[scheme], act, kind, MODE[mode], True, ignore, label=f"{M=} {scheme} {act}")
    if scheme == "hard" and act == "none":
        assert torch.equal(out[0], ref[0]), "hard counts of probabilities must be exact"


@pytest.mark.parametrize("scheme", ["hard", "soft"])
@pytest.mark.parametrize("target", ["labels-R1", "labels-R3", "dense"])
def test_many_bins_repeated_bins_in_every_tile(scheme, target):
    # few distinct probabilities over several tiles: every group has many members (and on a GPU the partial rows
    # are read back tile after tile, so a missing barrier between the updates would show here)
    kind = DENSE if target == "dense" else LABELS
    R = 3 if target == "labels-R3" else 1
    M, N = 1000, 120
    g = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.0, 0.1234, 0.5, 0.50004, 0.9, 1.0])
    x = levels[torch.randint(0, levels.numel(), (2, 3, N), generator=g)].to(DEVICE)
    t = torch.randint(0, 3, (2, R, N), generator=g) if kind == LABELS else torch.rand(2, 3, N, generator=g)
    t = t.to(DEVICE)
    _expect_scatter(M)
    for mode in (0, 1):
        out, ref = _check(x, t, M, SCHEME[scheme], "none", kind, mode, True, label=f"repeated {scheme} {target}")
        if scheme == "hard":
            assert torch.equal(out[0], ref[0]), "hard counts must be exact"
            if kind == LABELS:
                assert torch.equal(out[2], ref[2]), "label sums of hard bins must be exact"


@pytest.mark.parametrize("scheme", ["hard", "soft"])
@pytest.mark.parametrize("act", ["none", "softmax", pytest.param("sigmoid", marks=SLOW_ON_GPU)])
@pytest.mark.parametrize("target", ["labels-R1", "labels-R3", pytest.param("dense", marks=SLOW_ON_GPU)])
@pytest.mark.parametrize("mode", ["marginal", "top"])
def test_scatter_kernel_agrees_with_register_kernel(monkeypatch, scheme, act, target, mode):
    # the scatter kernel forced for M = 5: the same results as the reference, and the same statistics as the
    # register kernel (identical hard counts; other sums within float32 summation order)
    kind = DENSE if target == "dense" else LABELS
    R = 3 if target == "labels-R3" else 1
    s, m = SCHEME[scheme], MODE[mode]
    x, t = _make(2, 5, 60, act=act, kind=kind, R=R, seed=100 * s + 10 * ACT[act] + 2 * R + m)
    x = _away_from_edges(x, act, 5)
    register = _op(x, t, 5, s, ACT[act], kind, m, True, right=bool(m))
    monkeypatch.setenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", "0")
    assert L.launch_config(2, 5, 60, 5, DEVICE, mode=m)["SCATTER"]
    out, ref = _check(x, t, 5, s, act, kind, m, True, right=bool(m), label=f"scatter {scheme} {act} {target}")
    _check_stats(out, register, "scatter vs register", s == 1, 0)
    if s == 0:
        assert torch.equal(out[0], register[0]), "hard counts: scatter and register kernels must agree exactly"


@pytest.mark.parametrize("M", [1, 2], ids=["M1", "M2"])
@pytest.mark.parametrize("scheme", [0, 1], ids=["hard", "soft"])
def test_scatter_kernel_one_and_two_bins(monkeypatch, M, scheme):
    # soft with M = 1: no upper bin exists, so the second update round must write nothing
    monkeypatch.setenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", "0")
    x, t = _make(1, 3, 40, act="softmax", R=2, seed=12 + M)
    for mode in (0, 1):
        _check(x, t, M, scheme, "softmax", LABELS, mode, True, label=f"scatter {M=} {scheme=} {mode=}")


def test_many_bins_class_chunks():
    # C > 32: class chunks (one program axis each, online softmax normaliser; top-label: running argmax) on the
    # scatter kernel
    x, t = _make(1, 40, 23, act="softmax", R=2, ignore_index=39, seed=17)
    _expect_scatter(300)
    for scheme in (0, 1):
        for mode in (0, 1):
            _check(x, t, 300, scheme, "softmax", LABELS, mode, True, 39, label=f"C40 M300 {scheme=} {mode=}")


# ---- the non-finite rule: NaN/+-inf probabilities are left out, get gradient 0 and are counted in bad[1] ----

NUMPY_INF_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter


@NUMPY_INF_WARNING
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("scheme", [0, 1], ids=["hard", "soft"])
@pytest.mark.parametrize(
    "act,target,M",
    [
        ("none", "dense", 5),
        ("softmax", "labels", 5),
        pytest.param("sigmoid", "dense", 5, marks=SLOW_ON_GPU),
        pytest.param("sigmoid", "labels", 5, marks=SLOW_ON_GPU),
        pytest.param("none", "dense", 200, marks=SLOW_ON_GPU),  # M = 200: the scatter kernel
        ("softmax", "labels", 200),
    ],
)
@pytest.mark.parametrize("mode", [0, 1], ids=["marginal", "top"])
def test_nonfinite_probabilities_left_out_and_counted(value, scheme, act, target, M, mode):
    # against the reference, which implements the rule (docs/kernel_contract.md, "Non-finite rule"); top-label
    # leaves the whole voxel out when any p is non-finite but still counts every non-finite p
    kind = DENSE if target == "dense" else LABELS
    C, N = 4, 90
    x, t = _make(2, C, N, act=act, kind=kind, R=2, seed=23)
    if scheme == 0:
        x = _away_from_edges(x, act, M)  # before the non-finite values go in (module docstring)
    g = torch.Generator().manual_seed(29)
    hit = torch.rand(2, C, N, generator=g) < 0.08
    x = torch.where(hit.to(DEVICE), torch.tensor(float(value), device=DEVICE), x)
    if act == "softmax":
        x[1, :, 7] = float("-inf")  # all logits -inf: every p NaN
        x[1, :2, 8] = float("-inf")  # some logits -inf: those p are 0, the voxel is used
    out, ref, gk, gr = _run_both(x, t, M, scheme, act, kind, mode, True)
    p = x if act == "none" else torch.softmax(x, 1) if act == "softmax" else torch.sigmoid(x)
    if act == "sigmoid" and value != "nan":
        assert out[5].tolist()[1] == 0  # sigmoid(+-inf) is finite: binned like any other p
    else:
        assert out[5].tolist()[1] > 0
    _check_stats(out, ref, f"non-finite {value} {scheme=} {act=} {target=} {mode=}", scheme == 1, ACT[act])
    assert all(bool(torch.isfinite(s).all()) for s in out[:5]), "no NaN/inf may reach the statistics"
    assert bool(torch.isfinite(gk).all()), "non-finite entries must get gradient 0, not NaN"
    _check_grad(gk, gr, torch.float32, f"non-finite {value} {scheme=} {act=} {target=} {mode=}")
    assert bool((gk[~torch.isfinite(p)] == 0).all()), "gradient of non-finite entries must be exactly 0"
    if mode == 1:
        assert bool((gk.permute(0, 2, 1)[(~torch.isfinite(p)).any(1)] == 0).all()), "voxel left out"


@NUMPY_INF_WARNING
def test_bad_counts_skip_ignored_and_out_of_range_voxels():
    # bad = [labels outside [0, C) other than ignore_index, over all raters; non-finite p of the used voxels]
    C, N = 3, 40
    x, t = _make(1, C, N, act="softmax", R=2, seed=41)
    t[0, 0, 0] = 7  # out of range: counted in bad[0] only, even with a NaN logit
    t[0, 1, 1] = -100  # ignored in one rater: the voxel is unused, never counted
    t[0, :, 2] = 1
    t[0, 1, 3] = 9  # a second bad label, in the other rater
    x[0, 0, 0] = float("nan")
    x[0, 1, 1] = float("nan")
    x[0, 2, 2] = float("inf")  # used voxel: all C probabilities NaN
    for M in (5, 200):
        for scheme in (0, 1):
            for mode in (0, 1):
                out = _op(x, t, M, scheme, 1, LABELS, mode, True, -100)
                bad = out[5]
                assert bad.dtype == torch.int64 and bad.shape == (2,) and bad.device == x.device
                assert bad.tolist() == [2, C], (M, scheme, mode, bad.tolist())
                K = C if mode == 0 else 1
                assert abs(float(out[0].sum()) - K * (N - 4)) < 1e-3
                g = tb.binned_stats_backward(
                    *out[:5], x, t, _edges(M, scheme), M, scheme, 1, LABELS, mode, True, -100, False
                )
                assert bool((g[0, :, :4] == 0).all()) and bool(torch.isfinite(g).all())
    # dense target: bad[0] is always 0
    xd = torch.rand(1, 2, 30, device=DEVICE)
    xd[0, 1, 4] = float("-inf")
    for mode in (0, 1):
        assert _op(xd, torch.rand_like(xd), 5, 0, 0, DENSE, mode)[5].tolist() == [0, 1]


def test_chunked_softmax_with_a_chunk_of_minus_inf_logits():
    # C = 40: classes 0-31 form the first chunk. All -inf there and finite logits in the second chunk: p = 0 for
    # the first 32 classes, a normal softmax over the rest (an online normaliser must not turn it into NaN)
    x, t = _make(1, 40, 20, act="softmax", seed=43)
    x[0, :32, :5] = float("-inf")
    t[0, 0, :5] = 35
    for scheme in (0, 1):
        for mode in (0, 1):
            out, _ = _check(x, t, 5, scheme, "softmax", LABELS, mode, True, label=f"-inf chunk {scheme=} {mode=}")
            assert out[5].tolist() == [0, 0]


def test_num_bins_cap_is_checked_by_the_kernel_op():
    # the documented cap num_bins <= 2**24 (checked in Python first; the op keeps its own guard)
    x, t = _make(1, 2, 10, act="softmax")
    with pytest.raises(ValueError, match="num_bins"):
        tb.binned_stats(x, t, _edges(5, 0), 2**24 + 1, 0, 1, LABELS, 0, False, None, False)


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
    x, t = _make(1, 3, 20, act="softmax", seed=3)
    for M in (5, 100):  # register and scatter forward, and the backward
        xk = x.clone().requires_grad_()
        out = _op(xk, t, M, 1, 1, LABELS)
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
    t = torch.zeros(B, 1, N, dtype=torch.uint8, device="cuda")
    t[1, 0, -1] = 1
    e = bin_edges(M, "cuda")
    count, sum_p, sum_y, _, _, bad = tb.binned_stats(x, t, e, M, 0, 0, LABELS, 0, False, None, False)
    sum_y = sum_y[:, :, 0]
    assert not bool(bad.any())
    # float32 cannot hold these counts: N = 805,306,375 and N - 1 are stored as 805,306,368 (spacing 64 above
    # 2^29). Error budget: every statistic is a float32 sum of non-negative terms (a tile's sum, the program's
    # running sum over its tiles, then the merge of the P program partials); each term reaches the result
    # through at most log2(BLOCK_N) + tiles_per_prog + P roundings of 2^-24 relative, so the result is within
    # that many times 2^-24 of the exact sum, relative.
    cfg = L.launch_config(B, C, N, M, x.device)
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
    empty = torch.zeros(0, device="cuda")
    grad = tb.binned_stats_backward(
        z, gp, z.unsqueeze(2), empty, empty, x, t, e, M, 0, 0, LABELS, 0, False, None, False
    )
    assert float(grad[1, 1, -1]) == float(gp[1, 1, 3])
    for (b, c), j in (((0, 0), 1), ((0, 1), 1), ((1, 0), 6)):
        assert bool((grad[b, c] == gp[b, c, j].to(grad.dtype)).all()), f"gradient of image {b} class {c}"
    assert bool((grad[1, 1, :-1] == gp[1, 1, 8].to(grad.dtype)).all()), "gradient beyond 2^31 elements"
