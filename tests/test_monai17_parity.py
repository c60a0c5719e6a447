"""calibops.HardL1ACELoss / SoftL1ACELoss against the real MONAI 1.7 losses (``monai.losses``' classes).

Needs a MONAI that ships the losses (monai-weekly >= 1.7.dev2643; .ci/run installs it in a job of its own): the
module is skipped when ``monai.losses`` has no ``HardL1ACELoss``. Each check runs the same call through MONAI's class
and calibops' class and compares what a MONAI user can observe: the constructor, values and gradients (2D/3D,
C = 1..8, every option, float32/float64/float16/bfloat16, exact bin edges and centres), ``reduction="none"`` shapes,
checkpoints (``state_dict`` both ways, ``strict=True``), warnings, the exception types MONAI users catch,
MetaTensor inputs and TorchScript. MONAI's own test cases (tests/losses/test_calibration_loss.py) are replayed on
both classes by :func:`_monai_behaviour`.
"""

from __future__ import annotations

import inspect
import io
import itertools
import warnings

import pytest
import torch

monai_losses = pytest.importorskip("monai.losses")
if not hasattr(monai_losses, "HardL1ACELoss"):
    pytest.skip(
        "this MONAI has no HardL1ACELoss (needs MONAI >= 1.7, e.g. monai-weekly==1.7.dev2643)", allow_module_level=True
    )

from monai.data import MetaTensor  # noqa: E402
from monai.utils import LossReduction  # noqa: E402

import calibops  # noqa: E402
from calibops.backends import extension as _ext  # noqa: E402

PAIRS = {
    "hard": (monai_losses.HardL1ACELoss, calibops.HardL1ACELoss),
    "soft": (monai_losses.SoftL1ACELoss, calibops.SoftL1ACELoss),
}
BINNINGS = tuple(PAIRS)


def _onehot(labels: torch.Tensor, C: int, dtype=torch.float32) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels[:, 0].long(), C).movedim(-1, 1).to(dtype)


def _case(B, C, spatial, seed, dtype=torch.float32, logits=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, *spatial, generator=g) * 2
    if not logits:
        x = torch.softmax(x, 1) if C > 1 else torch.sigmoid(x)
    labels = torch.randint(0, max(C, 2), (B, 1, *spatial), generator=g)
    return x.to(dtype), labels


def _both(binning, *args, **kwargs):
    ref_cls, our_cls = PAIRS[binning]
    return ref_cls(*args, **kwargs), our_cls(*args, **kwargs)


def _value_and_grad(loss, x, y):
    x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = loss(x, y)
    g = torch.autograd.grad(out.sum(), x, allow_unused=True)[0]
    return out.detach(), (torch.zeros_like(x) if g is None else g)


# ------------------------------------------------------------------------------------------------ constructor


@pytest.mark.parametrize("binning", BINNINGS)
def test_constructor_signature_is_monais(binning):
    ref_cls, our_cls = PAIRS[binning]
    ref = list(inspect.signature(ref_cls).parameters.values())
    ours = list(inspect.signature(our_cls).parameters.values())
    assert [p.name for p in ours[: len(ref)]] == [p.name for p in ref]
    for r, o in zip(ref, ours):
        assert o.kind == r.kind, r.name
        assert o.default == r.default, r.name  # LossReduction.MEAN == "mean" (a str enum)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(ref) :])
    assert [p.name for p in ours[len(ref) :]] == ["backend", "validate"]
    # positional use as MONAI documents it
    ref_loss, our_loss = ref_cls(10, False, True, False, True), our_cls(10, False, True, False, True)
    for name in (
        "num_bins",
        "include_background",
        "to_onehot_y",
        "sigmoid",
        "softmax",
        "right",
        "ignore_empty_classes",
    ):
        assert getattr(our_loss, name) == getattr(ref_loss, name), name
    assert our_loss.reduction == ref_loss.reduction == "mean" and isinstance(our_loss.reduction, str)
    assert isinstance(our_loss, torch.nn.modules.loss._Loss)
    if binning == "soft":
        assert our_cls(empty_weight=0.5).empty_weight == ref_cls(empty_weight=0.5).empty_weight == 0.5


