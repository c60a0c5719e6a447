"""Loss arguments at parity with MONAI: argument order, other_act, the single-channel rules, reduction shapes.

The single-channel tests reproduce the issue's case (C = 1, sigmoid, to_onehot_y with {0, 1} labels): the
loss must equal the loss of the label map used as the channel's dense target, with validation on or off,
with MONAI's warning; the expected value is the dense-target call, an independent code path of the kernels.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from calibops import HardL1ACELoss, MarginalL1ACELoss, SoftL1ACELoss
from calibops.functional import marginal_l1_ace


def _binary(seed=0, B=2, size=(16, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, *size, generator=g) * 2, torch.randint(0, 2, (B, 1, *size), generator=g)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_single_channel_label_map_is_the_channel_target(validate, binning):
    x, y = _binary()
    with pytest.warns(UserWarning, match=r"single channel prediction, `to_onehot_y=True` ignored"):
        loss = MarginalL1ACELoss(sigmoid=True, to_onehot_y=True, binning=binning, validate=validate)(x, y)
    expected = marginal_l1_ace(x, y.float(), sigmoid=True, binning=binning)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    # one rule in every entry point: the functional reads the label map the same way (v0.2 read it as class
    # indices of a 1-class problem there, dropping the foreground)
    with pytest.warns(UserWarning, match=r"`to_onehot_y=True` ignored"):
        same = marginal_l1_ace(x, y, sigmoid=True, to_onehot_y=True, binning=binning, validate=validate)
    torch.testing.assert_close(same, loss, rtol=0, atol=0)
    # (B, *spatial) label maps as well
    with pytest.warns(UserWarning):
        torch.testing.assert_close(
            MarginalL1ACELoss(sigmoid=True, to_onehot_y=True, binning=binning)(x, y[:, 0]), expected, rtol=0, atol=0
        )


def test_single_channel_gradients_and_ignore_index():
    x, y = _binary(seed=1)
    x.requires_grad_(True)
    with pytest.warns(UserWarning):
        loss = MarginalL1ACELoss(sigmoid=True, to_onehot_y=True)(x, y)
    (g,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(marginal_l1_ace(x2, y.float(), sigmoid=True), x2)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-7)
    # ignore_index with one channel: the voxels are left out; equal to the loss on the kept voxels only
    y_ign = y.clone()
    y_ign[:, :, :4] = 255
    x3 = x.detach().clone().requires_grad_(True)
    with pytest.warns(UserWarning):
        loss_ign = MarginalL1ACELoss(sigmoid=True, to_onehot_y=True, ignore_index=255, reduction="none")(x3, y_ign)
    kept = marginal_l1_ace(x[:, :, 4:].detach(), y[:, :, 4:].float(), sigmoid=True, reduction="none")
    torch.testing.assert_close(loss_ign, kept, rtol=1e-5, atol=1e-6)
    loss_ign.sum().backward()
    assert torch.all(x3.grad[:, :, :4] == 0) and x3.grad[:, :, 4:].abs().sum() > 0


def test_single_channel_bad_labels_and_softmax_rule():
    x, y = _binary()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="labels must be 0 or 1"):
        MarginalL1ACELoss(sigmoid=True, to_onehot_y=True)(x, y * 2)
    p = torch.sigmoid(x)
    with pytest.warns(UserWarning, match=r"`softmax=True` ignored"):
        loss = MarginalL1ACELoss(softmax=True)(p, y.float())
    torch.testing.assert_close(loss, marginal_l1_ace(p, y.float()), rtol=0, atol=0)


def test_other_act():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (2, 1, 8, 8), generator=g)
    act = lambda t: torch.softmax(t, 1)  # noqa: E731
    torch.testing.assert_close(
        MarginalL1ACELoss(to_onehot_y=True, other_act=act)(x, y),
        MarginalL1ACELoss(to_onehot_y=True, softmax=True)(x, y),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="other_act cannot be combined"):
        MarginalL1ACELoss(softmax=True, other_act=torch.sigmoid)
    with pytest.raises(TypeError, match="other_act must be callable"):
        MarginalL1ACELoss(other_act="tanh")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # tanh is not a probability
        MarginalL1ACELoss(to_onehot_y=True, other_act=torch.tanh)(x, y)


def test_argument_order_matches_monai_and_old_positional_num_bins_is_caught():
    names = list(inspect.signature(MarginalL1ACELoss).parameters)
    assert names[:5] == ["include_background", "to_onehot_y", "sigmoid", "softmax", "other_act"]
    params = inspect.signature(MarginalL1ACELoss).parameters
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in names[5:])
    monai_losses = pytest.importorskip("monai.losses")
    assert list(inspect.signature(monai_losses.DiceLoss).parameters)[:5] == names[:5]
    m = MarginalL1ACELoss(False, True, False, True)
    assert (m.include_background, m.to_onehot_y, m.sigmoid, m.softmax) == (False, True, False, True)
    with pytest.raises(TypeError, match="num_bins=20"):
        MarginalL1ACELoss(20)
    # HardL1ACELoss / SoftL1ACELoss take MONAI 1.7's own order (num_bins first): tests/test_monai_losses.py
    assert HardL1ACELoss(10, True, True, softmax=True).binning == "hard"
    assert SoftL1ACELoss(num_bins=10).binning == "soft"


def test_reduction_none_shapes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 5, 3, generator=g)
    y = torch.randint(0, 4, (2, 1, 6, 5, 3), generator=g)
    compact = MarginalL1ACELoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")(x, y)
    assert compact.shape == (2, 3)
    bc = MarginalL1ACELoss(
        include_background=False, to_onehot_y=True, softmax=True, reduction="none", none_shape="broadcast"
    )(x, y)
    assert bc.shape == (2, 3, 1, 1, 1)
    torch.testing.assert_close(bc.reshape(2, 3), compact, rtol=0, atol=0)
    monai_losses = pytest.importorskip("monai.losses")
    dice = monai_losses.DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")(x, y)
    assert dice.shape == bc.shape  # MONAI's broadcastable shape
    with pytest.raises(ValueError, match="none_shape"):
        MarginalL1ACELoss(none_shape="flat")


def test_multi_rater_pass_through():
    if "multi_rater" not in inspect.signature(marginal_l1_ace).parameters:
        pytest.skip("the functional API has no multi_rater yet")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, 7, generator=g)
    raters = torch.randint(0, 3, (2, 3, 7, 7), generator=g)
    loss = MarginalL1ACELoss(to_onehot_y=True, softmax=True, multi_rater=True)(x, raters)
    expected = marginal_l1_ace(x, raters, to_onehot_y=True, softmax=True, multi_rater=True)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    single = MarginalL1ACELoss(to_onehot_y=True, softmax=True)(x, raters[:, :1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_rater = MarginalL1ACELoss(to_onehot_y=True, softmax=True, multi_rater=True)(x, raters[:, :1])
    torch.testing.assert_close(one_rater, single, rtol=1e-6, atol=1e-7)
