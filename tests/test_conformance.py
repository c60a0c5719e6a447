"""Backend conformance (docs/kernel_contract.md, v2): every backend, every mode, target kind and option, values
and gradients, against the reference within the one error budget of tests/_conformance.py (the reference itself
against the independent float64 NumPy oracle, tests/_oracle.py).

Backends (tests/_kernel_backends.py): reference, cpu, triton (interpreter on CPU), cuda (on a GPU), cuda-emu
(the CUDA kernels' host emulation). Each test is parametrised over all of them; one that is unavailable here is
skipped with its reason (``-ra`` lists them) and :func:`test_backends_report` prints what ran.

The grid (``test_grid``) crosses backend x mode x target (labels R=1, labels R=3, dense) x scheme x activation x
moments x dtype x right on a random problem with the contract's special values sprinkled in (exact edges and
centres, p = 0 / 1, values outside [0, 1], ties, NaN / +-inf, ignored and out-of-range labels, an empty class)
and random gradients for every output. The interpreted / emulated backends run the same tiny problems; their
grid items beyond one (dtype, right) pair per option combination are marked ``slow``. The other tests pin one
rule each: exact kinks, all-ignored images, ties, degenerate shapes, tile tails, many bins, each output's gradient
alone, target dtypes, strides, ``bad``, determinism; ``test_budget_detects_mutations`` shows the budget catches
small deliberate bugs.
"""

from __future__ import annotations

import itertools
import os
import zlib

import pytest
import torch

from . import _conformance as cf
from . import _kernel_backends as kb

BACKENDS = list(kb.ALL_BACKENDS)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TARGETS = {"labels_r1": (0, 1), "labels_r3": (0, 3), "dense": (1, 1)}
MODES = {"marginal": 0, "top_label": 1}
SCHEMES = {"hard": 0, "soft": 1}
ACTS = {"none": 0, "softmax": 1, "sigmoid": 2}
SLOW_BACKENDS = ("triton", "cuda-emu")


def _seed(*key: object) -> int:
    return zlib.crc32(repr(key).encode())


def test_backends_report():
    """Which backends this run checks, and why the others are not (never silently dropped)."""
    found = kb.backend_names()
    assert found[0] == "reference"
    for name in kb.ALL_BACKENDS:
        assert (name in found) != (name in kb.reason_missing), name
        assert name in found or kb.reason_missing[name], f"{name} missing without a reason"
    lines = [f"  {n:9s} {'ran' if n in found else 'unavailable: ' + kb.reason_missing[n]}" for n in kb.ALL_BACKENDS]
    print("conformance backends:\n" + "\n".join(lines))
    if os.environ.get("CALIBOPS_TEST_REQUIRE_EXT", "0") == "1":
        assert "cpu" in found, f"cpu backend required: {kb.reason_missing.get('cpu')}"
    if torch.cuda.is_available():
        assert "triton" in found, f"triton required on a GPU machine: {kb.reason_missing.get('triton')}"


