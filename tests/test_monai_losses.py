"""calibops.HardL1ACELoss / SoftL1ACELoss: MONAI 1.7's loss interface, checked without MONAI 1.7 installed.

The comparison with MONAI's own classes is tests/test_monai17_parity.py (CI's monai-weekly job); here the
interface is checked against calibops' reference and the functional API, so it runs in every environment.
"""

from __future__ import annotations

import enum
import inspect
import warnings

import pytest
import torch

import calibops
import calibops.functional as F
from calibops import HardL1ACELoss, MonaiShapeError, SoftL1ACELoss
from calibops.backends import extension as _ext

LOSSES = {"hard": HardL1ACELoss, "soft": SoftL1ACELoss}

MONAI_ORDER = [
    "num_bins",
    "include_background",
    "to_onehot_y",
    "sigmoid",
    "softmax",
    "other_act",
    "reduction",
    "weight",
]


def _case(C=3, spatial=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, C, *spatial, generator=g) * 2, torch.randint(0, C, (2, 1, *spatial), generator=g)


@pytest.mark.parametrize("binning", list(LOSSES))
def test_signature_order_defaults_and_keyword_only_extras(binning):
    params = inspect.signature(LOSSES[binning]).parameters
    names = list(params)
    tail = ["empty_weight", "right", "ignore_empty_classes"] if binning == "soft" else ["right", "ignore_empty_classes"]
    assert names == [*MONAI_ORDER, *tail, "backend", "validate"]
    assert params["num_bins"].default == 20 and params["reduction"].default == "mean"
    assert params["include_background"].default is True and params["ignore_empty_classes"].default is True
    assert params["backend"].kind is params["validate"].kind is inspect.Parameter.KEYWORD_ONLY
    loss = LOSSES[binning](12, False, True, False, True)
    assert (loss.num_bins, loss.include_background, loss.to_onehot_y, loss.sigmoid, loss.softmax) == (
        12,
        False,
        True,
        False,
        True,
    )
    assert loss.binning == binning and isinstance(loss, torch.nn.modules.loss._Loss)
    with pytest.raises(TypeError, match="num_bins"):
        LOSSES[binning](True)  # the old order (include_background first) is caught with the new order named


@pytest.mark.parametrize("binning", list(LOSSES))
def test_values_equal_the_functional_api(binning):
    x, y = _case()
    for kw in (dict(), dict(include_background=False), dict(ignore_empty_classes=False, right=True)):
        loss = LOSSES[binning](9, to_onehot_y=True, softmax=True, **kw)
        f = F.marginal_l1_ace(x, y, num_bins=9, binning=binning, to_onehot_y=True, softmax=True, **kw)
        torch.testing.assert_close(loss(x, y), f, rtol=0, atol=0)


@pytest.mark.parametrize("binning", list(LOSSES))
def test_reduction_none_is_broadcastable_and_enums_are_accepted(binning):
    class Reduction(str, enum.Enum):  # the shape of monai.utils.LossReduction
        NONE = "none"
        MEAN = "mean"

    x, y = _case(4, (3, 4, 5))
    none = LOSSES[binning](to_onehot_y=True, softmax=True, reduction=Reduction.NONE, include_background=False)(x, y)
    assert none.shape == (2, 3, 1, 1, 1)
    mean = LOSSES[binning](to_onehot_y=True, softmax=True, reduction=Reduction.MEAN, include_background=False)(x, y)
    torch.testing.assert_close(mean, none.mean())
    with pytest.raises(ValueError, match="reduction"):
        LOSSES[binning](reduction="batch")


@pytest.mark.parametrize("binning", list(LOSSES))
def test_class_weight_buffer(binning):
    x, y = _case()
    cls = LOSSES[binning]
    assert "class_weight" not in cls().state_dict()
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    loss = cls(to_onehot_y=True, softmax=True, weight=w, reduction="none")
    assert loss.state_dict()["class_weight"].dtype == torch.float64  # torch.as_tensor(weight), as MONAI
    base = cls(to_onehot_y=True, softmax=True, reduction="none")(x, y)
    torch.testing.assert_close(loss(x, y), base * w.float().view(1, 3, 1, 1))
    torch.testing.assert_close(cls(to_onehot_y=True, softmax=True, weight=2)(x, y), 2 * base.mean())
    assert cls(weight=2).state_dict()["class_weight"].dtype == torch.int64
    other = cls(weight=[0.0, 0.0, 0.0])
    other.load_state_dict(loss.state_dict(), strict=True)
    torch.testing.assert_close(other.class_weight, w.float())
    with pytest.raises(ValueError, match="number of classes"):
        cls(weight=[1.0, 2.0])(torch.rand(1, 3, 4), torch.rand(1, 3, 4))
    for bad, err in (([1.0, -1.0], ValueError), ([[1.0]], ValueError), ([float("inf")], ValueError), ("a", TypeError)):
        with pytest.raises(err, match="weight"):
            cls(weight=bad)