@pytest.mark.parametrize("binning", BINNINGS)
def test_loss_reduction_enum_and_attribute_updates(binning):
    x, labels = _case(2, 3, (5, 4), 1)
    for red in (LossReduction.MEAN, LossReduction.SUM, LossReduction.NONE):
        ref, ours = _both(binning, reduction=red, to_onehot_y=True, softmax=True)
        assert ours.reduction == red.value
        torch.testing.assert_close(ours(x, labels), ref(x, labels), rtol=1e-5, atol=2e-6)
    # MONAI's options are plain attributes; calibops' rebuild their checked options once when set
    ref, ours = _both(binning, to_onehot_y=True, softmax=True)
    for loss in (ref, ours):
        loss.num_bins = 7
        loss.include_background = False
    torch.testing.assert_close(ours(x, labels), ref(x, labels), rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="num_bins"):
        ours.num_bins = 0


# ------------------------------------------------------------------------------------------------ values and gradients


def _option_grid():
    acts = ("softmax", "sigmoid", "other_act", "none")
    yield from itertools.product(
        BINNINGS,
        acts,
        (True, False),
        (True, False),
        ("mean", "sum", "none"),
        ("none", "scalar", "list"),
        (False, True),
        (True, False),
    )


_GRID = list(_option_grid())


def _grid_kwargs(act, inc_bg, onehot, red, weight, right, iec, C):
    kw = dict(include_background=inc_bg, to_onehot_y=onehot, reduction=red, right=right, ignore_empty_classes=iec)
    if act == "softmax":
        kw["softmax"] = True
    elif act == "sigmoid":
        kw["sigmoid"] = True
    elif act == "other_act":
        kw["other_act"] = torch.sigmoid
    used = C - 1 if (not inc_bg and C > 1) else C
    if weight == "scalar":
        kw["weight"] = 1.5
    elif weight == "list":
        kw["weight"] = [0.5 + 0.25 * i for i in range(used)]
    return kw