# ---------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------
def _grid():
    combos = list(itertools.product(MODES, TARGETS, SCHEMES, ACTS, (False, True)))
    for backend in BACKENDS:
        for k, (mode, target, scheme, act, moments) in enumerate(combos):
            core_dtype, core_right = list(DTYPES)[k % 3], bool((k // 3) % 2)
            for dtype, right in itertools.product(DTYPES, (False, True)):
                marks = ()
                if backend in SLOW_BACKENDS and (dtype, right) != (core_dtype, core_right):
                    marks = (pytest.mark.slow,)
                yield pytest.param(backend, mode, target, scheme, act, moments, dtype, right, marks=marks)


@pytest.mark.parametrize("backend,mode,target,scheme,act,moments,dtype,right", list(_grid()))
def test_grid(backend, mode, target, scheme, act, moments, dtype, right):
    be = kb.get(backend)
    tk, R = TARGETS[target]
    seed = _seed(mode, target, scheme, act, moments, dtype, right)
    case = cf.make_case(
        B=2,
        C=4 if MODES[mode] else 3,
        N=37,
        R=R,
        M=7,
        scheme=SCHEMES[scheme],
        activation=ACTS[act],
        target_kind=tk,
        mode=MODES[mode],
        moments=moments,
        dtype=DTYPES[dtype],
        right=right,
        seed=seed,
        name="grid",
    )
    cf.conform(be, case, cf.make_grads(case, seed=seed, scale=1.5))


# ---------------------------------------------------------------------------------------------------------
# One rule each
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,target", [(0, (0, 1)), (1, (0, 3)), (0, (1, 1)), (1, (1, 1))])
@pytest.mark.parametrize("scheme,right", [(0, False), (0, True), (1, False), (1, True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_kinks(backend, scheme, right, mode, target):
    """p exactly on every edge / centre and one float32 step either side, p = 0, p = 1, outside [0, 1], for
    several M (int(p*M) under- and over-estimates the bin of an edge value for some): every backend takes the
    contract's side (hard counts bitwise equal, statistics and gradients within rounding: the budget has no kink
    allowance for probabilities)."""
    be = kb.get(backend)
    tk, R = target
    for M in (1, 2, 7, 13, 20):
        case = cf.exact_kink_case(M, scheme, right, mode=mode, target_kind=tk, R=R)
        case = cf.with_(case, moments=True)
        budget = cf.conform(be, case, cf.make_grads(case, seed=M))
        assert budget.uncertain == 0
        if scheme == 0:
            got = be.forward(*case.args())[0]
            ref = kb.backends()[0].forward(*case.args())[0]
            assert torch.equal(got.cpu(), ref), f"{backend} M={M}: hard counts differ"


@pytest.mark.parametrize("mode,R", [(0, 1), (0, 3), (1, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_image_and_empty_class(backend, mode, R):
    """Image 1 of 3 has every voxel ignored (one rater's ignore_index is enough), class 2 of 4 is never labelled:
    zero statistics and zero gradient for the image, a zero sum_y row for the class, finite everywhere."""
    be = kb.get(backend)
    for act in (0, 1):
        case = cf.make_case(
            B=3,
            C=4,
            N=29,
            R=R,
            M=6,
            activation=act,
            mode=mode,
            moments=True,
            nonfinite=False,
            specials=False,
            ignore_index=255,
            seed=_seed("ign", mode, R, act),
        )
        t = case.target.clone()
        t[t == 2] = 3
        t[1, R - 1] = 255
        case = cf.with_(case, target=t, name="all-ignored image, empty class")
        grads = cf.make_grads(case, seed=act)
        cf.conform(be, case, grads)
        out = be.forward(*case.args())
        g = be.backward(*grads, *case.args())
        assert all(float(o[1].abs().sum()) == 0 for o in out[:5]) and float(g[1].abs().sum()) == 0
        if mode == 0:
            assert float(out[2][:, 2].abs().sum()) == 0 and float(out[0][:, 2].sum()) > 0


@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_top_label_ties_lowest_index(backend, act):
    """Voxels whose top two (or three) probabilities are equal: the lowest class index is the top label, so the
    label decides 'correct'. Logits: equal logits give bitwise equal softmax probabilities."""
    be = kb.get(backend)
    if act == 0:
        cols = [[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0], [0.5, 0.25, 0.5]]
    else:
        cols = [[1.0, 1.0, -1.0], [-2.0, 0.5, 0.5], [0.3, 0.3, 0.3], [4.0, -1.0, 4.0], [0.0, 0.0, -float("inf")]]
    x = torch.tensor(cols).T.unsqueeze(0).contiguous()  # [1, 3, 5]
    expected_top = [0, 1, 0, 0, 0]
    for lab_shift in (0, 1):
        t = torch.tensor([[(a + lab_shift) % 3 for a in expected_top]]).unsqueeze(0)
        for scheme in (0, 1):
            case = cf.Case(x, t, 5, scheme, act, 0, 1, True, None, False, f"ties shift={lab_shift}")
            cf.conform(be, case, cf.make_grads(case, seed=scheme))
            if act == 0:
                sum_y = be.forward(*case.args())[2]
                assert float(sum_y.sum()) == (5.0 if lab_shift == 0 else 0.0), f"{backend}: tie not to lowest index"


@pytest.mark.parametrize("B,C,N", [(0, 3, 5), (2, 3, 0), (2, 1, 9), (1, 1, 1), (3, 2, 1), (2, 0, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_shapes(backend, B, C, N):
    """B = 0 / N = 0: zero statistics, bad = [0, 0]; C = 1 (top-label = marginal); C = 0: empty (marginal) or
    zero (top-label) statistics."""
    be = kb.get(backend)
    for mode, tk, scheme, act in itertools.product((0, 1), (0, 1), (0, 1), (0, 2)):
        if C == 0 and act == 1:
            continue
        R = 2 if tk == 0 else 1
        case = cf.make_case(
            B=B,
            C=C,
            N=N,
            R=R,
            M=4,
            scheme=scheme,
            activation=act,
            target_kind=tk,
            mode=mode,
            moments=True,
            seed=_seed(B, C, N, mode, tk, scheme, act),
            name="degenerate",
        )
        cf.conform(be, case, cf.make_grads(case, seed=1))
        if B * C * N == 0:
            out = be.forward(*case.args())
            assert out[5].tolist() == [0, 0] and all(float(o.abs().sum()) == 0 for o in out[:5])
    if C == 1:  # top-label of one class is its marginal statistics
        case = cf.make_case(B=B, C=1, N=N, R=1, M=5, activation=2, moments=True, seed=3)
        a = be.forward(*case.args())
        b = be.forward(*cf.with_(case, mode=1).args())
        for u, v in zip(a[:5], b[:5]):
            assert torch.equal(u, v)


TAIL_N = [1, 2, 3, 15, 31, 33, 63, 65, 127, 129, 255, 257, 1023, 1025, 4097]


@pytest.mark.parametrize("N", TAIL_N)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tile_tails(backend, N):
    """Odd N around every power-of-two tile size (vector widths, Triton blocks, CUDA tiles), options cycling."""
    be = kb.get(backend)
    if be.slow and N > 257:
        pytest.skip(f"{backend} is interpreted / emulated: N <= 257 (larger N runs on the fast backends)")
    k = TAIL_N.index(N)
    case = cf.make_case(
        B=2,
        C=3,
        N=N,
        R=1 + k % 3,
        M=9,
        scheme=k % 2,
        activation=k % 3,
        target_kind=(k // 3) % 2,
        mode=(k // 2) % 2,
        moments=k % 4 == 0,
        seed=_seed("tail", N),
        name="tail",
    )
    cf.conform(be, case, cf.make_grads(case, seed=N))


@pytest.mark.parametrize("M", [1, 2, 63, 64, 65, 100, 257, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_num_bins(backend, M):
    """M = 1 and M around 64 (the Triton kernels switch to a scatter kernel above 64 bins), up to 1000."""
    be = kb.get(backend)
    for scheme, mode in itertools.product((0, 1), (0, 1)):
        case = cf.make_case(
            B=2,
            C=3,
            N=47,
            R=2,
            M=M,
            scheme=scheme,
            activation=1 + mode,
            mode=mode,
            moments=True,
            seed=_seed("bins", M, scheme, mode),
            name="num_bins",
        )
        cf.conform(be, case, cf.make_grads(case, seed=M))


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize(
    "only,rater,scale",
    [
        ("count", None, 1.0),
        ("sum_p", None, 1.0),
        ("sum_y", None, 1.0),
        ("sum_y", 1, 2.5),
        ("sum_p2", None, 1.0),
        ("sum_py", None, 0.3),
        (None, None, 1.0),
        (None, None, -3.0),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_gradient_alone(backend, only, rater, scale, mode):
    """The gradient of each output alone (and one rater's sum_y alone, and all of them with grad_output != 1 of
    either sign), soft scheme (count has a gradient) and hard, softmax: every term of the backward formula."""
    be = kb.get(backend)
    for scheme in (0, 1):
        case = cf.make_case(
            B=2,
            C=3,
            N=41,
            R=3,
            M=6,
            scheme=scheme,
            activation=1,
            mode=mode,
            moments=True,
            seed=_seed("grad", only, rater, mode, scheme),
            name=f"grad of {only} rater {rater}",
        )
        grads = cf.make_grads(case, seed=7, scale=scale, only=only, rater=rater)
        if only is None and scale == 1.0:
            grads = tuple(torch.ones_like(g) for g in grads)  # grad_output == 1
        cf.conform(be, case, grads)


@pytest.mark.parametrize("R", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rater_counts(backend, R):
    """R = 1 .. 5 rater label maps (kernels may specialise small R), hard and soft, moments off and on, both
    modes: sum_y per rater and the rater mean in sum_py."""
    be = kb.get(backend)
    for scheme, moments, mode in itertools.product((0, 1), (False, True), (0, 1)):
        case = cf.make_case(
            B=1,
            C=3,
            N=19,
            R=R,
            M=5,
            scheme=scheme,
            activation=1,
            mode=mode,
            moments=moments,
            seed=_seed("raters", R, scheme, moments, mode),
            name="raters",
        )
        cf.conform(be, case, cf.make_grads(case, seed=R))


@pytest.mark.parametrize(
    "tk,dtype,ii",
    [
        (0, torch.uint8, 255),
        (0, torch.int8, -1),
        (0, torch.int16, -100),
        (0, torch.int32, None),
        (0, torch.int64, 3),
        (1, torch.float32, None),
        (1, torch.float16, None),
        (1, torch.bfloat16, None),
        (1, torch.bool, None),
        (1, torch.uint8, None),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_target_dtypes(backend, tk, dtype, ii):
    """Every label dtype (ignore_index inside and outside the dtype's range, and equal to a class) and every dense
    dtype, both modes."""
    be = kb.get(backend)
    for mode in (0, 1):
        kw = {"label_dtype": dtype} if tk == 0 else {"dense_dtype": dtype}
        case = cf.make_case(
            B=2,
            C=4,
            N=33,
            R=2 if tk == 0 else 1,
            M=5,
            scheme=mode,
            activation=2 - mode,
            target_kind=tk,
            mode=mode,
            moments=True,
            ignore_index=ii,
            seed=_seed("dt", dtype, ii, mode),
            name="target dtype",
            **kw,
        )
        cf.conform(be, case, cf.make_grads(case, seed=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_strides(backend):
    """Non-contiguous input (classes innermost in memory, and every other voxel) and target: same results as the
    contiguous copies, bitwise."""
    be = kb.get(backend)
    for mode, tk in itertools.product((0, 1), (0, 1)):
        case = cf.make_case(
            B=2,
            C=3,
            N=23,
            R=2,
            M=5,
            activation=1,
            target_kind=tk,
            mode=mode,
            moments=True,
            seed=_seed("strides", mode, tk),
        )
        x = case.input.transpose(1, 2).contiguous().transpose(1, 2)
        x2 = torch.stack([case.input, case.input], -1)[..., 0]
        t = torch.stack([case.target, case.target], -1)[..., 1]
        grads = cf.make_grads(case, seed=4)
        base = be.forward(*case.args())
        gbase = be.backward(*grads, *case.args())
        for xs, ts in ((x, case.target), (x2, t), (x, t)):
            assert not (xs.is_contiguous() and ts.is_contiguous())
            c2 = cf.with_(case, input=xs, target=ts)
            for a, b in zip(be.forward(*c2.args()), base):
                assert torch.equal(a, b), f"{backend}: strided input changed the statistics"
            assert torch.equal(be.backward(*grads, *c2.args()), gbase), f"{backend}: strided input changed grad"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_counts_by_hand(backend):
    """bad[0] counts out-of-range label entries over all raters; bad[1] the non-finite p of used voxels, every
    class, the same in both modes."""
    be = kb.get(backend)
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[[nan, 0.2, inf, 0.3, nan], [0.5, -inf, 0.1, 0.7, 0.2]]])  # [1, 2, 5]
    t = torch.tensor([[[0, 5, 1, -1, 1], [0, 1, 7, 0, -2]]])  # rater 1: 7 and -2 out of range; -1 ignored
    e = cf.edges_for(4, 0)
    for mode in (0, 1):
        out = be.forward(x, t, e, 4, 0, 0, 0, mode, False, -1, False)
        # bad labels: (r0, i1) 5, (r1, i2) 7, (r1, i4) -2 -> 3; used voxels: 0 only (i3 ignored by rater 0) -> the
        # NaN of voxel 0 -> 1; marginal count: voxel 0 class 1
        assert out[5].tolist() == [3, 1], (backend, mode, out[5].tolist())
        assert float(out[0].sum()) == (1.0 if mode == 0 else 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """Two runs give bitwise equal statistics and gradients."""
    be = kb.get(backend)
    case = cf.make_case(
        B=2, C=3, N=301 if not be.slow else 61, R=3, M=11, scheme=1, activation=1, mode=0, moments=True, seed=9
    )
    grads = cf.make_grads(case, seed=9)
    a, b = be.forward(*case.args()), be.forward(*case.args())
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(be.backward(*grads, *case.args()), be.backward(*grads, *case.args()))


# ---------------------------------------------------------------------------------------------------------
# The budget can fail: small deliberate bugs in a wrapped reference are caught
# ---------------------------------------------------------------------------------------------------------
def _mutant(kind: str) -> kb.KernelBackend:
    ref = kb.backends()[0]

    def forward(*args):
        x, t, e, M, scheme, act, tk, mode, mom, ii, right = args
        if kind == "right flipped":
            return ref.forward(x, t, e, M, scheme, act, tk, mode, mom, ii, not right)
        if kind == "soft right ignored":
            return ref.forward(x, t, e, M, scheme, act, tk, mode, mom, ii, False)
        if kind == "ties to highest index":
            tf = (x.shape[1] - 1 - t.long()).to(t.dtype) if tk == 0 else t.flip(1)
            return ref.forward(x.flip(1), tf, e, M, scheme, act, tk, mode, mom, ii, right)
        out = list(ref.forward(*args))
        if kind == "sum_p relative 1e-4":
            out[1] = out[1] * (1 + 1e-4)
        elif kind == "count soft +1e-3":
            out[0] = out[0] + 1e-3 * (out[0] > 0)
        elif kind == "sum_py from rater 0":
            y0 = ref.forward(x, t[:, :1], e, M, scheme, act, tk, mode, mom, ii, right)
            out[4] = y0[4]
        elif kind == "bad counts voxels":
            out[5] = out[5].clone()
            out[5][1] = (out[5][1] + x.shape[1] - 1) // x.shape[1]
        return tuple(out)

    def backward(*args):
        g = ref.backward(*args)
        if kind == "grad relative 1e-3":
            return g * (1 + 1e-3)
        if kind == "left-out entries get 1e-30":
            return torch.where(g == 0, torch.full_like(g, 1e-30), g)
        if kind in ("right flipped", "soft right ignored", "ties to highest index"):
            gc, gp, gy, gp2, gpy, x, t, e, M, scheme, act, tk, mode, mom, ii, right = args
            if kind == "soft right ignored":
                return ref.backward(gc, gp, gy, gp2, gpy, x, t, e, M, scheme, act, tk, mode, mom, ii, False)
            if kind == "right flipped":
                return ref.backward(gc, gp, gy, gp2, gpy, x, t, e, M, scheme, act, tk, mode, mom, ii, not right)
            tf = (x.shape[1] - 1 - t.long()).to(t.dtype) if tk == 0 else t.flip(1)
            return ref.backward(gc, gp, gy, gp2, gpy, x.flip(1), tf, e, M, scheme, act, tk, mode, mom, ii, right).flip(
                1
            )
        return g

    return kb.KernelBackend(f"mutant ({kind})", forward, backward)


MUTANTS = [
    ("right flipped", dict(scheme=0, activation=0, right=False)),
    ("soft right ignored", dict(scheme=1, activation=0, right=True)),
    ("ties to highest index", dict(mode=1, activation=0, ignore_index=None)),
    ("sum_p relative 1e-4", dict(activation=1)),
    ("count soft +1e-3", dict(scheme=1, activation=2)),
    ("sum_py from rater 0", dict(R=3, moments=True, ignore_index=None)),
    ("bad counts voxels", dict(activation=1)),
    ("grad relative 1e-3", dict(activation=1, scheme=1)),
    ("left-out entries get 1e-30", dict(activation=0)),
]


@pytest.mark.parametrize("kind,opts", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_budget_detects_mutations(kind, opts):
    """Each mutant differs from the reference by one small bug; the conformance check must reject it (and accept
    the unmutated reference on the same case). Compared with the reference, not the oracle."""
    kw = dict(B=2, C=3, N=37, M=7, seed=_seed("mutant", kind), name=kind)
    case = cf.make_case(**{**kw, **opts})
    grads = cf.make_grads(case, seed=1)
    ref = kb.backends()[0]
    clean = kb.KernelBackend("reference copy", ref.forward, ref.backward)
    cf.conform(clean, case, grads)
    with pytest.raises(AssertionError):
        cf.conform(_mutant(kind), case, grads)
