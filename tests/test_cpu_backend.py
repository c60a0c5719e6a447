"""The fused C++ CPU backend (csrc/cpu): its ops against the v2 reference (every mode, rater count, moments,
scheme, activation, dtype, grad_output != 1), and what only this backend has: instruction-set builds and the fused
hard path agreeing bitwise with the generic path, thread-count independence, tile / chunk boundaries, large
volumes, opcheck of the ops, and argument errors naming the argument (csrc/contract.h). The cross-backend
conformance suite is tests/test_conformance.py.

Tolerances come from the contract's error budget (docs/kernel_contract.md, "Kinks"), not from trial runs:
- Probabilities in (activation 0): the kernel bins the very float32 values the reference bins and sums in float64
  like it, so statistics agree to the float32 rounding of the output (rtol 2e-6).
- Logits in: the kernel's float32 activation is within ``delta = (C + 8) eps32 p64 + 2^-126`` of the float64 one
  (``p64``). Per (image, row): hard binning may move every entry within delta of an inner edge (``K`` entries: count
  and sum_y by K, sum_p by K + sum delta, sum_p2 by K + 2 sum delta); soft memberships move by at most delta / d
  (d the centre spacing); top-label voxels whose two largest p64 are within 2 delta may pick the other class
  (their y moves: +1 per such voxel on sum_y and sum_py). On top, float32 rounding of the output (rtol 1e-5).
- Gradients: elementwise ``GRAD_RTOL[dtype]`` of the reference gradient plus 1e-5 of its largest entry; voxels
  within delta of a kink (an edge, a centre, a top-label tie) may take the other side and are left out of the
  comparison, and they must be under 1% of the voxels.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import calibops
from calibops import MarginalL1ACELoss
from calibops.reference import binned_stats_prepared, scheme_edges

pytestmark = pytest.mark.skipif(
    calibops.available_backends()["cpu"] is not None,
    reason=f"cpu backend unavailable: {calibops.available_backends()['cpu']}",
)

NONE, SOFTMAX, SIGMOID = 0, 1, 2
HARD, SOFT = 0, 1
LABELS, DENSE = 0, 1
MARGINAL, TOP = 0, 1
EPS32 = torch.finfo(torch.float32).eps
GRAD_RTOL = {torch.float32: 1e-3, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)
OP = torch.ops.calibops.binned_stats
BOP = torch.ops.calibops.binned_stats_backward


def _isas() -> list[str]:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return ["base"] + [i for i, f in (("avx2", " avx2"), ("avx512", " avx512bw")) if f in flags]


def _make(B, C, N, R, dtype, act, tk, seed, target_dtype=None, bad=False, ignore=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, N, generator=g) * 3
    if act == NONE:
        x = torch.softmax(x, 1) if C > 1 else torch.rand(B, C, N, generator=g)
    x = x.to(dtype)
    if tk == LABELS:
        lo, hi = (-2, C + 2) if bad else (0, C)
        t = torch.randint(lo, hi, (B, R, N), generator=g)
        if ignore is not None:
            t[torch.rand(B, R, N, generator=g) < 0.1] = ignore
        t = t.to(target_dtype or torch.int64)
    else:
        td = target_dtype or torch.float32
        t = (
            (torch.rand(B, C, N, generator=g) < 0.3).to(td)
            if td in (torch.bool, torch.uint8)
            else torch.rand(B, C, N, generator=g).to(td)
        )
    return x, t


def _args(M, scheme, act, tk, mode, moments, ignore=None, right=False):
    return (scheme_edges(M, scheme), M, scheme, act, tk, mode, moments, ignore, right)


def _p64(x, act):
    x64 = x.double()
    return torch.softmax(x64, 1) if act == SOFTMAX else torch.sigmoid(x64) if act == SIGMOID else x64


def _used(t, tk, C, ignore, B, N):
    if tk == DENSE:
        return torch.ones(B, N, dtype=torch.bool)
    lab = t.long()
    ok = (lab >= 0) & (lab < C)
    if ignore is not None:
        ok &= lab != ignore
    return ok.all(1)


def _budget(x, t, M, scheme, act, tk, mode, ignore):
    """Per-(image, row) absolute bounds for (count, sum_p, sum_y, sum_p2, sum_py) and the [B, N] mask of voxels
    within delta of a kink (module docstring)."""
    B, C, N = x.shape
    p64 = _p64(x, act)
    delta = torch.zeros_like(p64) if act == NONE else (C + 8) * EPS32 * p64 + 2.0**-126
    used = _used(t, tk, C, ignore, B, N).unsqueeze(1)
    ties = torch.zeros(B, 1, N, dtype=torch.bool)
    if mode == TOP:
        top2 = p64.topk(min(2, C), dim=1).values
        dq = delta.max(1, keepdim=True).values
        if C > 1:
            ties = (top2[:, :1] - top2[:, 1:2]).abs() <= 2 * dq
        q = top2[:, :1]
    else:
        q, dq = p64, delta
    e = scheme_edges(M, scheme).double()
    kinks = e if scheme == SOFT else e[1:-1]
    near = ((q.unsqueeze(-1) - kinks).abs() <= dq.unsqueeze(-1)).any(-1) if kinks.numel() else torch.zeros_like(used)
    near = near & used
    sd = (dq * used).sum(-1, keepdim=True)
    nties = (ties & used).sum(-1, keepdim=True).double()
    if scheme == SOFT:
        d = (e[1:] - e[:-1]).min().item() if M > 1 else 1.0
        k = sd / d
    else:
        k = near.sum(-1, keepdim=True).double()
    if act == NONE:
        k = torch.zeros_like(k)
    bounds = (k, k + sd, (k + nties).unsqueeze(2), k + 2 * sd, k + sd + nties)
    kink_voxels = near.any(1) | ties.any(1) if act != NONE else torch.zeros(B, N, dtype=torch.bool)
    return bounds, kink_voxels


def _check_forward(got, x, t, args):
    _, M, scheme, act, tk, mode, moments, ignore, _right = args
    ref = binned_stats_prepared(x.double(), t, *args)
    bounds, _ = _budget(x, t, M, scheme, act, tk, mode, ignore)
    rtol = 2e-6 if act == NONE else 1e-5
    names = ("count", "sum_p", "sum_y", "sum_p2", "sum_py")
    for name, g, r, b in zip(names, got[:5], ref[:5], bounds):
        assert g.dtype == torch.float32 and g.shape == r.shape and g.is_contiguous(), (name, g.shape, r.shape)
        if g.numel() == 0:
            continue
        err = (g.double() - r).abs()
        allowed = rtol * r.abs() + b + 1e-6
        assert bool((err <= allowed).all()), f"{name}: max excess {(err - allowed).max().item():.3e} {args[2:]}"
    assert got[5].dtype == torch.int64 and torch.equal(got[5], ref[5]), (got[5], ref[5])
    return ref


def _grad_outputs(out, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g) for o in out[:5]]


def _check_backward(x, t, args, gouts):
    _, M, scheme, act, tk, mode, moments, ignore, _right = args
    got = BOP(*gouts, x, t, *args)
    xx = x.double().requires_grad_(True)
    ref_out = binned_stats_prepared(xx, t, *args)
    loss = sum((o * g.double()).sum() for o, g in zip(ref_out[:5], gouts) if o.numel())
    (ref,) = torch.autograd.grad(loss, xx)
    assert got.dtype == x.dtype and got.shape == x.shape
    _, kink = _budget(x, t, M, scheme, act, tk, mode, ignore)
    assert kink.float().mean().item() < 0.01
    keep = ~kink.unsqueeze(1).expand_as(x)
    err = (got.double() - ref).abs()
    allowed = GRAD_RTOL[x.dtype] * ref.abs() + 1e-5 * ref.abs().max().item() + 1e-30
    off = (err > allowed) & keep
    assert not bool(off.any()), f"{int(off.sum())} gradient entries off, max err {err[off].max().item():.3e} {args[2:]}"
    unused = ~_used(t, tk, x.shape[1], ignore, x.shape[0], x.shape[2]).unsqueeze(1).expand_as(x)
    assert bool((got[unused] == 0).all())  # unused voxels: exactly 0
    return got


# ---------------------------------------------------------------------------------------------------------
# The ops against the v2 reference.

OPTION_CASES = [
    (scheme, act, tk, mode, moments, R)
    for scheme, act, tk, mode, moments, R in itertools.product(
        [HARD, SOFT], [NONE, SOFTMAX, SIGMOID], [LABELS, DENSE], [MARGINAL, TOP], [False, True], [1, 3]
    )
    if not (tk == DENSE and R > 1)
]


@pytest.mark.parametrize("scheme,act,tk,mode,moments,R", OPTION_CASES)
def test_ops_match_reference_every_option(scheme, act, tk, mode, moments, R):
    """Statistics, bad counts and the gradient (random grad_output on all five outputs) of every option."""
    B, C, N, M = 2, 5, 1031, 20
    ignore = 2 if tk == LABELS else None
    x, t = _make(B, C, N, R, torch.float32, act, tk, seed=scheme + 3 * act + 7 * mode + R, bad=True, ignore=ignore)
    for right in (False, True):
        args = _args(M, scheme, act, tk, mode, moments, ignore, right)
        got = OP(x, t, *args)
        _check_forward(got, x, t, args)
        _check_backward(x, t, args, _grad_outputs(got, seed=R + right))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme,mode", [(HARD, MARGINAL), (SOFT, TOP), (HARD, TOP), (SOFT, MARGINAL)])
def test_half_inputs_and_target_dtypes(dtype, scheme, mode):
    """float16 / bfloat16 input (the gradient in the same dtype), every label and dense target dtype."""
    B, C, N, M = 2, 3, 517, 15
    for k, ldt in enumerate(LABEL_DTYPES):
        x, t = _make(B, C, N, 2, dtype, SOFTMAX, LABELS, seed=k, target_dtype=ldt, ignore=None)
        args = _args(M, scheme, SOFTMAX, LABELS, mode, k % 2 == 0)
        got = OP(x, t, *args)
        _check_forward(got, x, t, args)
        _check_backward(x, t, args, _grad_outputs(got, seed=k))
    for k, tdt in enumerate(DENSE_DTYPES):
        x, t = _make(B, C, N, 1, dtype, SIGMOID, DENSE, seed=20 + k, target_dtype=tdt)
        args = _args(M, scheme, SIGMOID, DENSE, mode, k % 2 == 1)
        got = OP(x, t, *args)
        _check_forward(got, x, t, args)
        _check_backward(x, t, args, _grad_outputs(got, seed=k))


def test_raters_used_only_when_every_label_valid_and_bad_counted_over_raters():
    """R = 3: a voxel with one rater's label ignored or out of range is left out for every rater; bad[0] counts the
    out-of-range entries of every rater (not voxels); sum_y is per rater."""
    C, M = 3, 4
    x = torch.tensor([[[0.7, 0.2, 0.1, 0.5, 0.3], [0.2, 0.7, 0.8, 0.25, 0.3], [0.1, 0.1, 0.1, 0.25, 0.4]]])
    t = torch.tensor([[[0, 1, 9, 0, 2], [0, 255, 1, 2, 2], [1, 1, -4, 0, 9]]])  # ignore 255
    for mode in (MARGINAL, TOP):
        args = _args(M, HARD, NONE, LABELS, mode, True, ignore=255)
        got = OP(x, t, *args)
        ref = _check_forward(got, x, t, args)
        assert got[5].tolist() == [3, 0]  # 9 (rater 0), -4 and 9 (rater 2); 255 is ignore_index
        assert got[0].sum().item() == (2 * C if mode == MARGINAL else 2)  # voxels 0 and 3 are used
        assert got[2].shape == (1, C if mode == MARGINAL else 1, 3, M)
        assert torch.equal(got[2], ref[2].float())


def test_nonfinite_rule_marginal_and_top_label():
    """NaN / inf p: marginal entries and top-label voxels are left out (gradient 0); bad[1] counts the non-finite p
    of used voxels in either mode; unused voxels are never counted."""
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 2.0, -3.0, 0.5, 7.0, 0.2]]).repeat(2, 3, 1)
    x[:, 1] = x[:, 1].flip(-1)
    t = torch.randint(0, 3, (2, 2, 8))
    t[0, 1, 0] = 7  # voxel 0 of image 0 unused (rater 1 out of range): its NaN is not counted
    expect = {NONE: 2 * 3 * 3, SIGMOID: 2 * 3 * 1, SOFTMAX: 2 * 3 * 4}
    for scheme, act, mode in itertools.product([HARD, SOFT], [NONE, SOFTMAX, SIGMOID], [MARGINAL, TOP]):
        args = _args(9, scheme, act, LABELS, mode, True)
        got = OP(x, t, *args)
        ref = binned_stats_prepared(x, t, *args)
        assert torch.equal(got[5], ref[5]), (scheme, act, mode, got[5], ref[5])
        # voxel 0 of image 0 holds NaN in classes 0 and 2 (softmax: all 3 classes NaN)
        assert got[5][1].item() == expect[act] - (3 if act == SOFTMAX else 2), (scheme, act, mode)
        assert all(bool(torch.isfinite(v).all()) for v in got[:5])
        for a, b in zip(got[:5], ref[:5]):
            torch.testing.assert_close(a, b.float(), rtol=2e-6, atol=1e-6)
        gi = BOP(*(torch.ones_like(o) for o in got[:5]), x, t, *args)
        assert bool(torch.isfinite(gi).all())


def test_top_label_ties_take_lowest_class_and_gradient_goes_to_argmax_only():
    x = torch.tensor([[[0.4, 0.3, 0.2], [0.4, 0.3, 0.5], [0.2, 0.4, 0.3]]])  # voxel 0: tie 0/1 -> class 0
    t = torch.tensor([[[0, 1, 1], [1, 1, 2]]])
    args = _args(4, HARD, NONE, LABELS, TOP, False)
    got = OP(x, t, *args)
    ref = _check_forward(got, x, t, args)
    assert torch.equal(got[2], ref[2].float())
    gs = [torch.zeros_like(o) for o in got[:5]]
    gs[1] = torch.ones_like(got[1])  # d sum_p / d q = 1
    gi = BOP(*gs, x, t, *args)
    assert gi[0].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_empty_shapes_and_zero_classes():
    """B = 0, N = 0: zero statistics; C = 0: empty marginal / zero top-label statistics, bad = [0, 0]."""
    for B, C, N in [(0, 3, 5), (2, 3, 0), (2, 0, 9)]:
        for mode, moments, tk in itertools.product([MARGINAL, TOP], [False, True], [LABELS, DENSE]):
            x = torch.rand(B, C, N)
            t = torch.randint(0, 3, (B, 2, N)) if tk == LABELS else torch.rand(B, C, N)
            args = _args(5, SOFT, SOFTMAX, tk, mode, moments)
            got = OP(x, t, *args)
            ref = binned_stats_prepared(x, t, *args)
            for a, b in zip(got, ref):
                assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            gi = BOP(*(torch.ones_like(o) for o in got[:5]), x, t, *args)
            assert gi.shape == x.shape and bool((gi == 0).all())


@pytest.mark.parametrize("C", [1, 4, 17])
def test_tile_and_chunk_boundaries(C):
    """N around the tile (2048 / C rounded to 16), the fused sub-block (128) and the chunk (16384) sizes."""
    T = max(16, min(1024, (2048 // C) // 16 * 16))
    for N in sorted({1, 15, 127, 129, T - 1, T, T + 1, 16384 + 3}):
        for scheme, mode in [(HARD, MARGINAL), (HARD, TOP), (SOFT, MARGINAL)]:
            x, t = _make(1, C, N, 2, torch.float32, NONE, LABELS, seed=N, bad=True)
            args = _args(20, scheme, NONE, LABELS, mode, mode == MARGINAL and scheme == SOFT)
            got = OP(x, t, *args)
            _check_forward(got, x, t, args)
            _check_backward(x, t, args, _grad_outputs(got, seed=N))


def test_large_volume_accuracy():
    """2^21 voxels per image: float64 blocked sums stay within 1e-5 relative of the float64 reference (the chunk
    partials and the interleaved histogram copies are float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 2**21, generator=g)
    t = torch.rand(1, 2, 2**21, generator=g)
    for scheme, mode in [(HARD, MARGINAL), (SOFT, TOP)]:
        args = _args(20, scheme, NONE, DENSE, mode, True)
        got = OP(x, t, *args)
        ref = binned_stats_prepared(x.double(), t, *args)
        for a, b in zip(got[:5], ref[:5]):
            assert ((a.double() - b).abs() <= 1e-5 * b.abs() + 1e-6).all()


