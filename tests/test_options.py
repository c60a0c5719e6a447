"""The one Options: one default per option across the library, checks written once, keyword-only functions.

Each test here would fail on v0.2, where the option list was written out by hand in ~30 places and drifted
(``include_background`` defaulted to False in ``calibration_errors``/``brier_score``/``DatasetCalibration`` and to
True elsewhere; ``sigmoid``/``softmax`` came in opposite positional order in the losses and the functions).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings

import numpy as np
import pytest
import torch

import calibops
from calibops import DatasetCalibration, MarginalL1ACELoss
from calibops import functional as F
from calibops.options import DEFAULTS, Options

FUNCTIONS = [
    F.binned_stats,
    F.marginal_l1_ace,
    F.calibration_errors,
    F.brier_score,
    F.volume_crps,
    F.consensus_dice,
    F.classification_calibration_errors,
    F.classification_marginal_l1_ace,
]
CLASSES = [MarginalL1ACELoss, DatasetCalibration]


def _defaults(fn) -> dict:
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if n in DEFAULTS and p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize("fn", FUNCTIONS + CLASSES, ids=lambda f: f.__name__)
def test_every_public_signature_uses_the_one_default(fn):
    found = _defaults(fn)
    assert found, f"{fn.__name__} lists no option"
    wrong = {n: (v, DEFAULTS[n]) for n, v in found.items() if v != DEFAULTS[n]}
    assert not wrong, f"{fn.__name__}: defaults differ from Options: {wrong}"


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_functional_options_are_keyword_only(fn):
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:2]] == ["input", "target"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:]), fn.__name__


def test_include_background_defaults_to_true_everywhere():
    x = torch.rand(2, 3, 5, 5)
    x = x / x.sum(1, keepdim=True)
    y = torch.randint(0, 3, (2, 1, 5, 5))
    assert F.calibration_errors(x, y, to_onehot_y=True).ece.shape == (2, 3)
    assert F.brier_score(x, y, to_onehot_y=True).shape == (2, 3)
    assert F.binned_stats(x, y, to_onehot_y=True).count.shape == (2, 3, 20)
    m = DatasetCalibration(3, to_onehot_y=True)
    m.update(x, y)
    assert m.compute().macro.ece.shape == (3,)


def test_options_is_frozen_and_checked_once_at_construction():
    o = Options(num_bins=np.int64(7), softmax=np.bool_(True))
    assert o.num_bins == 7 and type(o.num_bins) is int and o.softmax is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.num_bins = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="num_bins"):
        Options(num_bins=2.5)
    with pytest.raises(ValueError, match="softmax=True and sigmoid=True"):
        o.replace(sigmoid=True)
    loss = MarginalL1ACELoss(to_onehot_y=True, softmax=True, num_bins=5)
    assert loss.options == Options(to_onehot_y=True, softmax=True, num_bins=5)
    assert loss.num_bins == 5


def test_top_label_refuses_include_background_false_instead_of_ignoring_it():
    x = torch.rand(1, 3, 4, 4)
    y = torch.randint(0, 3, (1, 4, 4))
    with pytest.raises(ValueError, match="include_background=False does not apply to mode='top_label'"):
        p = x / x.sum(1, keepdim=True)
        F.calibration_errors(p, y, to_onehot_y=True, mode="top_label", include_background=False)
    with pytest.raises(ValueError, match="include_background"):
        DatasetCalibration(3, to_onehot_y=True, mode="top_label", include_background=False)


def test_softmax_and_sigmoid_are_keywords_in_one_order_for_every_entry_point():
    x = torch.randn(2, 3, 6, 6)
    y = torch.randint(0, 3, (2, 6, 6))
    a = F.marginal_l1_ace(x, y, to_onehot_y=True, softmax=True)
    b = MarginalL1ACELoss(to_onehot_y=True, softmax=True)(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError):
        F.marginal_l1_ace(x, y, 20)  # v0.2 accepted num_bins positionally


@pytest.mark.parametrize("entry", ["volume_crps", "consensus_dice"])
def test_label_map_calls_take_to_onehot_y_and_ignore_index(entry):
    x = torch.rand(2, 3, 6, 6)
    x = x / x.sum(1, keepdim=True)
    t = torch.randint(0, 3, (2, 2, 6, 6))
    fn = getattr(F, entry)
    out = fn(x, t, to_onehot_y=True)
    assert out.shape == (2, 3)
    t2 = t.clone()
    t2[:, :, 0, 0] = 255
    out2 = fn(x, t2, to_onehot_y=True, ignore_index=255)
    assert out2.shape == (2, 3)


def test_consensus_dice_leaves_out_voxels_no_rater_labelled():
    # two classes; the prediction is class 1 everywhere. Voxels that every rater left unlabelled (255) must not
    # count as agreed background, so class 0's reference does not grow and class 1's prediction is not penalised.
    x = torch.zeros(1, 2, 1, 4)
    x[:, 1] = 1.0
    t = torch.tensor([[[[1, 1, 255, 255]], [[1, 1, 255, 255]]]])
    d = F.consensus_dice(x, t, to_onehot_y=True, ignore_index=255)
    assert d[0, 1].item() == pytest.approx(1.0)  # v0.2: 2*2/(4+2) = 0.667, the unlabelled voxels counted as errors
    assert torch.isnan(d[0, 0])


def test_single_channel_rule_is_the_same_in_every_entry_point():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    labels = torch.randint(0, 2, (2, 1, 8, 8))
    p = torch.sigmoid(logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = F.calibration_errors(p, labels.float())
        via_labels = F.calibration_errors(logits, labels, to_onehot_y=True, sigmoid=True)
        torch.testing.assert_close(via_labels.ece, dense.ece, rtol=1e-5, atol=1e-6)
        m = DatasetCalibration(1, to_onehot_y=True, sigmoid=True)
        m.update(logits, labels)
        torch.testing.assert_close(m.compute().macro.ece, dense.ece.mean(0).float(), rtol=1e-5, atol=1e-6)
        c = F.classification_calibration_errors(p[:, :, 0, 0], labels[:, 0, 0, 0], to_onehot_y=True)
        assert c.ece.shape == (1,)
        loss = F.marginal_l1_ace(logits, labels, to_onehot_y=True, sigmoid=True)
        ref = F.marginal_l1_ace(p, labels.float())
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        F.calibration_errors(p, labels * 2, to_onehot_y=True)


def test_single_channel_warnings_come_once_each():
    x = torch.rand(1, 1, 4, 4)
    y = torch.randint(0, 2, (1, 1, 4, 4))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        MarginalL1ACELoss(include_background=False, to_onehot_y=True, softmax=True)(x, y)
    msgs = sorted(str(m.message) for m in w)
    assert msgs == [
        "single channel prediction, `include_background=False` ignored.",
        "single channel prediction, `softmax=True` ignored.",
        "single channel prediction, `to_onehot_y=True` ignored.",
    ]


def test_float64_runs_in_float64_with_auto():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (1, 4, 4))
    assert calibops.backend_for(x) == "reference"
    out = F.marginal_l1_ace(x, y, to_onehot_y=True, softmax=True)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: F.marginal_l1_ace(z, y, to_onehot_y=True, softmax=True), (x,))


@pytest.mark.parametrize(
    "where",
    [
        "calibops.losses:HardL1ACELoss",
        "calibops.losses:SoftL1ACELoss",
        "calibops.integrations.torchmetrics:DatasetCalibrationMetric",
        "calibops.integrations.monai:CalibrationErrorMetric",
        "calibops.integrations.monai:CalibrationError",
    ],
)
def test_drop_in_signatures_use_the_one_default_too(where):
    # the MONAI-signature losses and the adapters list their options again (their own positional orders)
    module, name = where.split(":")
    package = {"torchmetrics": "torchmetrics", "monai": "monai"}.get(module.rsplit(".", 1)[-1])
    if package is not None:
        pytest.importorskip(package)
    if name == "CalibrationError":
        pytest.importorskip("ignite")
    cls = getattr(importlib.import_module(module), name)
    found = _defaults(cls)
    assert len(found) >= 5, f"{name} lists {sorted(found)}"
    wrong = {n: (v, DEFAULTS[n]) for n, v in found.items() if v != DEFAULTS[n]}
    assert not wrong, f"{name}: defaults differ from Options: {wrong}"


def test_options_from_memoises_plain_values_only():
    from calibops.options import options_from

    a = options_from({"num_bins": 9, "softmax": True, "input": object()})
    assert options_from({"num_bins": 9, "softmax": True}) is a  # the same plain values: checked once
    with pytest.raises(TypeError, match="num_bins"):
        options_from({"num_bins": True})  # a bool is no bin count, even though True == 1 ...
    assert options_from({"num_bins": 1}).num_bins == 1  # ... and 1 is not served the bool's failure
    t = torch.tensor(10)  # a value a caller can change in place is never served from the memo
    assert options_from({"num_bins": t}).num_bins == 10
    t.fill_(12)
    assert options_from({"num_bins": t}).num_bins == 12
