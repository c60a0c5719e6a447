"""Property-based cross-backend test (hypothesis): every available backend (tests/_kernel_backends.py) against the
reference on drawn problems.

Drawn: shapes (B and spatial sizes of 1 included, N rarely a multiple of any kernel's tile), input dtypes
(float32 / float16 / bfloat16), options (hard / soft, right, ignore_index, softmax / sigmoid / none, labels /
dense targets, include_background), probabilities exactly on edges and centres, NaN / +-inf entries, and at the
public-API level non-contiguous layouts (permuted, strided, channels-last views).

Error budget (docs/kernel_contract.md; derivations in tests/test_cuda_backend.py, tests/test_cpu_backend.py):
- statistics: ``2e-5·(|stat| + count)`` (float32 runs of <= 256 terms) + for soft ``8·eps32·(N + M·sqrt(N))``
  (float32 memberships); hard counts exact.
- kinks (the contract's kink rule): from logits a backend's p is within ``δ = (C + 8)·eps32·p + 2^-126`` of the
  reference's, so entries within δ of an edge / centre are excluded: hard count / sum_y of a bin may differ by
  the near-kink entries next to it (sum_p also by Σ δ), soft statistics by Σ δ / d (+ Σ δ), and the gradients of
  their voxels are not compared. Probabilities given directly are binned exactly by every backend: no exclusion.
- gradients: elementwise ``GRAD_RTOL[dtype]`` + 1e-5 of the largest; non-finite entries exactly 0.
- ``bad`` exactly equal.
Sized for CI: derandomized, and the interpreted / emulated backends only get problems of <= 64 voxels.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import calibops.functional as F  # noqa: E402
from calibops.reference import bin_centres, bin_edges, binned_stats_prepared  # noqa: E402

from . import _kernel_backends as kb  # noqa: E402

EPS32 = float(torch.finfo(torch.float32).eps)
TINY = 2.0**-126
STAT_RTOL = 2e-5
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLOW_MAX_N = 64
SETTINGS = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _edges(M, soft):
    return bin_centres(M) if soft else bin_edges(M)


def _p_ref(x, act):
    """The reference's float32 probabilities [B, C, N]."""
    x = x.float()
    return torch.softmax(x, 1) if act == 1 else torch.sigmoid(x) if act == 2 else x


def kink_allowance(x, act, M, soft):
    """(extra [3, B, C, M] allowed on (count, sum_p, sum_y), [B, C, N] entries whose gradient is not compared),
    from the kink rule. Activation none: nothing (exact binning)."""
    B, C, N = x.shape
    p = _p_ref(x, act).double()
    zero = torch.zeros(3, B, C, M, dtype=torch.float64)
    kinks = (bin_centres(M) if soft else bin_edges(M)[1:-1]).double()
    if act == 0 or kinks.numel() == 0:
        return zero, torch.zeros(B, C, N, dtype=torch.bool)
    delta = ((C + 8) if act == 1 else 9) * EPS32 * p.nan_to_num(0.0).abs() + TINY
    dist, idx = (p.unsqueeze(-1) - kinks).abs().min(-1)
    near = dist <= delta  # NaN p: False
    if soft:
        d = float((kinks[1:] - kinks[:-1]).min()) if M > 1 else 1.0
        s = (delta * near).sum(-1, keepdim=True) / d
        extra = torch.stack([s, s + (delta * near).sum(-1, keepdim=True), s]).expand(3, B, C, M)
    else:
        j_edge = idx + 1  # inner edge e[j_edge], between bins j_edge - 1 and j_edge
        adj = torch.zeros(B, C, M, dtype=torch.float64)
        for j in range(M):
            adj[..., j] = (near & ((j_edge == j) | (j_edge == j + 1))).sum(-1)
        s = (delta * near).sum(-1, keepdim=True)
        extra = torch.stack([adj, adj + s, adj])
    skip = near.any(1, keepdim=True).expand(B, C, N) if act == 1 else near
    return extra, skip