@pytest.mark.parametrize("binning", list(LOSSES))
def test_shape_errors_are_both_value_and_assertion_errors(binning):
    cls = LOSSES[binning]
    assert issubclass(MonaiShapeError, ValueError) and issubclass(MonaiShapeError, AssertionError)
    with pytest.raises(MonaiShapeError, match="different shape"):
        cls()(torch.rand(1, 2, 2), torch.rand(1, 1, 2))
    with pytest.raises(MonaiShapeError, match="channel with length equal to one"):
        cls(to_onehot_y=True)(torch.rand(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="ndim"):
        cls()(torch.rand(1, 2), torch.rand(1, 2))
    with pytest.raises(TypeError, match="floating point"):
        cls()(torch.ones(1, 2, 2, dtype=torch.int64), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="Incompatible"):
        cls(sigmoid=True, other_act=torch.tanh)
    with pytest.raises(TypeError, match="other_act"):
        cls(other_act=1)


@pytest.mark.parametrize("binning", list(LOSSES))
def test_single_channel_warns_each_message_once(binning):
    x = torch.tensor([[[0.2, 0.8, 0.6, 0.1]]])
    y = torch.tensor([[[0.0, 1.0, 0.5, 0.0]]])  # a dense (soft) target: MONAI ignores to_onehot_y for C = 1
    loss = LOSSES[binning](softmax=True, to_onehot_y=True, include_background=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss(x, y)
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "single channel prediction, `include_background=False` ignored.",
        "single channel prediction, `softmax=True` ignored.",
        "single channel prediction, `to_onehot_y=True` ignored.",
    ]
    assert all(w.filename == __file__ or "torch/nn/modules" in w.filename for w in caught)
    torch.testing.assert_close(out, LOSSES[binning]()(x, y))


@pytest.mark.parametrize("binning", list(LOSSES))
def test_float64_in_float64_out_and_default_gradcheck(binning):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 3, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (1, 3, 3), generator=g), 3).movedim(-1, 1).double()
    loss = LOSSES[binning](num_bins=6, ignore_empty_classes=False)
    assert loss(x, y).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, (x, y))
    assert torch.autograd.gradcheck(LOSSES[binning](num_bins=6, softmax=True), (x, y))


@pytest.mark.parametrize("binning", list(LOSSES))
def test_option_attributes_rebuild_the_checked_options(binning):
    loss = LOSSES[binning]()
    before = loss.options
    loss.num_bins = 8
    assert loss.options is not before and loss.options.num_bins == 8 and loss.num_bins == 8
    with pytest.raises(ValueError, match="num_bins"):
        loss.num_bins = 0
    assert loss.num_bins == 8
    loss.reduction = "sum"
    assert loss.reduction == "sum" and loss.options.reduction == "sum"


@pytest.mark.parametrize("binning", list(LOSSES))
def test_torchscript_matches_eager(binning, tmp_path):
    if not _ext.extension_loaded():
        pytest.skip("the scripted loss calls the compiled calibops::binned_stats op")
    x, y = _case(4, (5, 4, 3), seed=3)
    oh = torch.nn.functional.one_hot(y[:, 0], 4).movedim(-1, 1).float()
    cases = (
        (dict(to_onehot_y=True, softmax=True), y),
        (dict(sigmoid=True, include_background=False, reduction="none", weight=[1.0, 2.0, 3.0]), oh),
        (dict(num_bins=5, reduction="sum", right=True, ignore_empty_classes=False), torch.softmax(x, 1)),
    )
    for kw, target in cases:
        eager = LOSSES[binning](**kw)
        inp = torch.softmax(x, 1) if "num_bins" in kw else x
        scripted = torch.jit.script(eager)
        torch.testing.assert_close(scripted(inp, target), eager(inp, target), rtol=1e-6, atol=1e-7)
        torch.jit.save(scripted, str(tmp_path / "loss.pt"))
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "loss.pt"))(inp, target), eager(inp, target))
        a = inp.clone().requires_grad_(True)
        b = inp.clone().requires_grad_(True)
        scripted(a, target).sum().backward()
        eager(b, target).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    eager = LOSSES[binning](to_onehot_y=True, softmax=True)
    scripted = torch.jit.script(eager)
    for dtype in (torch.float16, torch.bfloat16):  # the kernel activates low-precision logits in float32, both ways
        out = scripted(x.to(dtype), y)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, eager(x.to(dtype), y), rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="other_act"):
        torch.jit.script(LOSSES[binning](other_act=torch.tanh))
    with pytest.raises(torch.jit.Error, match="different shape"):
        torch.jit.script(LOSSES[binning]())(torch.rand(1, 2, 3), torch.rand(1, 1, 3))


def test_marginal_loss_keeps_its_own_interface():
    params = list(inspect.signature(calibops.MarginalL1ACELoss).parameters)
    assert params[:5] == ["include_background", "to_onehot_y", "sigmoid", "softmax", "other_act"]
    assert "binning" in params and "none_shape" in params


@pytest.mark.parametrize("binning", list(LOSSES))
def test_torch_compile_fullgraph_matches_eager(binning):
    x, y = _case(3, (6, 5), seed=5)
    loss = LOSSES[binning](to_onehot_y=True, softmax=True, reduction="none", weight=[1.0, 2.0, 0.5])
    loss(x, y)  # first call outside the compiler (backend choice and its self-check)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out = compiled(a, y)
    ref = loss(b, y)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
