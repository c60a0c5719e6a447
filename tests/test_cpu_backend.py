"""The fused C++ CPU backend (csrc/cpu) against the reference: statistics, gradients, options, dtypes, shapes,
determinism across thread counts and instruction-set builds, opcheck and torch.compile.

Tolerances are derived, not tuned:
- Probabilities in (activation 0): the kernel bins the very float32 values the reference bins and sums in
  float64 like it, so statistics agree to float32 rounding (rtol 2e-6).
- Logits in (softmax / sigmoid fused in the kernel): the kernel's float32 activation differs from torch's by a
  few ulps. With the float64 activation ``p64`` as oracle, each p is within ``delta = (C + 8) eps32 p64``
  (+ underflow). Hard binning: a voxel closer than delta to an edge may change bin, moving at most 1 of count,
  sum_p and sum_y per (image, class) and flip; soft binning: memberships move by at most delta / d (d the centre
  spacing). Both bounds are computed per (image, class) from p64 below.
- Gradients: elementwise ``rtol`` from the per-dtype table (float32: 1e-3; half/bfloat16: one ulp of the output
  format) plus an absolute floor of 1e-5 of the largest gradient; voxels within delta of a bin edge (hard) are
  excluded, and they must be a vanishing fraction.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import calibops
from calibops import MarginalL1ACELoss
from calibops import functional as F
from calibops.reference import ACT_NONE, ACT_SIGMOID, ACT_SOFTMAX, bin_centres, bin_edges, binned_stats_prepared

pytestmark = pytest.mark.skipif(
    calibops.available_backends()["cpu"] is not None,
    reason=f"cpu backend unavailable: {calibops.available_backends()['cpu']}",
)

EPS32 = torch.finfo(torch.float32).eps
GRAD_RTOL = {torch.float32: 1e-3, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)


def _ops():
    return torch.ops.calibops.binned_stats, torch.ops.calibops.binned_stats_backward


def _edges(M, soft):
    return bin_centres(M) if soft else bin_edges(M)


def _make(B, C, N, dtype, act, labels, seed, target_dtype=None, bad_labels=False, ignore_index=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, N, generator=g) * 3
    if act == ACT_NONE:
        x = torch.softmax(x, 1) if C > 1 else torch.rand(B, C, N, generator=g)
    x = x.to(dtype)
    if labels:
        lo, hi = (-2, C + 2) if bad_labels else (0, C)
        t = torch.randint(lo, hi, (B, N), generator=g)
        if ignore_index is not None:
            t[torch.rand(B, N, generator=g) < 0.2] = ignore_index
        t = t.to(target_dtype or torch.int64)
    else:
        td = target_dtype or torch.float32
        if td in (torch.bool, torch.uint8):
            t = (torch.rand(B, C, N, generator=g) < 0.3).to(td)
        else:
            t = torch.rand(B, C, N, generator=g).to(td)
    return x, t


def _p64(x, act):
    x64 = x.double()
    if act == ACT_SOFTMAX:
        return torch.softmax(x64, 1)
    if act == ACT_SIGMOID:
        return torch.sigmoid(x64)
    return x64


def _keep(t, labels, C, ignore_index, shape):
    if not labels:
        return torch.ones(shape[0], shape[2], dtype=torch.bool)
    lab = t.long()
    keep = (lab >= 0) & (lab < C)
    if ignore_index is not None:
        keep &= lab != ignore_index
    return keep


def _delta(p64, act):
    """Bound on |p_kernel - p64| (float32 activation error), elementwise."""
    if act == ACT_NONE:
        return torch.zeros_like(p64)
    C = p64.shape[1]
    return (C + 8) * EPS32 * p64 + 2e-38


def _near_edge(p64, delta, M, soft):
    e = _edges(M, soft).double()
    inner = e if soft else e[1:]
    return ((p64.unsqueeze(-1) - inner).abs() <= delta.unsqueeze(-1)).any(-1)


def _stats_tolerance(x, t, act, labels, ignore_index, M, soft):
    """(B, C, 1) absolute bounds for count, sum_p, sum_y from the float64 activation (see module docstring)."""
    p64 = _p64(x, act)
    delta = _delta(p64, act)
    keep = _keep(t, labels, x.shape[1], ignore_index, x.shape).unsqueeze(1)
    if soft:
        d = (_edges(M, soft)[1:] - _edges(M, soft)[:-1]).min().item() if M > 1 else 1.0
        s = (delta * keep).sum(-1, keepdim=True)
        slope = s / d
        return slope, slope + s, slope
    flips = (_near_edge(p64, delta, M, soft) & keep).sum(-1, keepdim=True).double()
    sp = (delta * keep).sum(-1, keepdim=True)
    return flips, flips + sp, flips


def _check_stats(got, x, t, edges, M, soft, act, labels, ignore_index, right):
    ref = binned_stats_prepared(
        x.double() if act != ACT_NONE else x.float().double(), t, edges, M, soft, act, labels, ignore_index, right
    )
    bounds = _stats_tolerance(x, t, act, labels, ignore_index, M, soft)
    rtol = 2e-6 if act == ACT_NONE else 1e-5
    for name, g, r, b in zip(("count", "sum_p", "sum_y"), got[:3], ref[:3], bounds):
        assert g.dtype == torch.float32 and g.shape == r.shape
        err = (g.double() - r).abs()
        allowed = rtol * r.abs() + b + 1e-6
        assert bool((err <= allowed).all()), f"{name}: max excess {(err - allowed).max().item():.3e}"
    assert got[3].dtype == torch.int64 and got[3].shape == (2,)
    assert torch.equal(got[3], ref[3])


# ---------------------------------------------------------------------------------------------------------
# The op against the reference: every option, target kind and dtype.

CASES = list(
    itertools.product(
        [False, True],  # soft
        [ACT_NONE, ACT_SOFTMAX, ACT_SIGMOID],
        [torch.float32, torch.float16, torch.bfloat16],
    )
)


@pytest.mark.parametrize("soft,act,dtype", CASES)
def test_forward_labels_matches_reference(soft, act, dtype):
    B, C, N, M = 2, 5, 1031, 20
    op, _ = _ops()
    edges = _edges(M, soft)
    for k, (ldt, ignore, right) in enumerate(
        [
            (torch.int64, None, False),
            (torch.uint8, 255, True),
            (torch.int8, -1, False),
            (torch.int16, 3, True),
            (torch.int32, None, True),
        ]
    ):
        x, t = _make(B, C, N, dtype, act, True, seed=k, target_dtype=ldt, ignore_index=ignore)
        got = op(x, t, edges, M, soft, act, True, ignore, right)
        _check_stats(got, x, t, edges, M, soft, act, True, ignore, right)


@pytest.mark.parametrize("soft,act,dtype", CASES)
def test_forward_dense_matches_reference(soft, act, dtype):
    B, C, N, M = 2, 3, 997, 15
    op, _ = _ops()
    edges = _edges(M, soft)
    for k, tdt in enumerate(DENSE_DTYPES):
        x, t = _make(B, C, N, dtype, act, False, seed=10 + k, target_dtype=tdt)
        for right in (False, True):
            got = op(x, t, edges, M, soft, act, False, None, right)
            _check_stats(got, x, t, edges, M, soft, act, False, None, right)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(
    "B,C,N,M",
    [
        (1, 1, 1, 20),
        (3, 1, 13, 7),
        (1, 17, 101, 20),
        (2, 2, 1, 1),
        (1, 3, 4099, 3),
        (2, 5, 37, 1000),
        (1, 4, 40009, 20),
    ],
)
def test_odd_shapes(soft, B, C, N, M):
    op, _ = _ops()
    edges = _edges(M, soft)
    for act, labels in itertools.product([ACT_NONE, ACT_SOFTMAX, ACT_SIGMOID], [True, False]):
        x, t = _make(B, C, N, torch.float32, act, labels, seed=B * 100 + C * 10 + N, bad_labels=labels)
        got = op(x, t, edges, M, soft, act, labels, None, False)
        _check_stats(got, x, t, edges, M, soft, act, labels, None, False)


def test_values_on_exact_edges_and_centres():
    """Probabilities exactly on, and one float32 step around, every edge and centre: no tolerance at all."""
    op, _ = _ops()
    for M, soft, right in itertools.product([1, 2, 7, 20, 64], [False, True], [False, True]):
        e = _edges(M, soft)
        vals = torch.cat(
            [
                e,
                torch.nextafter(e, torch.tensor(2.0)),
                torch.nextafter(e, torch.tensor(-1.0)),
                torch.tensor([0.0, 1.0, 0.5, 1e-30, 1 - EPS32 / 2]),
            ]
        ).clamp(0, 1)
        x = vals.view(1, 1, -1)
        t = torch.rand_like(x)
        got = op(x, t, e, M, soft, ACT_NONE, False, None, right)
        ref = binned_stats_prepared(x, t, e, M, soft, ACT_NONE, False, None, right)
        for g, r in zip(got[:3], ref[:3]):
            torch.testing.assert_close(g, r, rtol=2e-6, atol=1e-7)
        if not soft:
            assert torch.equal(got[0], ref[0])


def test_bad_labels_counted_never_indexed():
    """Out-of-range labels (huge, negative, every integer dtype) are counted and left out, never used as index."""
    op, _ = _ops()
    B, C, N, M = 2, 3, 500, 10
    x, _ = _make(B, C, N, torch.float32, ACT_SOFTMAX, True, seed=3)
    for ldt in LABEL_DTYPES:
        info = torch.iinfo(ldt)
        g = torch.Generator().manual_seed(1)
        t = torch.randint(0, C, (B, N), generator=g)
        t[:, ::7] = info.max
        if info.min < 0:
            t[:, 3::11] = info.min
        t = t.to(ldt)
        for soft in (False, True):
            e = _edges(M, soft)
            got = op(x, t, e, M, soft, ACT_SOFTMAX, True, None, False)
            ref = binned_stats_prepared(x, t, e, M, soft, ACT_SOFTMAX, True, None, False)
            assert torch.equal(got[3], ref[3]) and int(got[3][0]) > 0
            kept = _keep(t, True, C, None, x.shape).sum(-1).float()
            torch.testing.assert_close(got[0].sum(-1), kept.unsqueeze(1).expand(B, C), rtol=1e-6, atol=1e-4)
    lab = torch.tensor([[0, 5, 2**40, -(2**40), 1]])
    got = op(torch.rand(1, 3, 5), lab, bin_edges(4), 4, False, ACT_NONE, True, -(2**40), False)
    assert got[3].tolist() == [2, 0] and got[0].sum().item() == 3 * 2


def test_nonfinite_inputs_left_out_and_counted():
    """NaN / inf probabilities or logits (validation off) are left out of the statistics and counted in bad[1]
    (the contract's non-finite rule); finite out-of-range values (+-1e30, 2, -3) are binned. The full check of the
    rule on every backend is tests/test_nonfinite.py."""
    op, bop = _ops()
    x = torch.tensor([[[float("nan"), float("inf"), -float("inf"), 2.0, -3.0, 0.5, 1e30, -1e30]]]).repeat(2, 3, 1)
    x[:, 1] = x[:, 1].flip(-1)
    t = torch.randint(0, 3, (2, 8))
    # non-finite entries per (image, class) row: activation 0: 3 (NaN, +inf, -inf); sigmoid: 1 (NaN);
    # softmax: every class of the voxels with a NaN or +inf logit (voxels 0, 1, 6, 7 after the flip): 4
    expect = {ACT_NONE: 3, ACT_SIGMOID: 1, ACT_SOFTMAX: 4}
    for soft, act in itertools.product([False, True], [ACT_NONE, ACT_SOFTMAX, ACT_SIGMOID]):
        e = _edges(9, soft)
        got = op(x, t, e, 9, soft, act, True, None, False)
        assert got[3].tolist() == [0, 2 * 3 * expect[act]], (soft, act)
        torch.testing.assert_close(got[0].sum(-1), torch.full((2, 3), 8.0 - expect[act]))
        assert all(bool(torch.isfinite(v).all()) for v in got[:3])
        gi = bop(*(torch.ones(2, 3, 9),) * 3, x, t, e, 9, soft, act, True, None, False)
        assert bool(torch.isfinite(gi).all())


def test_empty_and_single_voxel():
    op, bop = _ops()
    for N in (0, 1):
        x = torch.rand(2, 3, N)
        t = torch.randint(0, 3, (2, N))
        got = op(x, t, bin_edges(5), 5, False, ACT_NONE, True, None, False)
        ref = binned_stats_prepared(x, t, bin_edges(5), 5, False, ACT_NONE, True, None, False)
        for gg, r in zip(got, ref):
            assert torch.equal(gg, r)
        gi = bop(*(torch.ones(2, 3, 5),) * 3, x, t, bin_edges(5), 5, False, ACT_NONE, True, None, False)
        assert gi.shape == x.shape


def test_zero_classes_and_bad_shape():
    """C = 0 at the op level: empty (B, 0, M) statistics and bad = [0, 0] (labels are not counted), no error."""
    op, bop = _ops()
    for soft, labels in itertools.product([False, True], [True, False]):
        e = _edges(5, soft)
        x = torch.rand(2, 0, 9)
        t = torch.randint(0, 3, (2, 9)) if labels else torch.rand(2, 0, 9)
        got = op(x, t, e, 5, soft, ACT_SOFTMAX, labels, None, False)
        ref = binned_stats_prepared(x, t, e, 5, soft, ACT_SOFTMAX, labels, None, False)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        assert got[3].shape == (2,)
        gi = bop(*(torch.ones(2, 0, 5),) * 3, x, t, e, 5, soft, ACT_SOFTMAX, labels, None, False)
        assert gi.shape == x.shape


def test_large_volume_accuracy():
    """2^21 voxels per image: float64 blocked sums stay within 1e-5 relative of the float64 reference."""
    op, _ = _ops()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 2**21, generator=g)
    t = torch.rand(1, 2, 2**21, generator=g)
    for soft in (False, True):
        e = _edges(20, soft)
        got = op(x, t, e, 20, soft, ACT_NONE, False, None, False)
        ref = binned_stats_prepared(x.double(), t, e, 20, soft, ACT_NONE, False, None, False)
        for gg, r in zip(got[:3], ref[:3]):
            assert ((gg.double() - r).abs() <= 1e-5 * r.abs() + 1e-6).all()


# ---------------------------------------------------------------------------------------------------------
# Gradients.


def _grads(fn, x, t, edges, M, soft, act, labels, ignore, right, gouts):
    xx = x.detach().clone().requires_grad_(True)
    out = fn(xx, t, edges, M, soft, act, labels, ignore, right)
    loss = sum((o.double() * g).sum() for o, g in zip(out[:3], gouts))
    (gx,) = torch.autograd.grad(loss, xx)
    return gx


def _check_grad(got, ref, x, act, M, soft, t, labels, ignore):
    assert got.dtype == x.dtype and got.shape == x.shape
    p64 = _p64(x, act)
    excluded = torch.zeros(x.shape[0], x.shape[2], dtype=torch.bool)
    if not soft and act != ACT_NONE:  # a bin change moves a voxel's gradient in every class (softmax)
        excluded = _near_edge(p64, _delta(p64, act), M, soft).any(1)
    assert excluded.float().mean().item() < 0.01
    keep = ~excluded.unsqueeze(1).expand_as(x)
    scale = ref.double().abs().max().item()
    err = (got.double() - ref.double()).abs()
    allowed = GRAD_RTOL[x.dtype] * ref.double().abs() + 1e-5 * scale + 1e-30
    bad = (err > allowed) & keep
    assert not bool(bad.any()), f"{int(bad.sum())} gradient entries off, max err {err[bad].max().item():.3e}"
    if labels:  # ignored / out-of-range voxels get exactly 0
        masked = ~_keep(t, True, x.shape[1], ignore, x.shape).unsqueeze(1).expand_as(x)
        assert bool((got[masked] == 0).all())


@pytest.mark.parametrize("soft,act,dtype", CASES)
@pytest.mark.parametrize("labels", [True, False])
def test_backward_matches_reference(soft, act, dtype, labels):
    B, C, N, M = 2, 4, 523, 12
    op, _ = _ops()
    edges = _edges(M, soft)
    ignore = 2 if labels else None
    x, t = _make(B, C, N, dtype, act, labels, seed=7, ignore_index=ignore, bad_labels=labels)
    g = torch.Generator().manual_seed(8)
    gouts = [torch.randn(B, C, M, generator=g, dtype=torch.float64) for _ in range(3)]
    for right in (False, True):
        got = _grads(op, x, t, edges, M, soft, act, labels, ignore, right, gouts)
        ref = _grads(binned_stats_prepared, x, t, edges, M, soft, act, labels, ignore, right, gouts)
        _check_grad(got, ref, x, act, M, soft, t, labels, ignore)


def test_backward_op_uses_each_gradient():
    """grad_count / grad_sum_p / grad_sum_y one at a time (the others zero), soft binning where all three matter."""
    _, bop = _ops()
    B, C, N, M = 1, 3, 300, 9
    x, t = _make(B, C, N, torch.float32, ACT_SOFTMAX, True, seed=2)
    e = bin_centres(M)
    for k in range(3):
        gs = [torch.zeros(B, C, M) for _ in range(3)]
        gs[k] = torch.randn(B, C, M)
        got = bop(*gs, x, t, e, M, True, ACT_SOFTMAX, True, None, False)
        ref = _grads(binned_stats_prepared, x, t, e, M, True, ACT_SOFTMAX, True, None, False, gs)
        assert got.abs().max() > 0
        _check_grad(got, ref, x, ACT_SOFTMAX, M, True, t, True, None)


# ---------------------------------------------------------------------------------------------------------
# The public API with backend="cpu" against backend="reference".


@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_loss_and_grad_match_reference_with_grad_output(binning):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 7, 11, 13, generator=g) * 2
    labels = torch.randint(0, 5, (3, 1, 7, 11, 13), generator=g)
    kw = dict(
        binning=binning,
        to_onehot_y=True,
        softmax=True,
        reduction="none",
        weight=[1.0, 0.5, 2.0, 1.0, 0.0],
        include_background=True,
        ignore_index=None,
    )
    go = torch.randn(3, 5, generator=g)
    res = {}
    for backend in ("cpu", "reference"):
        x = logits.clone().requires_grad_(True)
        loss = F.marginal_l1_ace(x, labels, backend=backend, **kw)
        loss.backward(go)
        res[backend] = (loss.detach(), x.grad)
    torch.testing.assert_close(res["cpu"][0], res["reference"][0], rtol=1e-5, atol=1e-7)
    _check_grad(
        res["cpu"][1].reshape(3, 5, -1),
        res["reference"][1].reshape(3, 5, -1),
        logits.reshape(3, 5, -1),
        ACT_SOFTMAX,
        20,
        binning == "soft",
        None,
        False,
        None,
    )


def test_functional_noncontiguous_and_options():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 9, 8, 3, generator=g)
    x = base.permute(0, 3, 2, 1)  # (2, 3, 8, 9) non-contiguous
    p = torch.softmax(base, 3).permute(0, 3, 2, 1)
    lab = torch.randint(0, 3, (2, 9, 8), generator=g).transpose(1, 2)  # non-contiguous labels
    onehot = torch.nn.functional.one_hot(lab, 3).permute(0, 3, 1, 2)  # non-contiguous one-hot
    cases = [
        (x, lab, dict(to_onehot_y=True, softmax=True)),
        (x, lab, dict(to_onehot_y=True, sigmoid=True, include_background=False, right=True)),
        (p, onehot.float(), dict()),
        (p.half(), onehot.bool(), dict(binning="soft", reduction="sum")),
        (x.bfloat16(), onehot.to(torch.uint8), dict(softmax=True, binning="soft", ignore_empty_classes=False)),
        (x, lab, dict(to_onehot_y=True, softmax=True, ignore_index=1, num_bins=7)),
    ]
    for inp, tgt, kw in cases:
        assert not inp.is_contiguous()
        vals = {}
        for backend in ("cpu", "reference"):
            xi = inp.detach().clone().requires_grad_(True)
            loss = F.marginal_l1_ace(xi, tgt, backend=backend, **kw)
            (gx,) = torch.autograd.grad(loss, xi)
            stats = F.binned_stats(
                inp,
                tgt,
                backend=backend,
                **{k: v for k, v in kw.items() if k not in ("reduction", "ignore_empty_classes")},
            )
            vals[backend] = (loss, gx, stats)
        torch.testing.assert_close(vals["cpu"][0], vals["reference"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vals["cpu"][1], vals["reference"][1], rtol=GRAD_RTOL[inp.dtype], atol=1e-5)
        for a, b in zip(vals["cpu"][2], vals["reference"][2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    e_cpu = F.calibration_errors(x, lab, to_onehot_y=True, softmax=True, backend="cpu")
    e_ref = F.calibration_errors(x, lab, to_onehot_y=True, softmax=True, backend="reference")
    for a, b in zip(e_cpu, e_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_auto_picks_cpu_and_bad_labels_raise():
    x = torch.randn(1, 3, 10)
    assert calibops.backend_for(x) == "cpu" or os.environ.get("CALIBOPS_BACKEND")
    lab = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match="outside"):
        F.marginal_l1_ace(x, lab, to_onehot_y=True, softmax=True, backend="cpu")


def test_op_argument_errors():
    op, bop = _ops()
    x, t = torch.rand(1, 2, 5), torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="edges"):
        op(x, t, bin_edges(4), 5, False, 0, True, None, False)
    with pytest.raises(RuntimeError, match="input"):
        op(x.double(), t, bin_edges(4), 4, False, 0, True, None, False)
    with pytest.raises(RuntimeError, match="labels"):
        op(x, t.float(), bin_edges(4), 4, False, 0, True, None, False)
    with pytest.raises(RuntimeError, match="activation"):
        op(x, t, bin_edges(4), 4, False, 3, True, None, False)
    with pytest.raises(RuntimeError, match="grad_sum_p"):
        bop(
            torch.zeros(1, 2, 4),
            torch.zeros(1, 3, 4),
            torch.zeros(1, 2, 4),
            x,
            t,
            bin_edges(4),
            4,
            False,
            0,
            True,
            None,
            False,
        )


# ---------------------------------------------------------------------------------------------------------
# Determinism, registration, compile.


def _run_all(x, t, soft, act, labels):
    op, bop = _ops()
    e = _edges(20, soft)
    g = torch.Generator().manual_seed(0)
    gs = [torch.randn(x.shape[0], x.shape[1], 20, generator=g) for _ in range(3)]
    return [*op(x, t, e, 20, soft, act, labels, None, False), bop(*gs, x, t, e, 20, soft, act, labels, None, False)]


def test_bitwise_identical_for_1_and_2_threads():
    x, t = _make(2, 4, 70001, torch.float32, ACT_SOFTMAX, True, seed=9)
    x2, t2 = _make(1, 3, 50021, torch.bfloat16, ACT_NONE, False, seed=9)
    before = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = [
                _run_all(x, t, soft, ACT_SOFTMAX, True) + _run_all(x2, t2, soft, ACT_NONE, False)
                for soft in (False, True)
            ]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(itertools.chain(*results[1]), itertools.chain(*results[2])):
        assert torch.equal(a, b)


def test_bitwise_identical_across_isa_builds(monkeypatch):
    """base / avx2 / avx512 builds (those this CPU runs) give bitwise equal results (no FMA contraction)."""
    x, t = _make(2, 5, 3001, torch.float16, ACT_SOFTMAX, True, seed=11)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["base"] + [i for i, f in (("avx2", " avx2"), ("avx512", " avx512bw")) if f in flags]
    outs = {}
    for isa in isas:
        monkeypatch.setenv("CALIBOPS_CPU_ISA", isa)
        outs[isa] = [_run_all(x, t, soft, act, True) for soft in (False, True) for act in (ACT_SOFTMAX, ACT_SIGMOID)]
    for isa in isas[1:]:
        for a, b in zip(itertools.chain(*outs["base"]), itertools.chain(*outs[isa])):
            assert torch.equal(a, b), isa
    monkeypatch.setenv("CALIBOPS_CPU_ISA", "no-such-isa")
    with pytest.raises(RuntimeError, match="CALIBOPS_CPU_ISA"):
        _run_all(x, t, False, ACT_NONE, True)


@pytest.mark.parametrize("act", [ACT_NONE, ACT_SOFTMAX, ACT_SIGMOID])
@pytest.mark.parametrize("labels", [True, False])
def test_fused_hard_path_bitwise_equals_generic(monkeypatch, act, labels):
    """The fused hard path (C <= 16, M <= 30; SIMD builds, and the base build's scalar version with
    CALIBOPS_CPU_FUSED=2) gives bitwise the results of the generic multi-pass path (CALIBOPS_CPU_FUSED=0):
    statistics, both bad counts and gradient, in every ISA build, for tails, odd class counts (templated 2/3/4 and
    generic), half inputs, right=True, ignore_index, out-of-range labels, NaN/inf and a gradient large enough for
    non-temporal stores."""
    op, bop = _ops()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["base"] + [i for i, f in (("avx2", " avx2"), ("avx512", " avx512bw")) if f in flags]
    cases = [
        (2, 2, 1000, torch.float32, 20, False, None, False),
        (1, 3, 777, torch.float16, 7, True, None, False),
        (2, 4, 4133, torch.float32, 20, False, 2, True),
        (1, 5, 529, torch.bfloat16, 30, True, 3, True),
        (1, 16, 300, torch.float32, 1, False, None, False),
        (1, 1, 95, torch.float32, 12, False, None, False),
        (1, 4, 2**18, torch.float32, 20, False, None, False),  # >= 4 MiB gradient: non-temporal stores
    ]
    for B, C, N, dtype, M, right, ignore, bad in cases:
        x, t = _make(
            B,
            C,
            N,
            dtype,
            act,
            labels,
            seed=C * 7 + N,
            ignore_index=ignore if labels else None,
            bad_labels=bad and labels,
        )
        if dtype == torch.float32:
            x = x.clone()
            x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        e = _edges(M, False)
        ig = ignore if labels else None
        g = torch.Generator().manual_seed(1)
        gs = [torch.randn(B, C, M, generator=g) for _ in range(3)]
        outs = {}
        for isa in isas:
            for fused in ("1", "0", "2"):
                monkeypatch.setenv("CALIBOPS_CPU_ISA", isa)
                monkeypatch.setenv("CALIBOPS_CPU_FUSED", fused)
                res = list(op(x, t, e, M, False, act, labels, ig, right))
                res.append(bop(*gs, x, t, e, M, False, act, labels, ig, right))
                outs[isa, fused] = res
        ref = outs["base", "0"]
        for key, res in outs.items():
            for a, b in zip(res, ref):
                assert a.dtype == b.dtype and a.shape == b.shape
                if a.is_floating_point():  # bitwise, except that NaN payloads / signs are not compared
                    same = a.view(-1).view(torch.uint8).view(a.numel(), -1) == b.view(-1).view(torch.uint8).view(
                        b.numel(), -1
                    )
                    ok = same.all(-1) | (a.view(-1).isnan() & b.view(-1).isnan())
                    assert bool(ok.all()), (key, B, C, N)
                else:
                    assert torch.equal(a, b), (key, B, C, N)


@pytest.mark.parametrize("soft", [False, True])
def test_opcheck(soft):
    op, bop = _ops()
    M = 6
    e = _edges(M, soft)
    x, t = _make(2, 3, 37, torch.float32, ACT_SOFTMAX, True, seed=1, ignore_index=4)
    xd, td = _make(1, 2, 29, torch.float16, ACT_NONE, False, seed=2, target_dtype=torch.bool)
    for args in [
        (x.requires_grad_(True), t, e, M, soft, ACT_SOFTMAX, True, 4, False),
        (xd, td, e, M, soft, ACT_NONE, False, None, True),
    ]:
        torch.library.opcheck(op, args)
        gs = tuple(torch.randn(args[0].shape[0], args[0].shape[1], M) for _ in range(3))
        torch.library.opcheck(bop, gs + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 9, 7, 5, generator=g)
    labels = torch.randint(0, 4, (2, 1, 9, 7, 5), generator=g)
    loss_fn = MarginalL1ACELoss(binning="soft", to_onehot_y=True, softmax=True, backend="cpu")
    x_e = logits.clone().requires_grad_(True)
    loss_e = loss_fn(x_e, labels)
    loss_e.backward()
    compiled = torch.compile(loss_fn, fullgraph=True)
    x_c = logits.clone().requires_grad_(True)
    loss_c = compiled(x_c, labels)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_c.grad, x_e.grad, rtol=1e-5, atol=1e-7)


def test_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, generator=g, requires_grad=True)
    lab = torch.randint(0, 3, (2, 40), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x * 1.0
        loss = F.marginal_l1_ace(h, lab, to_onehot_y=True, softmax=True, backend="cpu")
    loss.backward()
    ref = F.marginal_l1_ace(x.detach(), lab, to_onehot_y=True, softmax=True, backend="reference")
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
    assert x.grad is not None and torch.isfinite(x.grad).all()