def check_stats(got, ref, N, M, soft, extra, what):
    cnt, sp, sy = (v.detach().cpu() for v in got[:3])
    rc, rsp, rsy = (v.detach().cpu() for v in ref[:3])
    atol = 8 * EPS32 * (N + M * N**0.5) if soft else 0.0
    for k, (nm, a, b) in enumerate((("count", cnt, rc), ("sum_p", sp, rsp), ("sum_y", sy, rsy))):
        assert a.shape == b.shape and a.dtype == torch.float32, f"{what}: {nm} {a.dtype} {tuple(a.shape)}"
        tol = STAT_RTOL * (b.double().abs() + rc.double().abs()) + atol + 1e-6 + extra[k]
        err = (a.double() - b.double()).abs()
        assert bool((err <= tol).all()), f"{what}: {nm} off by {float((err / tol).max()):.3g}x its tolerance"
    if not soft and float(extra[0].sum()) == 0:
        assert torch.equal(cnt, rc), f"{what}: hard counts differ"


def check_grad(g, g_ref, skip, nonfinite, dtype, what):
    g, g_ref = g.detach().cpu(), g_ref.detach().cpu()
    assert g.dtype == dtype and g.shape == g_ref.shape, f"{what}: {g.dtype} {tuple(g.shape)}"
    assert bool((g[nonfinite] == 0).all()), f"{what}: a non-finite entry got a non-zero gradient"
    keep = ~skip
    if not bool(keep.any()):
        return
    a, b = g.float()[keep], g_ref.float()[keep]
    torch.testing.assert_close(
        a, b, rtol=GRAD_RTOL[dtype], atol=1e-5 * float(g_ref.float().abs().max()) + 1e-30, msg=lambda m: f"{what}: {m}"
    )


@st.composite
def op_problems(draw):
    """A kernel-op problem: contiguous [B, C, N] input, target, options; with exact kinks and non-finite values."""
    B = draw(st.integers(1, 2))
    C = draw(st.integers(1, 5))
    N = draw(st.sampled_from([1, 2, 7, 17, 33, 64, 97, 300]))
    M = draw(st.sampled_from([1, 2, 5, 7, 20, 30]))
    soft = draw(st.booleans())
    right = draw(st.booleans())
    act = draw(st.sampled_from([0, 1, 2]))
    labels = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    ignore_index = draw(st.sampled_from([None, -1, 0, 255])) if labels else None
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if act == 0:
        x = torch.softmax(torch.randn(B, C, N, generator=g) * 3, 1) if C > 1 else torch.rand(B, C, N, generator=g)
        if draw(st.booleans()):  # probabilities exactly on edges / centres
            k = torch.cat([bin_edges(M), bin_centres(M)])
            sel = torch.rand(B, C, N, generator=g) < 0.5
            x = torch.where(sel, k[torch.randint(0, k.numel(), (B, C, N), generator=g)], x)
    else:
        x = torch.randn(B, C, N, generator=g) * draw(st.sampled_from([0.5, 3.0, 30.0]))
    if draw(st.booleans()):  # non-finite entries
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")])
        sel = torch.rand(B, C, N, generator=g) < 0.1
        x = torch.where(sel, vals[torch.randint(0, 3, (B, C, N), generator=g)], x)
    x = x.to(dtype)
    if labels:
        t = torch.randint(-1, C + 1, (B, N), generator=g)
        if ignore_index is not None:
            t[torch.rand(B, N, generator=g) < 0.2] = ignore_index
        t = t.to(draw(st.sampled_from([torch.int64, torch.int32, torch.int16])))
    else:
        td = draw(st.sampled_from([torch.float32, torch.float16, torch.bool, torch.uint8]))
        t = (
            (torch.rand(B, C, N, generator=g) < 0.4).to(td)
            if td in (torch.bool, torch.uint8)
            else torch.rand(B, C, N, generator=g).to(td)
        )
    return x, t, M, soft, act, labels, ignore_index, right


