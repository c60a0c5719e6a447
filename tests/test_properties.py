"""Property-based cross-backend test (hypothesis): every available backend (tests/_kernel_backends.py) on drawn
v2 problems, through the one error budget of tests/_conformance.py (kernel backends against the reference, the
reference against the float64 NumPy oracle).

Drawn: shapes (B, C and N of 1 included, N rarely a multiple of any kernel's tile), input dtypes (float32 /
float16 / bfloat16), every option (mode, hard / soft, right, ignore_index, none / softmax / sigmoid, labels with
1-3 raters and every label dtype / dense targets of every dtype, moments), probabilities exactly on edges and
centres, ties, NaN / +-inf entries; at the public-API level non-contiguous layouts (permuted, strided,
channels-last views) with include_background, multi_rater and the public output shapes.
Sized for CI: derandomized, and the interpreted / emulated backends only get problems of <= 64 voxels.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import calibops.functional as F  # noqa: E402

from . import _conformance as cf  # noqa: E402
from . import _kernel_backends as kb  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SLOW_MAX_N = 64
SETTINGS = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def op_problems(draw):
    """A kernel-op problem (tests/_conformance.py::make_case with drawn sizes and options)."""
    tk = draw(st.sampled_from([0, 1]))
    label_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]))
    ii = draw(st.sampled_from([None, -1, 0, 255])) if tk == 0 else None
    if label_dtype == torch.uint8 and ii == -1:
        ii = 255
    if label_dtype == torch.int8 and ii == 255:
        ii = -1
    kw = dict(
        B=draw(st.integers(1, 2)),
        C=draw(st.integers(1, 5)),
        N=draw(st.sampled_from([1, 2, 7, 17, 33, 64, 97, 300])),
        R=draw(st.integers(1, 3)) if tk == 0 else 1,
        M=draw(st.sampled_from([1, 2, 5, 7, 20, 30, 65])),
        scheme=draw(st.sampled_from([0, 1])),
        activation=draw(st.sampled_from([0, 1, 2])),
        target_kind=tk,
        mode=draw(st.sampled_from([0, 1])),
        moments=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        right=draw(st.booleans()),
        ignore_index=ii,
        label_dtype=label_dtype,
        dense_dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8])),
        specials=draw(st.booleans()),
        nonfinite=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    return cf.make_case(**kw, name="hypothesis"), draw(st.sampled_from([1.0, -0.5, 3.0]))


@settings(max_examples=40, **SETTINGS)
@given(problem=op_problems())
def test_every_backend_conforms_at_op_level(problem):
    case, scale = problem
    B, C, N, _, _ = case.shape
    grads = cf.make_grads(case, seed=N * 7 + case.num_bins, scale=scale)
    for be in kb.backends():
        if be.slow and B * N > SLOW_MAX_N:
            continue
        cf.conform(be, case, grads)


API_BACKENDS = [b for b in ("cpu", "triton") if b in kb.backend_names()]


@st.composite
def api_problems(draw):
    """A public-API problem [B, C, *spatial] with a non-contiguous input layout and the API's target forms."""
    B = draw(st.integers(1, 2))
    # C >= 2: one channel follows MONAI's binary rule in the public API (tests/test_options.py), not the op's C = 1
    C = draw(st.integers(2, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    act = draw(st.sampled_from(["none", "softmax", "sigmoid"]))
    onehot = draw(st.booleans())
    multi_rater = onehot and draw(st.booleans())
    R = draw(st.integers(1, 3)) if multi_rater else 1
    layout = draw(st.sampled_from(["contiguous", "permuted", "strided", "channels_last"]))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
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
    target = torch.randint(0, C, (B, R, *spatial), generator=g) if onehot else torch.rand(*shape, generator=g)
    mode = draw(st.sampled_from(["marginal", "top_label"]))
    opts = dict(
        num_bins=draw(st.sampled_from([1, 5, 20])),
        binning=draw(st.sampled_from(["hard", "soft"])),
        include_background=draw(st.booleans()) if mode == "marginal" else True,
        to_onehot_y=onehot,
        softmax=act == "softmax",
        sigmoid=act == "sigmoid",
        right=draw(st.booleans()),
        ignore_index=draw(st.sampled_from([None, 0])) if onehot else None,
        mode=mode,
        multi_rater=multi_rater,
        moments=draw(st.booleans()),
    )
    return x, target, opts


def _op_view(stats, opts, B, K, R, M):
    """The public statistics in the op's shapes: [B, K, M] and sum_y [B, K, R, M]."""
    names = ("count", "sum_p", "sum_y") + (("sum_p2", "sum_py") if opts["moments"] else ())
    out = [getattr(stats, n).reshape(B, K, R, M) if n == "sum_y" else getattr(stats, n).reshape(B, K, M) for n in names]
    if not opts["moments"]:
        out += [torch.zeros(0), torch.zeros(0)]
    return out


@pytest.mark.skipif(not API_BACKENDS, reason="no kernel backend reachable through the public API here")
@settings(max_examples=15, **SETTINGS)
@given(problem=api_problems())
def test_public_api_layouts_conform(problem):
    """The public binned_stats on a kernel backend against the reference, both through autograd, compared in the
    op's shapes within the budget of the equivalent op-level case (background row dropped where the API drops it)."""
    x, target, opts = problem
    B, C = x.shape[:2]
    M = opts["num_bins"]
    top = opts["mode"] == "top_label"
    R = target.shape[1] if opts["to_onehot_y"] else 1
    drop = not opts["include_background"] and C > 1 and not top
    K = 1 if top else C - int(drop)
    act = 1 if opts["softmax"] else 2 if opts["sigmoid"] else 0
    case = cf.Case(
        x.reshape(B, C, -1),
        target.reshape(B, R, -1) if opts["to_onehot_y"] else target.reshape(B, C, -1),
        M,
        1 if opts["binning"] == "soft" else 0,
        act,
        0 if opts["to_onehot_y"] else 1,
        1 if top else 0,
        opts["moments"],
        opts["ignore_index"],
        opts["right"],
        "public API",
    )
    gr = torch.Generator().manual_seed(M)
    full = cf.make_grads(case, seed=int(torch.randint(0, 1000, (1,), generator=gr)))
    grads = [g[:, 1:] if (drop and g.dim() > 1) else g for g in full]
    if drop:  # the dropped background row gets no gradient
        full = tuple(torch.cat([torch.zeros_like(g[:, :1]), g[:, 1:]], 1) if g.dim() > 1 else g for g in full)

    def run(backend):
        xb = x.detach().clone().requires_grad_(True)
        stats = F.binned_stats(xb, target, backend=backend, validate=False, **opts)
        outs = _op_view(stats, opts, B, K, R, M)
        loss = sum((o * gg).sum() for o, gg in zip(outs, grads) if o.numel())
        if loss.requires_grad:
            loss.backward()
        grad = xb.grad if xb.grad is not None else torch.zeros_like(x)
        return [o.detach() for o in outs], grad.reshape(B, C, -1)

    ref, ref_grad = run("reference")
    ref_full = list(kb.backends()[0].forward(*case.args()))
    budget = cf.error_budget(case, ref_full, full, ref_grad)
    if drop:
        budget.stats = tuple(t[:, 1:] if t.dim() > 1 else t for t in budget.stats)
    N = case.input.shape[-1]
    for name in API_BACKENDS:
        if kb.get(name).slow and B * N > SLOW_MAX_N:
            continue
        got, got_grad = run(name)
        what = f"{name} {tuple(x.shape)} {x.dtype} stride={x.stride()} {opts}"
        cf.check(case, [*got, ref_full[5]], [*ref, ref_full[5]], budget, what, got_grad, ref_grad, op_outputs=False)
