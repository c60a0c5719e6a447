"""Fault injection: ``backend="auto"`` must catch a wrong kernel on the first call of the specialisation its bug
hides in (issue 23).

Each fault is a stand-in GPU kernel: the reference op plus one injected bug that fires only in some
specialisations (more than 256 voxels per image, ``num_bins != 20``, uint8 label maps, ...). The stand-in is
registered as auto's only GPU candidate and CPU tensors are routed through auto's GPU branch
(``resolve.SELF_CHECKED_DEVICES``), so the whole public path runs on CPU in CI: ``engine.run`` prepares the call,
``resolve_call`` derives its specialisation, the first call of it runs that specialisation's self-check problem
through the stand-in and the reference, and the decision is cached.

For every fault: a call *outside* the bug's specialisations (where there is one) runs the stand-in with no
warning; the first call *inside* gives exactly one ``SelfCheckWarning`` and runs the reference (same results);
the next call inside warns no more. The nine faults of the issue also pass the v0.2 self-check (its five fixed
cases, kept below), which is why it let them through; the control fault fails both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from calibops import engine
from calibops.backends import registry as _registry
from calibops.backends import resolve as _resolve
from calibops.backends import selfcheck as _selfcheck
from calibops.contract import MODE_MARGINAL, MODE_TOP_LABEL, SCHEME_HARD, TARGET_DENSE, TARGET_LABELS
from calibops.options import Options
from calibops.reference import ACT_NONE, ACT_SIGMOID, binned_stats_prepared

pytestmark = pytest.mark.filterwarnings("ignore:single channel prediction")  # MONAI's, for the C = 1 call

STANDIN = "standin"
CPU = torch.device("cpu")
B_USER = 3  # the user's calls: 3 images of 8x8x5 = 320 voxels, so most faults also fire on the user's data
SPATIAL = (8, 8, 5)


class StandIn:
    """A stand-in GPU kernel: the reference op, or ``bug(*args)`` (the reference plus one injected bug)."""

    def __init__(self) -> None:
        self.bug: Callable | None = None
        self.shapes: list[tuple[int, ...]] = []  # input shape of every call

    def __call__(self, *args):
        self.shapes.append(tuple(args[0].shape))
        return binned_stats_prepared(*args) if self.bug is None else self.bug(*args)

    def user_calls(self) -> int:
        """Calls with the user's images (the self-check's problems have SPEC_B images and other sizes)."""
        n = SPATIAL[0] * SPATIAL[1] * SPATIAL[2]
        return sum(1 for s in self.shapes if s[0] == B_USER and s[-1] == n)


@pytest.fixture
def standin(monkeypatch):
    """Auto's GPU branch on CPU tensors with the stand-in as its only candidate; fresh decisions and checks."""
    monkeypatch.setattr(_resolve, "_AUTO_GPU", {})
    monkeypatch.setattr(_resolve, "_AUTO_SPEC", {})
    monkeypatch.setattr(_resolve, "_FIRST", {})
    monkeypatch.setattr(_selfcheck, "_RESULTS", {})
    monkeypatch.setattr(_resolve, "SELF_CHECKED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(_resolve, "GPU_CANDIDATES", (STANDIN,))
    monkeypatch.delenv("CALIBOPS_BACKEND", raising=False)
    monkeypatch.delenv("CALIBOPS_TRITON_MAX_REGISTER_BINS", raising=False)
    kernel = StandIn()
    real_fn, real_why = _registry.stats_function, _registry.why_unavailable

    def stats_function(name):
        return kernel if name == STANDIN else real_fn(name)

    def why_unavailable(name, device):
        return None if name == STANDIN else real_why(name, device)

    monkeypatch.setattr(_registry, "stats_function", stats_function)
    monkeypatch.setattr(_registry, "why_unavailable", why_unavailable)
    monkeypatch.setattr(engine, "stats_function", stats_function)
    return kernel


# ------------------------------------------------------------------------------------------------------------
# the user's calls
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """A user call: tensors of these kinds through ``engine.run`` with these options."""

    C: int = 4
    R: int = 1
    dtype: torch.dtype = torch.float32
    labels: bool = True
    label_dtype: torch.dtype = torch.int64
    dense_dtype: torch.dtype = torch.float32
    probabilities: bool = False  # the input is probabilities (no activation) instead of logits
    options: dict[str, Any] = field(default_factory=dict)

    def tensors(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(B_USER, self.C, *SPATIAL, generator=g) * 2
        if self.probabilities:
            x = torch.softmax(x, 1)
        x = x.to(self.dtype)
        if self.labels:
            t = torch.randint(0, max(self.C, 2), (B_USER, self.R, *SPATIAL), generator=g)  # C = 1: labels {0, 1}
            ignore = self.options.get("ignore_index")
            if ignore is not None:
                t[torch.rand(t.shape, generator=g) < 0.1] = ignore
            return x, t.to(self.label_dtype)
        idx = torch.randint(0, self.C, (B_USER, *SPATIAL), generator=g)
        t = torch.nn.functional.one_hot(idx, self.C).movedim(-1, 1)
        return x, t.to(self.dense_dtype)

    def opts(self, backend: str = "auto") -> Options:
        kw: dict[str, Any] = {"to_onehot_y": self.labels, "multi_rater": self.labels and self.R > 1}
        if not self.probabilities and not self.options.get("sigmoid"):
            kw["softmax"] = True
        kw.update(self.options)
        return Options(backend=backend, **kw)

    def run(self, backend: str = "auto") -> engine.Run:
        x, t = self.tensors()
        return engine.run(x, t, self.opts(backend))


def _same_stats(a: engine.Run, b: engine.Run) -> bool:
    pairs = zip(a.stats, b.stats)
    return all((u is None and v is None) or torch.allclose(u, v, rtol=1e-6, atol=1e-6) for u, v in pairs)


# ------------------------------------------------------------------------------------------------------------
# the faults: the reference op plus one bug, firing only where its condition holds
# ------------------------------------------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def _outputs(when: Callable[..., bool], change: Callable[..., tuple]) -> Callable:
    """A bug that rewrites the reference's outputs ``(count, sum_p, sum_y, sum_p2, sum_py, bad)`` (and gets the
    op arguments too) in the calls where ``when(*args)`` holds."""

    def bug(*args):
        out = binned_stats_prepared(*args)
        return tuple(change(list(out), *args)) if when(*args) else out

    return bug


def _inputs(when: Callable[..., bool], change: Callable[..., tuple]) -> Callable:
    """A bug that runs the reference on changed arguments (``change(*args) -> args``) where ``when`` holds."""

    def bug(*args):
        return binned_stats_prepared(*(change(*args) if when(*args) else args))

    return bug


def _voxels_beyond_256(x, t, *rest):
    # the tail past the first 256 voxels of every image is never read (a grid bound of one tile of 256)
    return (x[..., :256], t[..., :256], *rest)


def _first_two_images(out, x, *rest):
    # images past the second get nothing (an image offset computed in 32 bits for a batch of two)
    for i in range(5):
        if out[i].numel():
            out[i] = torch.cat([out[i][:2], torch.zeros_like(out[i][2:])])
    return out


def _last_bin_lost(out, *args):
    for i in (0, 1, 2):
        out[i] = out[i].clone()
        out[i][..., -1] = 0
    return out


def _bins_from_64_lost(out, *args):
    for i in (0, 1, 2):
        out[i] = out[i].clone()
        out[i][..., 64:] = 0
    return out


def _bad(i, value):
    def change(out, *args):
        bad = out[5].clone()
        bad[i] = value(*args) if callable(value) else value
        out[5] = bad
        return out

    return change


def _first_rater_copied(out, *args):
    out[2] = out[2][:, :, :1].expand_as(out[2]).clone()
    return out


def _scale(i, factor):
    def change(out, *args):
        out[i] = out[i] * factor
        return out

    return change


def _classes_from_32_lost(out, *args):
    for i in (0, 1, 2):
        out[i] = out[i].clone()
        out[i][:, 32:] = 0
    return out


def _ignored_as_class_0(x, t, edges, M, scheme, act, kind, mode, moments, ignore, right):
    t = torch.where(t == ignore, torch.zeros((), dtype=t.dtype), t)
    return (x, t, edges, M, scheme, act, kind, mode, moments, None, right)


def _right_ignored(x, t, edges, M, scheme, act, kind, mode, moments, ignore, right):
    return (x, t, edges, M, scheme, act, kind, mode, moments, ignore, False)


def _grad_scaled(x, *rest):
    return (_ScaleGrad.apply(x), *rest)


def _positive_bad_labels_only(x, t, edges, M, scheme, act, kind, mode, moments, ignore, right):
    # negative labels taken for ignored ones: only labels >= C are counted
    C = x.shape[1]
    return ((t >= C) & (t != ignore) if ignore is not None else t >= C).sum()


def _labels(t, kind):
    return kind == TARGET_LABELS


@dataclass(frozen=True)
class Fault:
    name: str
    bug: Callable
    inside: Call  # the first call of a specialisation the bug hides in
    outside: Call | None = None  # a call the bug leaves alone (old coverage), None where there is none
    v02_misses: bool = False  # the issue's nine: the v0.2 self-check (five fixed cases) passed them


def _args(fn):
    """``fn(x, t, M, scheme, act, kind, mode, moments, ignore, right)`` as a condition on the op arguments."""
    return lambda x, t, e, M, scheme, act, kind, mode, moments, ignore, right: fn(
        x, t, M, scheme, act, kind, mode, moments, ignore, right
    )


DEFAULT = Call()
FAULTS = (
    # -- the nine of the issue -----------------------------------------------------------------------------
    Fault(
        "more than 256 voxels per image",
        _inputs(lambda x, *a: x.shape[-1] > 256, _voxels_beyond_256),
        inside=DEFAULT,
        v02_misses=True,
    ),
    Fault(
        "num_bins != 20",
        _outputs(_args(lambda x, t, M, *a: M != 20), _last_bin_lost),
        inside=Call(options={"num_bins": 15}),
        outside=DEFAULT,
        v02_misses=True,
    ),
    Fault(
        "uint8 label maps",
        _outputs(_args(lambda x, t, *a: t.dtype == torch.uint8 and a[3] == TARGET_LABELS), _bad(0, 0)),
        inside=Call(label_dtype=torch.uint8),
        outside=DEFAULT,
        v02_misses=True,
    ),
    Fault(
        "non-finite count suppressed",
        _outputs(lambda *a: True, _bad(1, 0)),
        inside=DEFAULT,
        v02_misses=True,
    ),
    Fault(
        "marginal mode with several raters",
        _outputs(
            _args(
                lambda x, t, M, s, act, kind, mode, *a: (
                    mode == MODE_MARGINAL and kind == TARGET_LABELS and t.shape[1] > 1
                )
            ),
            _first_rater_copied,
        ),
        inside=Call(R=3),
        outside=Call(R=3, options={"mode": "top_label"}),
        v02_misses=True,
    ),
    Fault(
        "hard binning with sigmoid",
        _outputs(
            _args(lambda x, t, M, scheme, act, *a: scheme == SCHEME_HARD and act == ACT_SIGMOID), _scale(1, 1.001)
        ),
        inside=Call(labels=False, options={"sigmoid": True}),
        outside=Call(labels=False, options={"sigmoid": True, "binning": "soft"}),
        v02_misses=True,
    ),
    Fault(
        "bool dense targets",
        _outputs(
            _args(lambda x, t, M, s, a, kind, *r: kind == TARGET_DENSE and t.dtype in (torch.bool, torch.uint8)),
            _scale(2, 0.0),
        ),
        inside=Call(labels=False, dense_dtype=torch.bool),
        outside=Call(labels=False),
        v02_misses=True,
    ),
    Fault(
        "uint8 dense targets",
        _outputs(
            _args(lambda x, t, M, s, a, kind, *r: kind == TARGET_DENSE and t.dtype in (torch.bool, torch.uint8)),
            _scale(2, 0.0),
        ),
        inside=Call(labels=False, dense_dtype=torch.uint8),
        outside=Call(labels=False, dense_dtype=torch.float16),
        v02_misses=True,
    ),
    Fault(
        "more than two images",
        _outputs(lambda x, *a: x.shape[0] > 2, _first_two_images),
        inside=DEFAULT,
        v02_misses=True,
    ),
    Fault(
        "dense top-label",
        _outputs(
            _args(lambda x, t, M, s, a, kind, mode, *r: kind == TARGET_DENSE and mode == MODE_TOP_LABEL), _scale(2, 0.5)
        ),
        inside=Call(labels=False, options={"mode": "top_label"}),
        outside=Call(options={"mode": "top_label"}),
        v02_misses=True,
    ),
    # -- more ------------------------------------------------------------------------------------------------
    Fault(
        "second moments",
        _outputs(
            _args(lambda x, t, M, s, a, k, mode, moments, *r: moments), lambda out, *a: [*out[:3], out[1], *out[4:]]
        ),
        inside=Call(options={"moments": True}),
        outside=DEFAULT,
    ),
    Fault(
        "int16 label maps: negative labels not counted",
        _outputs(_args(lambda x, t, *a: t.dtype == torch.int16), _bad(0, _positive_bad_labels_only)),
        inside=Call(label_dtype=torch.int16),
        outside=Call(label_dtype=torch.int32),
    ),
    Fault(
        "ignore_index voxels counted as class 0",
        _inputs(
            _args(
                lambda x, t, M, s, a, kind, mode, moments, ignore, right: ignore is not None and kind == TARGET_LABELS
            ),
            _ignored_as_class_0,
        ),
        inside=Call(options={"ignore_index": -100}),
        outside=DEFAULT,
    ),
    Fault(
        "right=True edges taken as left-closed",
        _inputs(_args(lambda x, t, M, s, a, k, m, mo, i, right: right), _right_ignored),
        inside=Call(probabilities=True, options={"right": True}),
        outside=Call(probabilities=True),
    ),
    Fault(
        "classes past the first chunk of 32",
        _outputs(_args(lambda x, *a: x.shape[1] > 32), _classes_from_32_lost),
        inside=Call(C=40),
        outside=Call(C=24),
    ),
    Fault(
        "float16 input gradient",
        _inputs(lambda x, *a: x.dtype == torch.float16, _grad_scaled),
        inside=Call(dtype=torch.float16),
        outside=Call(dtype=torch.bfloat16),
    ),
    Fault(
        "scatter kernel (num_bins > 64)",
        _outputs(_args(lambda x, t, M, *a: M > 64), _bins_from_64_lost),
        inside=Call(options={"num_bins": 100}),
        outside=Call(options={"num_bins": 64}),
    ),
    Fault(
        "top-label with several raters",
        _outputs(
            _args(
                lambda x, t, M, s, act, kind, mode, *a: (
                    mode == MODE_TOP_LABEL and kind == TARGET_LABELS and t.shape[1] > 1
                )
            ),
            _first_rater_copied,
        ),
        inside=Call(R=3, options={"mode": "top_label"}),
        outside=Call(R=3),
    ),
    Fault(
        "CUDA global-memory gradient table (num_bins = 1000)",
        _inputs(_args(lambda x, t, M, *a: (3 * x.shape[1] * M * 4) > 32 * 1024), _grad_scaled),
        inside=Call(options={"num_bins": 1000}),
        outside=Call(options={"num_bins": 500}),
    ),
    Fault(
        "probabilities without activation (the binary rule's path)",
        _outputs(_args(lambda x, t, M, s, act, *a: act == ACT_NONE), _scale(1, 0.999)),
        inside=Call(C=1, options={"sigmoid": True}),
        outside=Call(C=2, options={"sigmoid": True}),
    ),
    Fault(
        "top-label statistics (control: inside the v0.2 coverage)",
        _outputs(_args(lambda x, t, M, s, a, k, mode, *r: mode == MODE_TOP_LABEL), _scale(1, 1.001)),
        inside=Call(options={"mode": "top_label"}),
        outside=DEFAULT,
    ),
)
CONTROL = FAULTS[-1]


# ------------------------------------------------------------------------------------------------------------
# the v0.2 self-check: five fixed cases (M = 20, at most 2 images, N <= 200, int64 labels, float32 targets)
# ------------------------------------------------------------------------------------------------------------

Case = _selfcheck.Case
V02_CASES = (
    Case(
        "hard/labels/softmax",
        B=2,
        C=4,
        N=200,
        num_bins=20,
        soft=False,
        activation="softmax",
        labels=True,
        ignore_index=-100,
        bad_labels=3,
    ),
    Case("soft/labels/softmax/C=40", B=1, C=40, N=64, num_bins=20, soft=True, activation="softmax", labels=True),
    Case(
        "soft/dense/sigmoid/moments",
        B=1,
        C=3,
        N=150,
        num_bins=20,
        soft=True,
        activation="sigmoid",
        labels=False,
        moments=True,
    ),
    Case(
        "hard/dense/probabilities",
        B=1,
        C=3,
        N=128,
        num_bins=20,
        soft=False,
        activation="none",
        labels=False,
        right=True,
    ),
    Case(
        "hard/top-label/3 raters/softmax/moments",
        B=1,
        C=5,
        N=128,
        num_bins=20,
        soft=False,
        activation="softmax",
        labels=True,
        ignore_index=255,
        mode="top_label",
        raters=3,
        moments=True,
    ),
)


# ------------------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------------------


def _selfcheck_warnings(rec) -> list[str]:
    return [str(w.message) for w in rec if issubclass(w.category, _selfcheck.SelfCheckWarning)]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_is_caught_on_first_use_of_its_specialisation(standin, fault):
    standin.bug = fault.bug
    if fault.outside is not None:
        # outside the bug's specialisations: the stand-in is right, passes its check and runs, no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error", _selfcheck.SelfCheckWarning)
            out = fault.outside.run()
        assert standin.user_calls() == 1, "the stand-in did not run the call outside its bug"
        assert _same_stats(out, fault.outside.run("reference"))
    before = standin.user_calls()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fault.inside.run()
    msgs = _selfcheck_warnings(rec)
    assert len(msgs) == 1, msgs
    assert "'standin' disagreed" in msgs[0] and "specialisation" in msgs[0] and "'reference'" in msgs[0], msgs[0]
    assert standin.user_calls() == before, "the faulty stand-in ran the user's call"
    assert _same_stats(out, fault.inside.run("reference")), "the fallback is not the reference"
    # decided: the next call of that specialisation warns no more, checks nothing, runs the reference
    n_calls = len(standin.shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _selfcheck.SelfCheckWarning)
        fault.inside.run()
    assert len(standin.shapes) == n_calls


@pytest.mark.parametrize("fault", [f for f in FAULTS if f.v02_misses], ids=lambda f: f.name)
def test_the_issues_faults_passed_the_v02_self_check(standin, fault):
    # the premise of issue 23: the five fixed cases of v0.2 never reach these bugs
    standin.bug = fault.bug
    res = _selfcheck.run_selfcheck(STANDIN, CPU, torch.float32, arch="sm_test", cases=V02_CASES)
    assert res.ok, res.describe()


def test_the_control_fault_fails_the_v02_self_check_too(standin):
    standin.bug = CONTROL.bug
    res = _selfcheck.run_selfcheck(STANDIN, CPU, torch.float32, arch="sm_test", cases=V02_CASES)
    assert not res.ok and "top-label" in res.describe() and "off by" in res.describe()


def test_correct_standin_passes_every_specialisation_without_warning(standin):
    calls = [c for f in FAULTS for c in (f.inside, f.outside) if c is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", _selfcheck.SelfCheckWarning)
        for call in calls:
            out = call.run()
            assert _same_stats(out, call.run("reference"))
    assert standin.user_calls() == len(calls)
    assert set(_resolve._AUTO_SPEC.values()) == {STANDIN}
    checked = _selfcheck.checked_specialisations()
    assert len(checked) == len(_resolve._AUTO_SPEC) and all(r.ok for r in checked)
    # every check ran the bad-count paths: out-of-range labels (label specialisations) and non-finite entries
    for r in checked:
        case = _selfcheck.spec_case(r.spec, 4)
        assert case.B > 2 and case.N > 256 and case.nonfinite > 0
        assert case.bad_labels > 0 or r.spec.target_kind == TARGET_DENSE


def test_specialisation_key_separates_what_the_kernels_compile(standin):
    def spec(**kw):
        return _selfcheck.spec_of(*_selfcheck.example_call(**kw))

    base = spec(C=4)
    assert base == spec(C=3)  # same class tile (4), same regimes
    assert base == spec(C=4, R=1, num_bins=20)
    different = [
        spec(C=5),  # class tile 8
        spec(C=40),  # chunked
        spec(C=4, R=2),
        spec(C=4, num_bins=21),
        spec(C=4, num_bins=100),  # scatter kernel
        spec(C=4, soft=True),
        spec(C=4, activation="sigmoid"),
        spec(C=4, labels=False),
        spec(C=4, mode="top_label"),
        spec(C=4, moments=True),
        spec(C=4, target_dtype=torch.uint8),
        spec(C=4, dtype=torch.bfloat16),
        spec(C=4, ignore_index=255),
        spec(C=4, right=True),
    ]
    assert len({base, *different}) == len(different) + 1
    assert spec(C=4, R=2) == spec(C=4, R=5)  # R > 1 is one regime (the problem keeps the first call's R)
    assert spec(C=4, num_bins=100).scatter and not base.scatter
    assert spec(C=4, num_bins=1000).cuda_global and not spec(C=4, num_bins=500).cuda_global
    assert spec(C=40).chunked and spec(C=40).c_block == 32


def test_specialisation_problem_has_several_tiles_images_and_bad_entries():
    for C, R, kw in (
        (4, 1, {}),
        (1, 1, {"labels": False}),
        (40, 1, {}),
        (5, 3, {"mode": "top_label"}),
        (4, 1, {"num_bins": 200}),
    ):
        s = _selfcheck.spec_of(*_selfcheck.example_call(C, R=R, **kw))
        case = _selfcheck.spec_case(s, C, R)
        tt, v = _selfcheck._tile_widths(s, C, R)
        assert case.N >= 2 * tt and case.N > v and case.N > 256 and case.B == 3
        assert case.num_bins == s.num_bins and case.C == C and case.raters == (R if case.labels else 1)
        x, t = _selfcheck.make_inputs(case, torch.float32)
        assert x.shape == (3, C, case.N) and t.dtype == s.target_dtype
        assert int((~torch.isfinite(x)).sum()) >= case.B * 2


def test_launch_mirrors_agree_with_the_triton_launcher():
    launch = pytest.importorskip("calibops.backends.triton.launch")
    assert launch.MAX_C_BLOCK == _selfcheck.MAX_C_BLOCK
    assert launch.MAX_REGISTER_BINS == _selfcheck.TRITON_MAX_REGISTER_BINS
    for C, R, M, moments, mode in (
        (4, 1, 20, False, 0),
        (40, 1, 20, False, 0),
        (5, 3, 20, True, 1),
        (4, 2, 100, False, 0),
        (1, 1, 20, False, 0),
        (16, 1, 300, True, 0),
    ):
        s = _selfcheck.spec_of(
            *_selfcheck.example_call(C, R=R, num_bins=M, moments=moments, mode="top_label" if mode else "marginal")
        )
        fwd = launch.launch_config(1, C, 1 << 20, M, CPU, mode=mode, raters=R, moments=moments)
        bwd = launch.launch_config(1, C, 1 << 20, M, CPU, backward=True, mode=mode, raters=R, moments=moments)
        assert fwd["SCATTER"] == s.scatter and fwd["C_BLOCK"] == s.c_block
        assert _selfcheck._tile_widths(s, C, R)[0] == max(fwd["BLOCK_N"], bwd["BLOCK_N"])


CPU_WHY = _registry.why_unavailable("cpu", CPU)


@pytest.mark.skipif(CPU_WHY is not None, reason=f"cpu backend unavailable: {CPU_WHY}")
def test_real_cpu_kernels_pass_every_specialisation(standin, monkeypatch):
    # no false alarm from a real fused kernel: the compiled CPU kernels as auto's candidate pass the check of
    # every specialisation above (exact edges with right=True, uint8/int16 labels, non-finite inputs, ...)
    monkeypatch.setattr(_resolve, "GPU_CANDIDATES", ("cpu",))
    calls = [c for f in FAULTS for c in (f.inside, f.outside) if c is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", _selfcheck.SelfCheckWarning)
        for call in calls:
            call.run()
    assert set(_resolve._AUTO_SPEC.values()) == {"cpu"}
    assert all(r.ok for r in _selfcheck.checked_specialisations())
    assert standin.shapes == []