@settings(max_examples=30, **SETTINGS)
@given(problem=op_problems())
def test_every_backend_matches_reference_at_op_level(problem):
    x, t, M, soft, act, labels, ii, right = problem
    B, C, N = x.shape
    e = _edges(M, soft)
    gr = torch.Generator().manual_seed(N * 7 + M)
    grads = tuple(torch.randn(B, C, M, generator=gr) * s for s in (0.5, 1.0, 0.7))
    ref = binned_stats_prepared(x, t, e, M, soft, act, labels, ii, right)
    g_ref = kb.reference_backward(*grads, x, t, e, M, soft, act, labels, ii, right)
    extra, skip = kink_allowance(x, act, M, soft)
    nonfinite = ~torch.isfinite(_p_ref(x, act))
    for be in kb.backends()[1:]:
        if be.slow and N > SLOW_MAX_N:
            continue
        what = f"{be.name} B{B} C{C} N{N} M{M} soft={soft} act={act} labels={labels} ii={ii} right={right} {x.dtype}"
        got = be.forward(x, t, e, M, soft, act, labels, ii, right)
        assert got[3].dtype == torch.int64 and torch.equal(got[3].cpu(), ref[3]), f"{what}: bad {got[3]} {ref[3]}"
        check_stats(got, ref, N, M, soft, extra, what)
        g = be.backward(*grads, x, t, e, M, soft, act, labels, ii, right)
        check_grad(g, g_ref, skip, nonfinite, x.dtype, what)


API_BACKENDS = [b for b in ("cpu", "triton") if b in kb.backend_names()]


@st.composite
def api_problems(draw):
    """A public-API problem [B, C, *spatial] with a non-contiguous input layout and the API's target forms."""
    B = draw(st.integers(1, 2))
    C = draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    act = draw(st.sampled_from(["none", "softmax", "sigmoid"]))
    onehot = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "permuted", "strided", "channels_last"]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, *spatial)
    if layout == "strided":  # every other element of a twice-as-long last dim
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    elif layout == "permuted":  # allocated with the spatial dims reversed, viewed back
        base = torch.randn(B, C, *spatial[::-1], generator=g).permute(0, 1, *range(len(spatial) + 1, 1, -1))
    elif layout == "channels_last":  # classes innermost in memory
        base = torch.randn(B, *spatial, C, generator=g).movedim(-1, 1)
    else:
        base = torch.randn(*shape, generator=g)
    x = (base * 3) if act != "none" else (torch.softmax(base * 3, 1) if C > 1 else torch.sigmoid(base))
    x = x.to(dtype)
    if not x.is_contiguous() and layout == "contiguous":
        x = x.contiguous()
    if onehot:
        target = torch.randint(0, C, (B, 1, *spatial), generator=g)
    else:
        target = torch.rand(*shape, generator=g)
    opts = dict(
        num_bins=draw(st.sampled_from([1, 5, 20])),
        binning=draw(st.sampled_from(["hard", "soft"])),
        include_background=draw(st.booleans()),
        to_onehot_y=onehot,
        softmax=act == "softmax",
        sigmoid=act == "sigmoid",
        right=draw(st.booleans()),
        ignore_index=draw(st.sampled_from([None, 0])) if onehot else None,
    )
    return x, target, opts


@pytest.mark.skipif(not API_BACKENDS, reason="no kernel backend reachable through the public API here")
@settings(max_examples=15, **SETTINGS)
@given(problem=api_problems())
def test_public_api_layouts_match_reference(problem):
    x, target, opts = problem
    B, C = x.shape[:2]
    M, soft = opts["num_bins"], opts["binning"] == "soft"
    act = 1 if opts["softmax"] else 2 if opts["sigmoid"] else 0
    xr = x.detach().clone().requires_grad_(True)
    ref = F.binned_stats(xr, target, backend="reference", validate=False, **opts)
    gr = torch.Generator().manual_seed(M)
    w = [torch.randn(r.shape, generator=gr) for r in ref]
    sum(((r * wi).sum() for r, wi in zip(ref, w))).backward()
    extra, skip = kink_allowance(x.reshape(B, C, -1), act, M, soft)
    if not opts["include_background"] and C > 1:
        extra = extra[:, :, 1:]
    N = x[0, 0].numel()
    for name in API_BACKENDS:
        if kb.get(name).slow and B * N > SLOW_MAX_N:
            continue
        xb = x.detach().clone().requires_grad_(True)
        got = F.binned_stats(xb, target, backend=name, validate=False, **opts)
        what = f"{name} {tuple(x.shape)} {x.dtype} stride={x.stride()} {opts}"
        check_stats(got, ref, N, M, soft, extra, what)
        sum(((r * wi).sum() for r, wi in zip(got, w))).backward()
        check_grad(xb.grad.reshape(B, C, -1), xr.grad.reshape(B, C, -1), skip, skip & False, x.dtype, what)