def test_any_strides_accepted():
    """Non-contiguous input / target / edges give the results of their contiguous copies."""
    x, t = _make(2, 4, 300, 3, torch.float32, SOFTMAX, LABELS, seed=3)
    xn = x.transpose(1, 2).contiguous().transpose(1, 2)
    tn = t.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xn.is_contiguous() and not tn.is_contiguous()
    args = _args(10, SOFT, SOFTMAX, LABELS, TOP, True)
    e2 = torch.stack([args[0], args[0]], 1)[:, 0]
    assert not e2.is_contiguous()
    for a, b in zip(OP(xn, tn, e2, *args[1:]), OP(x, t, *args)):
        assert torch.equal(a, b)
    gs = _grad_outputs(OP(x, t, *args), seed=0)
    assert torch.equal(BOP(*gs, xn, tn, e2, *args[1:]), BOP(*gs, x, t, *args))


# ---------------------------------------------------------------------------------------------------------
# Argument checks (csrc/contract.h): ValueError / TypeError naming the argument.


def test_op_argument_errors_name_the_argument():
    x, t = torch.rand(1, 2, 5), torch.zeros(1, 1, 5, dtype=torch.long)
    e = scheme_edges(4, HARD)
    good = (e, 4, HARD, NONE, LABELS, MARGINAL, False, None, False)

    def call(**kw):
        names = ("edges", "num_bins", "scheme", "activation", "target_kind", "mode", "moments", "ignore_index", "right")
        a = dict(zip(names, good))
        a.update({k: v for k, v in kw.items() if k in names})
        return OP(kw.get("input", x), kw.get("target", t), *a.values())

    cases = [
        (ValueError, "num_bins", dict(num_bins=0)),
        (ValueError, "num_bins", dict(num_bins=2**24 + 1)),
        (ValueError, "edges", dict(num_bins=5)),
        (ValueError, "edges", dict(scheme=SOFT)),
        (ValueError, "scheme", dict(scheme=2)),
        (ValueError, "activation", dict(activation=3)),
        (ValueError, "target_kind", dict(target_kind=2)),
        (ValueError, "mode", dict(mode=-1)),
        (ValueError, "input", dict(input=torch.rand(2, 5))),
        (TypeError, "input", dict(input=x.double())),
        (ValueError, "target", dict(target=torch.zeros(1, 5, dtype=torch.long))),
        (ValueError, "target", dict(target=torch.zeros(1, 0, 5, dtype=torch.long))),
        (TypeError, "target", dict(target=t.float())),
        (ValueError, "target", dict(target_kind=DENSE)),
        (TypeError, "target", dict(target_kind=DENSE, target=torch.zeros(1, 2, 5, dtype=torch.int32))),
        (ValueError, "edges", dict(edges=e.double())),
    ]
    for exc, name, kw in cases:
        with pytest.raises(exc, match=name):
            call(**kw)
    out = OP(x, t, *good)
    gs = [torch.zeros_like(o) for o in out[:5]]
    for k, name in enumerate(("grad_count", "grad_sum_p", "grad_sum_y", "grad_sum_p2", "grad_sum_py")):
        bad = list(gs)
        bad[k] = torch.zeros(1, 3, 4) if k < 3 else torch.zeros(1, 2, 4)  # moments off: [0] expected
        with pytest.raises(ValueError, match=name):
            BOP(*bad, x, t, *good)
    with pytest.raises(ValueError, match="grad_sum_p"):
        BOP(gs[0], gs[1].double(), *gs[2:], x, t, *good)