@pytest.mark.parametrize("case", range(0, len(_GRID), 7))
def test_every_option_matches_monai(case):
    """A sweep of every option combination (every 7th of the full grid, C cycling 1..8, 2D and 3D) in float32:
    values to float32 rounding, input gradients likewise."""
    binning, act, inc_bg, onehot, red, weight, right, iec = _GRID[case]
    C = 1 + case % 8
    spatial = (6, 5) if case % 2 else (4, 3, 5)
    # softmax is ignored for one channel (MONAI's rule): there the input is probabilities
    logits = act in ("sigmoid", "other_act") or (act == "softmax" and C > 1)
    x, labels = _case(2, C, spatial, case, logits=logits)
    y = labels if (onehot and C > 1) else (_onehot(labels, C) if C > 1 else labels.clamp(max=1).float())
    kw = _grid_kwargs(act, inc_bg, onehot, red, weight, right, iec, C)
    ref, ours = _both(binning, 8, **kw)
    v_ref, g_ref = _value_and_grad(ref, x, y)
    v_ours, g_ours = _value_and_grad(ours, x, y)
    assert v_ours.shape == v_ref.shape and v_ours.dtype == v_ref.dtype
    torch.testing.assert_close(v_ours, v_ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("binning", BINNINGS)
@pytest.mark.parametrize("C", range(1, 9))
@pytest.mark.parametrize("spatial", [(9, 7), (5, 4, 6)], ids=["2d", "3d"])
def test_classes_1_to_8_in_2d_and_3d(binning, C, spatial):
    x, labels = _case(3, C, spatial, 100 + C, logits=True)
    y = labels if C > 1 else labels.clamp(max=1)
    onehot = C > 1
    kw = dict(to_onehot_y=onehot, softmax=C > 1, sigmoid=C == 1, reduction="none")
    ref, ours = _both(binning, 12, **kw)
    v_ref, g_ref = _value_and_grad(ref, x, y.float() if C == 1 else y)
    v_ours, g_ours = _value_and_grad(ours, x, y.float() if C == 1 else y)
    assert v_ours.shape == v_ref.shape == (3, C, *([1] * len(spatial)))
    torch.testing.assert_close(v_ours, v_ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("binning", BINNINGS)
def test_float64_in_float64_out_matches_and_gradchecks(binning):
    x, labels = _case(2, 4, (6, 5), 7, dtype=torch.float64, logits=False)
    y = _onehot(labels, 4, torch.float64)
    ref, ours = _both(binning, 10, ignore_empty_classes=False)
    v_ref, g_ref = _value_and_grad(ref, x, y)
    v_ours, g_ours = _value_and_grad(ours, x, y)
    assert v_ours.dtype == v_ref.dtype == torch.float64
    # calibops bins float64 with its contract's float32 edges / centres (linspace(0, 1 + eps32) computed in float32,
    # identical on every backend); MONAI computes them in float64. They differ by ~1e-8 relative, so soft weights
    # (and hard bins within ~1e-8 of an edge) differ at that level, far above float64 rounding.
    torch.testing.assert_close(v_ours, v_ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    # gradcheck with default arguments (eps 1e-6, atol 1e-5): the hard and soft losses are piecewise smooth in p
    p = torch.tensor([[[0.13, 0.31, 0.67, 0.89]]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(PAIRS[binning][1](num_bins=5, ignore_empty_classes=False), (p, t))
    assert torch.autograd.gradcheck(
        PAIRS[binning][1](num_bins=7, softmax=True), (x[:1, :, :3, :3].clone().requires_grad_(), y[:1, :, :3, :3])
    )


@pytest.mark.parametrize("binning", BINNINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(binning, dtype):
    """fp16/bf16: both return float32. calibops applies the activation in float32, MONAI in the low precision, so
    calibops equals MONAI run on the float32 copy of the logits (the more accurate of the two) and stays within the
    low precision's rounding of MONAI's own result."""
    x, labels = _case(2, 3, (8, 6), 11, logits=True)
    xl = x.to(dtype)
    ref, ours = _both(binning, 10, to_onehot_y=True, softmax=True)
    out = ours(xl, labels)
    assert out.dtype == ref(xl, labels).dtype == torch.float32
    torch.testing.assert_close(out, ref(xl.float(), labels), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out, ref(xl, labels), rtol=0, atol=2e-2)


# ------------------------------------------------------------------------------------------------ exact edges / centres


@pytest.mark.parametrize("right", [False, True])
def test_hard_exact_edges(right):
    M = 5
    edges = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, M + 1, dtype=torch.float32)
    p = torch.cat([edges[:-1], torch.tensor([1.0]), edges[1:-1] + 1e-3]).view(1, 1, -1)
    y = (torch.arange(p.shape[-1]) % 2).float().view(1, 1, -1)
    ref, ours = _both("hard", M, right=right)
    v_ref, g_ref = _value_and_grad(ref, p, y)
    v_ours, g_ours = _value_and_grad(ours, p, y)
    torch.testing.assert_close(v_ours, v_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def _centre_case():
    M = 4
    centres = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, 2 * M + 1, dtype=torch.float32)[1::2]
    p = torch.cat([centres, torch.tensor([0.0, 1.0, 0.3, 0.55])]).view(1, 1, -1)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]).view(1, 1, -1)
    return M, p, y


def _soft_centre_check(right):
    M, p, y = _centre_case()
    ref, ours = _both("soft", M, right=right, empty_weight=0.0, ignore_empty_classes=False)
    v_ref, g_ref = _value_and_grad(ref, p, y)
    v_ours, g_ours = _value_and_grad(ours, p, y)
    torch.testing.assert_close(v_ours, v_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_soft_exact_centres_right_false():
    _soft_centre_check(False)


def test_soft_exact_centres_right_true():
    _soft_centre_check(True)


def test_soft_centre_values_agree_for_both_rules():
    """The soft value is continuous at a centre: only the gradient depends on ``right``."""
    M, p, y = _centre_case()
    for right in (False, True):
        ref, ours = _both("soft", M, right=right, empty_weight=0.0, ignore_empty_classes=False)
        torch.testing.assert_close(ours(p, y), ref(p, y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_soft_right_gradient_on_each_backend(backend):
    if backend == "cpu" and not _ext.extension_loaded():
        pytest.skip("the compiled extension is not built")
    M, p, y = _centre_case()
    ref = monai_losses.SoftL1ACELoss(M, right=True, empty_weight=0.0, ignore_empty_classes=False)
    ours = calibops.SoftL1ACELoss(M, right=True, empty_weight=0.0, ignore_empty_classes=False, backend=backend)
    torch.testing.assert_close(_value_and_grad(ours, p, y)[1], _value_and_grad(ref, p, y)[1], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ reduction shapes


@pytest.mark.parametrize("binning", BINNINGS)
@pytest.mark.parametrize("spatial", [(7,), (4, 5), (3, 4, 5)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("include_background", [True, False])
def test_reduction_none_shape(binning, spatial, include_background):
    x, labels = _case(2, 4, spatial, 5)
    ref, ours = _both(binning, reduction="none", to_onehot_y=True, softmax=True, include_background=include_background)
    a, b = ref(x, labels), ours(x, labels)
    assert b.shape == a.shape == (2, 4 if include_background else 3, *([1] * len(spatial)))
    torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("binning", BINNINGS)
@pytest.mark.parametrize(
    "weight",
    [None, 2, 0.5, [1.0, 2.0, 3.0], torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)],
    ids=["none", "int", "float", "list", "f64tensor"],
)
def test_state_dict_both_ways(binning, weight):
    ref, ours = _both(binning, weight=weight)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for k in sd_ref:
        assert sd_ours[k].dtype == sd_ref[k].dtype and torch.equal(sd_ours[k], sd_ref[k])
    # a MONAI checkpoint loads into calibops and back, strict
    buf = io.BytesIO()
    torch.save(sd_ref, buf)
    buf.seek(0)
    other = PAIRS[binning][1](weight=weight)
    other.load_state_dict(torch.load(buf), strict=True)
    PAIRS[binning][0](weight=weight).load_state_dict(ours.state_dict(), strict=True)
    # the buffer follows the module and scales the loss as MONAI's
    x, labels = _case(2, 3, (5, 5), 3)
    r2, o2 = _both(binning, weight=weight, to_onehot_y=True, softmax=True)
    torch.testing.assert_close(o2(x, labels), r2(x, labels), rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------ warnings


def _warnings_of(loss, x, y):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(x, y)
    return sorted(
        str(w.message) for w in caught if issubclass(w.category, UserWarning) and "single channel" in str(w.message)
    )


@pytest.mark.parametrize("binning", BINNINGS)
@pytest.mark.parametrize(
    "flags", list(itertools.product((False, True), repeat=3)), ids=lambda f: "".join("1" if v else "0" for v in f)
)
def test_single_channel_warnings_once_each(binning, flags):
    softmax, onehot, drop_bg = flags
    x = torch.tensor([[[0.2, 0.8, 0.6]]])
    y = torch.tensor([[[0.0, 1.0, 1.0]]])
    ref, ours = _both(binning, softmax=softmax, to_onehot_y=onehot, include_background=not drop_bg)
    got, want = _warnings_of(ours, x, y), _warnings_of(ref, x, y)
    assert got == want and len(got) == sum(flags)
    torch.testing.assert_close(ours(x, y), ref(x, y))
    assert _warnings_of(torch.jit.script(ours), x, y) == want


# ------------------------------------------------------------------------------------------------ errors


def _error_cases():
    ones = torch.ones
    return {
        "num_bins=0": (dict(num_bins=0), None),
        "sigmoid+softmax": (dict(sigmoid=True, softmax=True), None),
        "other_act not callable": (dict(other_act=1), None),
        "negative weight": (dict(weight=[1.0, -1.0]), None),
        "2-D weight": (dict(weight=[[1.0]]), None),
        "nan weight": (dict(weight=[float("nan")]), None),
        "bad reduction": (dict(reduction="unsupported"), None),
        "weight length": (dict(weight=[1.0, 2.0, 3.0]), (ones(1, 2, 2), ones(1, 2, 2))),
        "target shape": (dict(), (ones(1, 2, 2), ones(1, 1, 2))),
        "label map channels": (dict(to_onehot_y=True), (ones(1, 2, 2), ones(1, 2, 2))),
        "input ndim": (dict(), (ones(1, 2), ones(1, 2))),
        "integer input": (dict(), (ones(1, 2, 2, dtype=torch.int64), ones(1, 2, 2))),
    }


@pytest.mark.parametrize("binning", BINNINGS)
@pytest.mark.parametrize("name", list(_error_cases()))
def test_errors_are_caught_by_monai_users_except(binning, name):
    kwargs, call = _error_cases()[name]

    def attempt(cls):
        loss = cls(**kwargs)
        if call is not None:
            loss(*call)

    ref_cls, our_cls = PAIRS[binning]
    with pytest.raises(Exception) as ref_exc:
        attempt(ref_cls)
    with pytest.raises(Exception) as our_exc:
        attempt(our_cls)
    assert isinstance(our_exc.value, ref_exc.type), (name, ref_exc.value, our_exc.value)
    if name in ("target shape", "label map channels"):  # MONAI's code and its tests disagree on which: both
        assert isinstance(our_exc.value, ValueError) and isinstance(our_exc.value, AssertionError)


def test_soft_empty_weight_errors():
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            monai_losses.SoftL1ACELoss(empty_weight=bad)
        with pytest.raises(ValueError):
            calibops.SoftL1ACELoss(empty_weight=bad)


# ------------------------------------------------------------------------------------------ MetaTensor, TorchScript


@pytest.mark.parametrize("binning", BINNINGS)
def test_metatensor_inputs(binning):
    x, labels = _case(2, 3, (6, 5), 9)
    mx = MetaTensor(x.clone(), meta={"filename_or_obj": "case.nii.gz"}).requires_grad_(True)
    my = MetaTensor(labels.clone())
    ref, ours = _both(binning, to_onehot_y=True, softmax=True)
    a, b = ref(mx, my), ours(mx, my)
    assert type(b) is type(a)
    torch.testing.assert_close(b.as_tensor(), a.as_tensor(), rtol=2e-5, atol=2e-6)
    b.backward()
    assert mx.grad is not None and torch.isfinite(mx.grad).all()


@pytest.mark.parametrize("binning", BINNINGS)
def test_torchscript_script_save_load(binning, tmp_path):
    if not _ext.extension_loaded():
        pytest.skip("the scripted loss needs the compiled extension")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 4, 5, 6, generator=g)
    y = _onehot(torch.randint(0, 3, (2, 1, 4, 5, 6), generator=g), 3)
    for kw in (
        dict(num_bins=5),
        dict(num_bins=7, softmax=True, include_background=False, reduction="none", weight=[1.0, 2.0]),
    ):
        ref, ours = _both(binning, **kw)
        scripted = torch.jit.script(ours)
        path = tmp_path / f"{binning}.pt"
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path))
        for out in (scripted(x, y), loaded(x, y)):
            torch.testing.assert_close(out, ours(x, y), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(out, ref(x, y), rtol=2e-5, atol=2e-6)
        xs = x.clone().requires_grad_(True)
        scripted(xs, y).sum().backward()
        torch.testing.assert_close(xs.grad, _value_and_grad(ref, x, y)[1], rtol=1e-4, atol=2e-6)
    with pytest.raises(RuntimeError, match="other_act"):
        torch.jit.script(PAIRS[binning][1](other_act=torch.sigmoid))


# ------------------------------------------------------------------------------------------------ MONAI's own tests


def _monai_behaviour(loss_type, binning):
    """The behaviours MONAI's tests/losses/test_calibration_loss.py checks, asserted on ``loss_type``."""
    close = torch.testing.assert_close
    if binning == "hard":
        close(
            loss_type(num_bins=5)(torch.tensor([[[0.1, 0.3, 0.7, 0.9]]]), torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])),
            torch.tensor(0.2),
        )
    else:
        p = torch.tensor([[[0.0, 0.25, 0.5, 0.75, 1.0]]], dtype=torch.float64)
        t = torch.tensor([[[0.0, 0.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
        close(loss_type(num_bins=2)(p, t), torch.tensor(0.1, dtype=torch.float64))
        close(
            loss_type(num_bins=2, empty_weight=0.0)(torch.tensor([[[0.5]]]), torch.tensor([[[1.0]]])), torch.tensor(0.5)
        )
        q = torch.tensor([[[0.25, 0.75]]], requires_grad=True)
        r = loss_type(num_bins=2, empty_weight=1.1, ignore_empty_classes=False)(q, torch.tensor([[[0.0, 1.0]]]))
        close(r, torch.tensor(0.0))
        r.backward()
        close(q.grad, torch.zeros_like(q))
    t = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]])
    loss = loss_type(num_bins=4)
    close(loss(t, t), torch.tensor(0.0))
    assert loss(1.0 - t, t).item() > 0 and loss(t * 0.5 + 0.25, t).item() > 0
    pred = torch.tensor([[[0.1, 0.9], [0.2, 0.8]], [[0.3, 0.7], [0.4, 0.6]]])
    targ = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    none = loss_type(num_bins=5, reduction="none")(pred, targ)
    assert none.shape == (2, 2, 1)
    close(loss_type(num_bins=5)(pred, targ), none.mean())
    close(loss_type(num_bins=5, reduction="sum")(pred, targ), none.sum())
    close(loss_type(num_bins=5, weight=2.0)(pred, targ), 2.0 * none.mean())
    close(loss_type(num_bins=5, weight=[1.0, 3.0])(pred, targ), (none * torch.tensor([1.0, 3.0]).view(1, 2, 1)).mean())
    pred, targ = torch.tensor([[[0.1, 0.9], [0.2, 0.8]]]), torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    none = loss_type(num_bins=5, reduction="none")(pred, targ)
    close(none[:, 1], torch.zeros_like(none[:, 1]))
    close(none[:, 0].mean(), 2 * none.mean())
    assert loss_type(num_bins=5, ignore_empty_classes=False)(pred, targ).item() > 0
    q = torch.full((2, 2, 4), 0.25, requires_grad=True)
    r = loss_type()(q, torch.zeros_like(q))
    close(r, torch.tensor(0.0))
    r.backward()
    close(q.grad, torch.zeros_like(q))
    assert loss_type(include_background=False, reduction="none")(
        torch.tensor([[[0.9, 0.1], [0.1, 0.9]]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    ).shape == (1, 1, 1)
    logits, labels = torch.tensor([[[0.2, -0.4], [-0.2, 0.4]]]), torch.tensor([[[0, 1]]])
    oh = _onehot(labels, 2)
    close(loss_type(softmax=True, to_onehot_y=True)(logits, labels), loss_type()(torch.softmax(logits, 1), oh))
    close(loss_type(sigmoid=True)(logits[:, :1], oh[:, :1]), loss_type()(torch.sigmoid(logits[:, :1]), oh[:, :1]))
    close(loss_type(other_act=lambda v: v.square())(logits.abs(), oh), loss_type()(logits.square(), oh))
    q = torch.tensor([[[0.13, 0.31, 0.67, 0.89]]], dtype=torch.float64, requires_grad=True)
    t64 = torch.tensor([[[0.0, 1.0, 0.0, 1.0]]], dtype=torch.float64)
    r = loss_type(num_bins=5, ignore_empty_classes=False)(q, t64)
    assert r.dtype == torch.float64
    assert torch.autograd.gradcheck(loss_type(num_bins=5, ignore_empty_classes=False), (q, t64))
    r.backward()
    assert torch.isfinite(q.grad).all() and (q.grad != 0).any()
    h = torch.tensor([[[0.1, 0.9]]], dtype=torch.float16)
    r = loss_type(ignore_empty_classes=False)(h, torch.tensor([[[0.0, 1.0]]], dtype=torch.float16))
    assert r.dtype == torch.float32 and torch.isfinite(r)
    r = loss_type(to_onehot_y=True, softmax=True)(torch.rand(2, 3, 4, 5, 6), torch.randint(0, 3, (2, 1, 4, 5, 6)))
    assert r.shape == () and torch.isfinite(r)
    p, t = torch.tensor([[[0.1, 0.9]]]), torch.tensor([[[0.0, 1.0]]])
    p0, t0, w = p.clone(), t.clone(), torch.tensor([2.0])
    lw = loss_type(weight=w)
    lw(p, t)
    close(p, p0)
    close(t, t0)
    close(lw.class_weight, w)
    p, t = p.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss_type(ignore_empty_classes=False)(p, t).backward()
    assert p.grad is not None and t.grad is None


@pytest.mark.parametrize("binning", BINNINGS)
@pytest.mark.parametrize("impl", ["monai", "calibops"])
def test_monai_test_suite_behaviour(binning, impl):
    """MONAI's own loss tests, on MONAI's class (so these checks are known to describe MONAI) and on calibops'."""
    _monai_behaviour(PAIRS[binning][0 if impl == "monai" else 1], binning)
