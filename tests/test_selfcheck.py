"""``backend="auto"`` on a GPU: the record of verified architectures, the one-time self-check, the fallback.

Without a GPU, auto's GPU branch is exercised through its seam ``_backends._auto_gpu(call, arch, candidates)``
(``call``: an op call's kernel-contract arguments, on a CPU device), a made-up architecture ("sm_test") and the
Triton kernels running through the interpreter (TRITON_INTERPRET=1 must be set before triton is imported:
tests/conftest.py does it, and it is repeated here so this module also works alone). With a GPU the same tests
run on the CUDA device with the compiled kernels. Broken candidates are the real kernels with a monkeypatched
perturbation of one output. tests/test_selfcheck_faults.py injects bugs per specialisation.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import calibops.functional as F  # noqa: E402
from calibops import engine  # noqa: E402
from calibops.backends import registry as _registry  # noqa: E402
from calibops.backends import resolve as _backends  # noqa: E402
from calibops.backends import selfcheck as _selfcheck  # noqa: E402
from calibops.cli.main import main  # noqa: E402
from calibops.reference import bin_centres, bin_edges, binned_stats_prepared  # noqa: E402

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
ARCH = "sm_test"
TRITON_WHY = _backends.why_unavailable("triton", DEVICE)
needs_triton = pytest.mark.skipif(TRITON_WHY is not None, reason=f"triton backend unavailable: {TRITON_WHY}")
CPU_WHY = _backends.why_unavailable("cpu", torch.device("cpu"))
needs_cpu_ext = pytest.mark.skipif(CPU_WHY is not None, reason=f"cpu backend unavailable: {CPU_WHY}")


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """Every test starts with no decision, no cached self-check and an empty record."""
    monkeypatch.setattr(_backends, "_AUTO_GPU", {})
    monkeypatch.setattr(_backends, "_AUTO_SPEC", {})
    monkeypatch.setattr(_backends, "_FIRST", {})
    monkeypatch.setattr(_selfcheck, "_RESULTS", {})
    monkeypatch.setattr(_selfcheck, "_RECORD", [()])
    monkeypatch.delenv("CALIBOPS_BACKEND", raising=False)


def _counting(monkeypatch, perturb=None, only=None):
    """Make the registry's ``stats_function`` (what the self-check runs) hand out the real op, wrapped to count
    calls (and perturbed by ``perturb(fn, *args)``, for every backend or ``only`` one)."""
    real = _registry.stats_function
    calls: dict[str, int] = {}

    def stats_function(name):
        fn = real(name)

        def wrapped(*args):
            calls[name] = calls.get(name, 0) + 1
            if perturb is None or (only is not None and name != only):
                return fn(*args)
            return perturb(fn, *args)

        return wrapped

    monkeypatch.setattr(_registry, "stats_function", stats_function)
    return calls


def _perturb_sum_p(fn, *args):
    count, sum_p, *rest = fn(*args)
    return (count, sum_p + 1e-3 * sum_p.detach(), *rest)  # 1e-3 relative: 25x the 2e-5 budget; grad intact


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01  # 1e-2 relative: far outside every dtype's gradient budget; statistics intact


def _perturb_grad(fn, x, *rest):
    return fn(_ScaleGrad.apply(x), *rest)


def _call(dtype=torch.float32, device=DEVICE, **kw):
    """Kernel-contract arguments of a call (the default loss's specialisation unless ``kw`` says otherwise)."""
    x, t, edges, *rest = _selfcheck.example_call(kw.pop("C", 4), dtype=dtype, **kw)
    return (x.to(device), t.to(device), edges.to(device), *rest)


def _auto(dtype=torch.float32, candidates=("triton",), device=DEVICE, **kw):
    return _backends._auto_gpu(_call(dtype, device, **kw), arch=ARCH, candidates=candidates)


# ------------------------------------------------------------------------------------------------------------
# the cases and the budget
# ------------------------------------------------------------------------------------------------------------


def test_cases_cover_the_option_space():
    cases = _selfcheck.CASES
    assert {c.soft for c in cases} == {False, True}
    assert {c.labels for c in cases} == {False, True}
    assert {c.activation for c in cases} == {"none", "softmax", "sigmoid"}
    assert {c.right for c in cases} == {False, True}
    assert any(c.C > 32 for c in cases), "the chunked (> 32 classes) path"
    assert any(c.ignore_index is not None and c.bad_labels for c in cases)
    assert {c.mode for c in cases} == {"marginal", "top_label"} and any(c.moments for c in cases)
    assert any(c.raters > 1 and c.mode == "marginal" for c in cases) and any(c.num_bins > 64 for c in cases)
    assert any(c.target_dtype == torch.uint8 and c.labels for c in cases), "NIfTI's uint8 label maps"
    # every case is a specialisation's problem: several images and tiles, non-finite inputs
    assert all(c.B > 2 and c.N > 256 and c.nonfinite > 0 for c in cases)
    assert _selfcheck.stat_rtol(256) == _selfcheck.STAT_RTOL and _selfcheck.stat_rtol(2049) > _selfcheck.STAT_RTOL


@pytest.mark.parametrize("dtype", _selfcheck.DTYPES, ids=str)
def test_case_probabilities_stay_away_from_kinks(dtype):
    # the property the budget relies on: a few ulps of activation difference cannot flip a bin or a linear piece
    for case in _selfcheck.CASES:
        x, t = _selfcheck.make_inputs(case, dtype)
        assert x.dtype == dtype and x.shape == (case.B, case.C, case.N)
        p = _selfcheck._probs64(x, case.activation)
        kinks = _selfcheck._kinks(case.num_bins, case.soft)
        dist = (p.unsqueeze(-1) - kinks).abs().amin(-1)
        finite = torch.isfinite(p)
        # the only finite entries near a kink are those put on an edge on purpose (no activation: both sides
        # see the very same p; exactly on it unless the dtype cannot hold the float32 edge)
        near = finite & (dist < _selfcheck.kink_margin(case.num_bins))
        if case.activation == "none" and not case.soft:
            assert 0 < int(near.sum()) <= case.B * case.exact_edges, case.name
        else:
            assert not bool(near.any()), case.name
        assert int((~finite).any(1).sum()) >= case.B, case.name  # non-finite voxels in every image
        if case.labels:
            out = (t >= case.C) | (t < 0)
            assert int(out.sum()) == case.bad_labels + (
                0 if case.ignore_index is None else int((t == case.ignore_index).sum())
            )


def _reference_run(case, dtype=torch.float32):
    x, t = _selfcheck.make_inputs(case, dtype)
    edges = (bin_centres if case.soft else bin_edges)(case.num_bins)
    ups = _selfcheck._upstream(case, 0)
    return _selfcheck._fwd_bwd(binned_stats_prepared, x.float(), t, edges, case, ups, torch.device("cpu"))


def test_compare_catches_one_miscounted_voxel_and_bad_counts():
    case = _selfcheck.CASES[0]  # hard, labels, with out-of-range labels
    ref = _reference_run(case)
    assert _selfcheck.compare(ref, ref, case, torch.float32) == (0.0, "", 0.0)
    assert _selfcheck._bad_parts(ref[3])[0] > 0 and _selfcheck._bad_parts(ref[3])[1] > 0
    count = ref[0].clone()
    count[0, 1, 3] += 1
    ratio, quantity, err = _selfcheck.compare((count, *ref[1:]), ref, case, torch.float32)
    assert quantity == "count" and ratio == pytest.approx(2.0) and err == 1.0
    bad = torch.zeros_like(ref[3])
    ratio, quantity, _ = _selfcheck.compare((*ref[:3], bad, ref[4]), ref, case, torch.float32)
    assert math.isinf(ratio) and quantity.startswith("bad counts")
    sum_y = ref[2].clone()
    sum_y[1, 2, 0, 5] = float("nan")  # (B, K, R, M)
    ratio, quantity, _ = _selfcheck.compare((*ref[:2], sum_y, *ref[3:]), ref, case, torch.float32)
    assert math.isinf(ratio) and quantity == "sum_y"
    res = _selfcheck.SelfCheckResult(
        "cuda",
        "cuda:0",
        "sm_90",
        torch.float32,
        False,
        (_selfcheck.CaseResult(case.name, False, ratio, quantity, 0.0),),
        0.0,
    )
    assert res.describe() == f"case {case.name!r}: sum_y is NaN or infinite"


def test_compare_gradient_budget_is_one_rounding_to_the_dtype():
    # the reference itself with a bfloat16 leaf: its gradient is the float32 one rounded once -> within budget
    case = _selfcheck.CASES[2]
    for dtype in (torch.float16, torch.bfloat16):
        res = _selfcheck.run_case(binned_stats_prepared, case, dtype, torch.device("cpu"))
        assert res.ok and 0 < res.ratio <= 0.5 + 1e-6 and res.quantity == "grad", res
    wrong = _reference_run(case)
    ratio, quantity, _ = _selfcheck.compare((*wrong[:4], wrong[4] * 1.001, *wrong[5:]), wrong, case, torch.float32)
    assert quantity == "grad" and ratio > 50


def test_compare_checks_the_moments_of_cases_that_ask_for_them():
    case = next(c for c in _selfcheck.CASES if c.moments and c.mode == "top_label")
    ref = _reference_run(case)
    assert ref[2].shape[-2] == case.raters and ref[5].shape == ref[1].shape
    assert _selfcheck.compare(ref, ref, case, torch.float32) == (0.0, "", 0.0)
    sum_py = ref[6].clone()
    sum_py[0, 0, int(ref[0][0, 0].argmax())] *= 1.01
    ratio, quantity, _ = _selfcheck.compare((*ref[:6], sum_py), ref, case, torch.float32)
    assert quantity == "sum_py" and ratio > 1
    ratio, quantity, _ = _selfcheck.compare(ref[:5], ref, case, torch.float32)
    assert math.isinf(ratio) and quantity == "sum_p2 missing"


# ------------------------------------------------------------------------------------------------------------
# auto's GPU branch through the seam
# ------------------------------------------------------------------------------------------------------------


@needs_triton
def test_correct_candidate_is_accepted_once_then_a_dict_lookup(monkeypatch):
    calls = _counting(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing check warns nothing
        assert _auto() == "triton"
    assert calls == {"triton": 1}  # one problem: the call's specialisation
    spec = _selfcheck.spec_of(*_call())
    res = _selfcheck.cached_result("triton", DEVICE, torch.float32, spec)
    assert res is not None and res.ok and res.arch == ARCH and res.spec == spec and len(res.cases) == 1
    case = res.cases[0]
    assert case.ok and case.ratio <= 1 and spec.describe() in case.name

    def boom(*args, **kwargs):
        raise AssertionError("the self-check ran again")

    monkeypatch.setattr(_selfcheck, "check_spec", boom)
    monkeypatch.setattr(_selfcheck, "run_selfcheck", boom)
    for _ in range(3):
        assert _auto() == "triton"
        assert _auto(C=3) == "triton"  # another C of the same class tile: the same specialisation
    assert calls == {"triton": 1}


@needs_triton
@pytest.mark.parametrize("perturb,what", [(_perturb_sum_p, "sum_p"), (_perturb_grad, "grad")], ids=["sum_p", "grad"])
def test_broken_candidate_is_rejected_with_one_warning(monkeypatch, perturb, what):
    calls = _counting(monkeypatch, perturb)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _auto() == "reference"
        assert _auto() == "reference"
    assert calls == {"triton": 1}
    assert len(rec) == 1, [str(w.message) for w in rec]
    w = rec[0]
    assert issubclass(w.category, _selfcheck.SelfCheckWarning)
    msg = str(w.message)
    for needle in (
        "'triton'",
        ARCH,
        str(DEVICE),
        "float32",
        "specialisation marginal/hard/softmax/labels:int64/R=1/M=20",
        f": {what} off by",
        "error budget",
        "'reference'",
        "python -m calibops",
        "issue",
        "backend='triton'",
    ):
        assert needle in msg, (needle, msg)
    res = _selfcheck.cached_result("triton", DEVICE, torch.float32, _selfcheck.spec_of(*_call()))
    assert not res.ok and all(not c.ok and c.quantity == what and c.ratio > 1 for c in res.cases)


@needs_cpu_ext
def test_candidate_failing_in_bfloat16_only(monkeypatch):
    # the specialisation holds the input dtype: a kernel right in float32 and wrong in bfloat16 is used only for
    # float32 (the cpu kernels stand in for a GPU candidate: the decision does not depend on which)
    def perturb(fn, x, *rest):
        return _perturb_sum_p(fn, x, *rest) if x.dtype == torch.bfloat16 else fn(x, *rest)

    _counting(monkeypatch, perturb)
    cpu = torch.device("cpu")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _auto(torch.float32, ("cpu",), cpu) == "cpu"
        assert _auto(torch.bfloat16, ("cpu",), cpu) == "reference"
        assert _auto(torch.float16, ("cpu",), cpu) == "cpu"
    assert len(rec) == 1 and "bfloat16" in str(rec[0].message)


@needs_triton
@needs_cpu_ext
def test_next_candidate_after_a_failing_one(monkeypatch):
    # on a CPU device the cpu and triton kernels stand in for auto's cuda and triton candidates
    _counting(monkeypatch, _perturb_sum_p, only="cpu")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _auto(candidates=("cpu", "triton"), device=torch.device("cpu")) == "triton"
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "'cpu' disagreed" in msg and "uses 'triton'" in msg and "'triton' disagreed" not in msg


def test_record_entry_skips_the_check(monkeypatch):
    calls = _counting(monkeypatch)
    entry = {
        "backend": "triton",
        "arch": ARCH,
        "card": "Test Card",
        "torch": "2.11.0",
        "triton": "3.6.0",
        "cuda": "13.0",
        "date": "2026-01-01",
    }
    monkeypatch.setattr(_selfcheck, "_RECORD", [(entry,)])
    if TRITON_WHY is None:
        assert _auto() == "triton"
    else:
        assert _auto() == "reference"  # not available at all: the record cannot make it run
    assert calls == {}
    assert _selfcheck.checked_specialisations() == []
    assert _selfcheck.is_verified("triton", ARCH) and not _selfcheck.is_verified("cuda", ARCH)
    assert not _selfcheck.is_verified("triton", "sm_0")


def test_unavailable_candidates_give_reference_without_a_check(monkeypatch):
    calls = _counting(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the cuda kernels never run on a CPU device: skipped, nothing checked, nothing warned
        assert _auto(candidates=("cuda",), device=torch.device("cpu")) == "reference"
    assert calls == {}


@needs_cpu_ext
def test_check_runs_isolated_from_the_callers_grad_state(monkeypatch):
    # the first use may come from calibration_errors (no_grad), inference_mode or autocast: the check's own
    # forward+backward must still run (cpu kernels as the candidate: the isolation does not depend on it)
    cpu = torch.device("cpu")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _auto(torch.float32, ("cpu",), cpu) == "cpu"
    threads = torch.get_num_threads()
    with torch.no_grad():
        assert _auto(torch.float16, ("cpu",), cpu) == "cpu"
    assert torch.is_grad_enabled()
    # the check runs its tiny ops on one thread; neither this thread nor a new one is left with that
    assert torch.get_num_threads() == threads
    seen = []
    th = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert seen == [threads]


@needs_cpu_ext
def test_check_ignores_the_callers_default_dtype(monkeypatch):
    # cases are built with explicit dtypes and devices: a float64 default must not make a dense target float64
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        res = _selfcheck.run_selfcheck("cpu", "cpu", torch.float32, arch=ARCH, cases=_selfcheck.CASES[2:4])
    finally:
        torch.set_default_dtype(prev)
    assert res.ok, res.describe()


def test_warning_as_error_raises_once_then_auto_falls_back(monkeypatch):
    _counting(monkeypatch, _perturb_sum_p)
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", _selfcheck.SelfCheckWarning)
        with pytest.raises(_selfcheck.SelfCheckWarning, match="disagreed"):
            _auto(candidates=("reference",), device=cpu)
        assert _auto(candidates=("reference",), device=cpu) == "reference"


def test_a_raising_candidate_fails_the_check_and_auto_never_raises(monkeypatch):
    def perturb(fn, *args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    _counting(monkeypatch, perturb)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        name = _auto(candidates=("reference",), device=torch.device("cpu"))
    assert name == "reference" and len(rec) == 1
    assert "raised RuntimeError: CUDA error: no kernel image" in str(rec[0].message)


# ------------------------------------------------------------------------------------------------------------
# explicit requests, the environment variable, torch.compile, the functional API
# ------------------------------------------------------------------------------------------------------------


def test_explicit_backend_and_environment_run_without_check(monkeypatch):
    calls = _counting(monkeypatch)

    def no_auto(*args, **kwargs):
        raise AssertionError("auto's GPU decision was consulted")

    monkeypatch.setattr(_backends, "_auto_gpu", no_auto)
    monkeypatch.setattr(_backends, "SELF_CHECKED_DEVICES", ("cuda", "cpu"))
    call = _call(device=torch.device("cpu"))
    if TRITON_WHY is None:
        assert _backends.resolve_backend("triton", DEVICE, torch.bfloat16) == "triton"
        assert _backends.resolve_call("triton", "triton", call) == "triton"
    monkeypatch.setenv("CALIBOPS_BACKEND", "reference")
    assert _backends.resolve_backend("auto", torch.device("cuda", 0), torch.float32) == "reference"
    assert _backends.resolve_call("auto", "reference", call) == "reference"
    monkeypatch.setenv("CALIBOPS_BACKEND", "cpu")
    assert _backends.resolve_call("auto", "cpu", call) == "cpu"  # the variable is an explicit request
    assert calls == {}


def test_auto_on_a_gpu_device_decides_per_call(monkeypatch):
    seen = []
    monkeypatch.setattr(_backends, "_auto_gpu", lambda call: seen.append(call) or "reference")
    # before the call is known: the first available kernel (the layout to prepare), here none on cuda:1
    dev = torch.device("cuda", 1)
    assert _backends.resolve_backend("auto", dev, torch.bfloat16) == _backends._first_candidate(dev)
    assert _backends.resolve_backend("auto", dev, torch.float64) == "reference"
    # with the call: auto's decision for its specialisation (CPU tensors routed as a GPU device would be)
    monkeypatch.setattr(_backends, "SELF_CHECKED_DEVICES", ("cuda", "cpu"))
    call = _call(torch.bfloat16, torch.device("cpu"))
    assert _backends.resolve_call("auto", "cuda", call) == "reference"
    assert seen == [call]
    assert _backends.resolve_call("auto", "reference", call) == "reference" and len(seen) == 1


def test_functional_api_hands_the_op_call_to_the_decision(monkeypatch):
    seen = []
    real = engine.resolve_call

    def spy(backend, name, call):
        seen.append((backend, name, call))
        return real(backend, name, call)

    monkeypatch.setattr(engine, "resolve_call", spy)
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    y = torch.randint(0, 3, (1, 8), dtype=torch.uint8)
    F.marginal_l1_ace(x, y, to_onehot_y=True, softmax=True, num_bins=7, backend="reference")
    ((backend, name, call),) = seen
    assert backend == "reference" and name == "reference"
    spec = _selfcheck.spec_of(*call)
    assert spec.dtype == torch.bfloat16 and spec.target_dtype == torch.uint8 and spec.num_bins == 7


@needs_cpu_ext
def test_compile_never_runs_the_check_and_uses_the_eager_decision(monkeypatch):
    # the cpu kernels stand in for a GPU candidate (cheap): "cpu" = the eager decision, "reference" = safe choice
    calls = _counting(monkeypatch)
    call = _call(device=torch.device("cpu"))

    def step(x):
        name = _backends._auto_gpu(call, arch=ARCH, candidates=("cpu",))
        return x + (1.0 if name == "cpu" else 2.0)

    torch._dynamo.reset()
    x = torch.zeros(3)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    # nothing decided yet: the compiled graph takes the safe choice without checking (and decides nothing)
    assert torch.equal(compiled(x), x + 2.0)
    assert calls == {} and _backends._AUTO_GPU == {}
    # an eager call decides (runs the check once); a graph compiled afterwards uses that decision
    assert _backends._auto_gpu(call, arch=ARCH, candidates=("cpu",)) == "cpu"
    assert calls == {"cpu": 1}
    # dynamo guards on the decision: the graph compiled before it is recompiled with it, without a new check
    assert torch.equal(compiled(x), x + 1.0)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, fullgraph=True, backend="eager")(x), x + 1.0)
    assert calls == {"cpu": 1}
    torch._dynamo.reset()


def test_cached_decision_is_a_cheap_lookup(monkeypatch):
    # the hot path after the first call: resolve_call builds the call key and looks it up (target <= 10 us on a
    # GPU host; here a loose bound for a loaded CI machine, the median of many calls)
    monkeypatch.setattr(_backends, "SELF_CHECKED_DEVICES", ("cuda", "cpu"))
    call = _call(device=torch.device("cpu"))
    monkeypatch.setitem(_backends._AUTO_GPU, _backends.call_key(call), "cuda")
    times = []
    for _ in range(2000):
        t0 = time.perf_counter()
        _backends.resolve_call("auto", "cuda", call)
        times.append(time.perf_counter() - t0)
    times.sort()
    assert _backends.resolve_call("auto", "cuda", call) == "cuda"
    assert times[len(times) // 2] < 50e-6, times[len(times) // 2]


# ------------------------------------------------------------------------------------------------------------
# python -m calibops selfcheck, and the record writer
# ------------------------------------------------------------------------------------------------------------


def test_record_writer_produces_a_sorted_json_record(tmp_path, monkeypatch):
    path = tmp_path / "verified.json"
    e1 = {
        "backend": "triton",
        "arch": "sm_90",
        "card": "NVIDIA H100 80GB HBM3",
        "torch": "2.11.0+cu130",
        "triton": "3.6.0",
        "cuda": "13.0",
        "date": "2026-01-02",
    }
    e2 = dict(e1, backend="cuda")
    assert _selfcheck.write_record([e1], path) == (e1,)
    assert _selfcheck.read_record(path) == (e1,)
    assert _selfcheck.is_verified("triton", "sm_90", _selfcheck.read_record(path))
    e1b = dict(e1, date="2026-02-03", torch="2.12.0+cu130")
    record = _selfcheck.write_record([e1b, e2], path)  # update one, add one; sorted by (backend, arch)
    assert record == (e2, e1b) and _selfcheck.read_record(path) == (e2, e1b)
    data = json.loads(path.read_text())
    assert set(data) == {"about", "verified"} and data["about"] and path.read_text().endswith("}\n")
    # the package's own record reads through the same reader
    assert isinstance(_selfcheck.read_record(_selfcheck.RECORD_PATH), tuple)
    with pytest.raises(ValueError, match="lacks"):
        _selfcheck.write_record([dict(e1, card="")], path)
    path.write_text('{"verified": 3}')
    with pytest.raises(ValueError, match="not a calibops record"):
        _selfcheck.read_record(path)
    # a new file starts from the package's record: a drop-in replacement of calibops/backends/verified.json
    monkeypatch.setattr(_selfcheck, "_RECORD", [(e2,)])
    assert _selfcheck.write_record([e1], tmp_path / "new.json") == (e2, e1)


def test_selfcheck_record_refuses_cpu_and_interpreter_runs(tmp_path, capsys):
    path = tmp_path / "verified.json"
    assert main(["selfcheck", "--device", "cpu", "--record", "--record-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to --record" in err and not path.exists()


def test_selfcheck_usage_errors(capsys):
    assert main(["selfcheck", "--backends", "reference", "--device", "cpu"]) == 2
    assert main(["selfcheck", "--dtypes", "float64", "--device", "cpu"]) == 2
    assert main(["selfcheck", "--device", "nonsense"]) == 2
    if not torch.cuda.is_available():
        assert main(["selfcheck"]) == 1
        assert "no CUDA device" in capsys.readouterr().err


@needs_triton
def test_selfcheck_command_runs_triton_and_reports_a_table(monkeypatch, capsys):
    monkeypatch.setattr(_selfcheck, "CASES", _selfcheck.CASES[:1])
    dev = str(DEVICE)
    assert main(["selfcheck", "--device", dev, "--backends", "triton", "--dtypes", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "self-check" in out and "max err/budget" in out and "self-check passed" in out
    row = [ln for ln in out.splitlines() if ln.strip().startswith("triton")]
    assert len(row) == 1 and "bfloat16" in row[0] and " pass " in row[0], out
    assert row[0].rstrip().endswith(_selfcheck.CASES[0].name) and "specialisation" in out  # the one listed
    legend = f"{_selfcheck.CASES[0].name} = marginal/hard/softmax/labels:int64/R=1/M=20:register+smem/"
    assert legend in out and "ignore=-100 (C=4, R=1)" in out, out
    _counting(monkeypatch, _perturb_sum_p)
    assert main(["selfcheck", "--device", dev, "--backends", "triton", "--dtypes", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "sum_p off by" in out and "SELF-CHECK FAILED" in out


def test_gpu_table_and_auto_line(monkeypatch, capsys):
    # the printing of `python -m calibops` on a GPU, with made-up results (the check itself is tested above)
    from calibops.cli.main import print_selfcheck_table

    good = _selfcheck.SelfCheckResult(
        "triton",
        "cuda:0",
        "sm_90",
        torch.float32,
        True,
        (_selfcheck.CaseResult("hard/labels/softmax", True, 0.02, "grad", 1e-7),),
        0.012,
        card="NVIDIA H100",
    )
    bad = _selfcheck.SelfCheckResult(
        "triton",
        "cuda:0",
        "sm_90",
        torch.bfloat16,
        False,
        (_selfcheck.CaseResult("soft/dense/sigmoid", False, 3.5, "sum_p", 2e-4),),
        0.010,
        card="NVIDIA H100",
    )
    print_selfcheck_table([good, bad], {"cuda": "calibops._C was built without CUDA kernels"})
    out = capsys.readouterr().out
    assert "0.02" in out and "FAIL" in out and "3.5" in out and "cuda: not checked (calibops._C was built" in out
    assert "soft/dense/sigmoid': sum_p off by 3.5x its error budget" in out


@needs_cpu_ext
def test_cli_lists_the_specialisations_auto_checked(monkeypatch, capsys):
    from calibops.cli.main import print_auto_specialisations

    print_auto_specialisations()
    assert "no specialisation" in capsys.readouterr().out
    cpu = torch.device("cpu")
    assert _auto(torch.float32, ("cpu",), cpu) == "cpu"
    assert _auto(torch.float32, ("cpu",), cpu, num_bins=15, target_dtype=torch.uint8) == "cpu"
    print_auto_specialisations()
    out = capsys.readouterr().out
    assert "self-checked 2 specialisation(s)" in out
    for kw in ({}, {"num_bins": 15, "target_dtype": torch.uint8}):
        desc = _selfcheck.spec_of(*_call(device=cpu, **kw)).describe()
        assert f"{desc} (C=4, R=1)" in out and f"{desc} -> cpu" in out, out