# ---------------------------------------------------------------------------------------------------------
# Determinism: threads, instruction-set builds, fused vs generic path.


def _run_all(x, t, args, seed=0):
    out = list(OP(x, t, *args))
    return out + [BOP(*_grad_outputs(out, seed), x, t, *args)]


def _same_bits(a, b):
    """Bitwise equal, except that NaN payloads / signs are not compared."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    if a.numel() == 0:
        return a.shape == b.shape
    av, bv = a.reshape(-1), b.reshape(-1)
    same = av.view(torch.uint8).view(av.numel(), -1) == bv.view(torch.uint8).view(bv.numel(), -1)
    return bool((same.all(-1) | (av.isnan() & bv.isnan())).all())


DETERMINISM_CASES = [  # (scheme, mode, R, moments)
    (HARD, MARGINAL, 1, False),
    (SOFT, MARGINAL, 1, False),
    (HARD, TOP, 1, False),
    (HARD, MARGINAL, 3, False),
    (SOFT, TOP, 3, True),
    (HARD, MARGINAL, 2, True),
    (HARD, MARGINAL, 1, True),  # the fused forward with moments (brier_score's call)
    (HARD, TOP, 1, True),
]


def test_bitwise_identical_for_1_and_2_threads():
    x, t = _make(2, 4, 70001, 3, torch.float32, SOFTMAX, LABELS, seed=9, bad=True, ignore=1)
    x2, t2 = _make(1, 3, 50021, 1, torch.bfloat16, NONE, DENSE, seed=9)
    before = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            res = []
            for scheme, mode, R, mom in DETERMINISM_CASES:
                res += _run_all(x[:, :, :], t[:, :R], _args(20, scheme, SOFTMAX, LABELS, mode, mom, ignore=1))
                res += _run_all(x2, t2, _args(20, scheme, NONE, DENSE, mode, mom))
            results[n] = res
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[1], results[2]):
        assert _same_bits(a, b)


def test_bitwise_identical_across_isa_builds(monkeypatch):
    """base / avx2 / avx512 builds (those this CPU runs) give bitwise equal results (no FMA contraction)."""
    x, t = _make(2, 5, 3001, 3, torch.float16, SOFTMAX, LABELS, seed=11)
    isas = _isas()
    outs = {}
    for isa in isas:
        monkeypatch.setenv("CALIBOPS_CPU_ISA", isa)
        outs[isa] = [
            r
            for scheme, mode, R, mom in DETERMINISM_CASES
            for act in (SOFTMAX, SIGMOID)
            for r in _run_all(x, t[:, :R], _args(20, scheme, act, LABELS, mode, mom))
        ]
    for isa in isas[1:]:
        for a, b in zip(outs["base"], outs[isa]):
            assert _same_bits(a, b), isa
    monkeypatch.setenv("CALIBOPS_CPU_ISA", "no-such-isa")
    with pytest.raises(RuntimeError, match="CALIBOPS_CPU_ISA"):
        OP(x, t, *_args(20, HARD, NONE, LABELS, MARGINAL, False))


@pytest.mark.parametrize("moments", [False, True])
@pytest.mark.parametrize("act", [NONE, SOFTMAX, SIGMOID])
@pytest.mark.parametrize(
    "tk,mode,R",
    [(LABELS, MARGINAL, 1), (DENSE, MARGINAL, 1), (LABELS, TOP, 1), (LABELS, MARGINAL, 3), (LABELS, TOP, 3)],
)
def test_fused_hard_path_bitwise_equals_generic(monkeypatch, act, tk, mode, R, moments):
    """The fused hard path (C <= 16, M <= 30; SIMD builds, and the base build's scalar version with
    CALIBOPS_CPU_FUSED=2) gives bitwise the results of the generic path (CALIBOPS_CPU_FUSED=0): statistics (the
    second moments too), both bad counts and gradient (with moments: fused for labels, generic for dense targets),
    in every ISA build, for tails, odd class counts (templated 2/3/4 and generic), half inputs,
    right=True, ignore_index, out-of-range labels, NaN/inf and a gradient large enough for non-temporal stores;
    marginal and top-label, 1 and 3 raters."""
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
        ig = ignore if tk == LABELS else None
        x, t = _make(B, C, N, R, dtype, act, tk, seed=C * 7 + N, ignore=ig, bad=bad and tk == LABELS)
        if dtype == torch.float32:
            x = x.clone()
            x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        args = _args(M, HARD, act, tk, mode, moments, ig, right)
        outs = {}
        for isa in _isas():
            for fused in ("1", "0", "2"):
                monkeypatch.setenv("CALIBOPS_CPU_ISA", isa)
                monkeypatch.setenv("CALIBOPS_CPU_FUSED", fused)
                outs[isa, fused] = _run_all(x, t, args, seed=1)
        ref = outs["base", "0"]
        for key, res in outs.items():
            for a, b in zip(res, ref):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert _same_bits(a, b), (key, B, C, N)


# ---------------------------------------------------------------------------------------------------------
# Registration: opcheck, compile.


@pytest.mark.parametrize("scheme,mode,moments", [(HARD, MARGINAL, False), (SOFT, TOP, True), (HARD, TOP, True)])
def test_opcheck(scheme, mode, moments):
    M = 6
    x, t = _make(2, 3, 37, 2, torch.float32, SOFTMAX, LABELS, seed=1, ignore=4)
    xd, td = _make(1, 2, 29, 1, torch.float16, NONE, DENSE, seed=2, target_dtype=torch.bool)
    for inp, tgt, act, tk, ig in [(x, t, SOFTMAX, LABELS, 4), (xd, td, NONE, DENSE, None)]:
        args = _args(M, scheme, act, tk, mode, moments, ig, tk == DENSE)
        torch.library.opcheck(OP, (inp.clone().requires_grad_(inp.dtype == torch.float32), tgt, *args))
        gs = tuple(_grad_outputs(OP(inp, tgt, *args), seed=0))
        torch.library.opcheck(BOP, gs + (inp, tgt, *args))


@pytest.mark.parametrize("scheme,mode,moments", [(HARD, MARGINAL, False), (SOFT, MARGINAL, True), (SOFT, TOP, False)])
def test_eager_autograd_function_is_the_registered_formula(scheme, mode, moments):
    """Eager calls go through one autograd.Function (backends.extension.eager_autograd) instead of torch.library's
    per-call wrapper; its gradients are bitwise those of the registered formula, for every statistic."""
    from calibops.backends import stats_function

    fn = stats_function("cpu")
    x, t = _make(2, 3, 37, 2, torch.float32, SOFTMAX, LABELS, seed=3, ignore=4)
    args = _args(6, scheme, SOFTMAX, LABELS, mode, moments, 4, False)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    outs_a, outs_b = fn(xa, t, *args), OP(xb, t, *args)
    gs = tuple(_grad_outputs(outs_b, seed=5))
    used = [k for k in range(5) if outs_a[k].numel()]
    ga = torch.autograd.grad([outs_a[k] for k in used], xa, [gs[k] for k in used])[0]
    gb = torch.autograd.grad([outs_b[k] for k in used], xb, [gs[k] for k in used])[0]
    for a, b in zip(outs_a, outs_b):
        assert _same_bits(a.detach(), b.detach())
    assert _same_bits(ga, gb)
    assert not outs_a[5].requires_grad


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
