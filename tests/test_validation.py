"""Every bad input raises a clear ValueError/TypeError naming the argument (docs/usage.md "Validation"), on every
backend."""

from __future__ import annotations

import pytest
import torch

import calibops
from calibops import MarginalL1ACELoss
from calibops import functional as F


def _backends_here():
    names = ["reference"]
    avail = calibops.available_backends()
    x = torch.zeros(1)
    for name in ("cpu", "triton"):
        if avail[name] is None:
            try:
                calibops.backend_for(x, name)
                names.append(name)
            except RuntimeError:
                pass
    return names


BACKENDS = _backends_here()


def _probs(shape=(2, 3, 4, 5)):
    x = torch.rand(shape)
    return x / x.sum(1, keepdim=True)


def _labels(shape=(2, 4, 5), c=3):
    return torch.randint(0, c, shape)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_input_not_a_tensor(backend):
    with pytest.raises(TypeError, match="input"):
        F.marginal_l1_ace([[0.5]], _labels(), backend=backend)


def test_target_not_a_tensor(backend):
    with pytest.raises(TypeError, match="target"):
        F.marginal_l1_ace(_probs(), [[0]], backend=backend)


def test_integer_input(backend):
    with pytest.raises(TypeError, match="input must be floating point"):
        F.marginal_l1_ace(torch.ones(2, 3, 4, 5, dtype=torch.long), _labels(), to_onehot_y=True, backend=backend)


def test_input_too_few_dims(backend):
    with pytest.raises(ValueError, match=r"input must have shape \(B, C, \*spatial\)"):
        F.marginal_l1_ace(torch.rand(5), torch.zeros(5), backend=backend)


def test_batch_mismatch(backend):
    with pytest.raises(ValueError, match="batch size"):
        F.marginal_l1_ace(_probs(), _labels((3, 4, 5)), to_onehot_y=True, backend=backend)


def test_label_shape_mismatch(backend):
    with pytest.raises(ValueError, match="target must be a label map"):
        F.marginal_l1_ace(_probs(), _labels((2, 4, 6)), to_onehot_y=True, backend=backend)


def test_dense_shape_mismatch(backend):
    with pytest.raises(ValueError, match="target must have the shape of input"):
        F.marginal_l1_ace(_probs(), torch.zeros(2, 2, 4, 5), backend=backend)
    with pytest.raises(ValueError, match="to_onehot_y=True"):
        F.marginal_l1_ace(_probs(), _labels(), backend=backend)


@pytest.mark.parametrize("bad", [3, -1, 7])
def test_labels_out_of_range(backend, bad):
    y = _labels()
    y[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        F.marginal_l1_ace(_probs(), y, to_onehot_y=True, backend=backend)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        F.binned_stats(_probs(), y, to_onehot_y=True, backend=backend)


def test_ignore_index_is_allowed_and_others_are_not(backend):
    y = _labels()
    y[0, 0, 0] = 255
    F.marginal_l1_ace(_probs(), y, to_onehot_y=True, ignore_index=255, backend=backend)
    y[0, 0, 1] = 254
    with pytest.raises(ValueError, match="ignore_index=255"):
        F.marginal_l1_ace(_probs(), y, to_onehot_y=True, ignore_index=255, backend=backend)


def test_validate_false_skips_value_checks_but_stays_in_bounds(backend):
    y = _labels()
    y[1, 2, 3] = 1000
    out = F.marginal_l1_ace(_probs(), y, to_onehot_y=True, validate=False, backend=backend)
    assert torch.isfinite(out)
    # the out-of-range voxel is left out of the statistics, as if ignored
    s = F.binned_stats(_probs(), y, to_onehot_y=True, validate=False, backend=backend)
    assert s.count[1].sum().item() == 3 * (4 * 5 - 1)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), float("inf")])
def test_probabilities_out_of_range(backend, value):
    x = _probs()
    x[0, 1, 2, 3] = value
    with pytest.raises(ValueError, match="input"):
        F.marginal_l1_ace(x, _labels(), to_onehot_y=True, backend=backend)
    # as logits the same tensor is fine (finite values)
    if value == value and abs(value) != float("inf"):
        F.marginal_l1_ace(x, _labels(), to_onehot_y=True, softmax=True, backend=backend)


@pytest.mark.parametrize("value", [1.5, -0.5])
def test_dense_target_out_of_range(backend, value):
    y = torch.zeros(2, 3, 4, 5)
    y[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
        F.marginal_l1_ace(_probs(), y, backend=backend)


def test_float_labels_must_be_integral(backend):
    y = _labels().float()
    F.marginal_l1_ace(_probs(), y, to_onehot_y=True, backend=backend)
    y[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="non-integer label"):
        F.marginal_l1_ace(_probs(), y, to_onehot_y=True, backend=backend)


@pytest.mark.parametrize("num_bins,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_num_bins(num_bins, exc):
    with pytest.raises(exc, match="num_bins"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, num_bins=num_bins)
    with pytest.raises(exc, match="num_bins"):
        MarginalL1ACELoss(num_bins=num_bins)


def test_unknown_options():
    with pytest.raises(ValueError, match="binning"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, binning="fuzzy")
    with pytest.raises(ValueError, match="reduction"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, reduction="avg")
    with pytest.raises(ValueError, match="binning"):
        MarginalL1ACELoss(binning="fuzzy")
    with pytest.raises(ValueError, match="reduction"):
        MarginalL1ACELoss(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        MarginalL1ACELoss(backend="tpu")
    with pytest.raises(ValueError, match="backend"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, backend="tpu")
    with pytest.raises(ValueError, match="empty_weight"):
        MarginalL1ACELoss(empty_weight=-1.0)
    with pytest.raises(TypeError, match="ignore_index"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, ignore_index=1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        F.marginal_l1_ace(_probs(), torch.zeros(2, 3, 4, 5), ignore_index=0)


def test_softmax_and_sigmoid_together():
    with pytest.raises(ValueError, match="softmax=True and sigmoid=True"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, softmax=True, sigmoid=True)
    with pytest.raises(ValueError, match="softmax=True and sigmoid=True"):
        MarginalL1ACELoss(softmax=True, sigmoid=True)


def test_weight_length(backend):
    with pytest.raises(ValueError, match="weight"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, weight=[1.0, 2.0], backend=backend)
    # after dropping the background, 2 classes are used
    F.marginal_l1_ace(
        _probs(), _labels(), to_onehot_y=True, include_background=False, weight=[1.0, 2.0], backend=backend
    )
    with pytest.raises(ValueError, match="weight"):
        MarginalL1ACELoss(to_onehot_y=True, weight=[1.0, 2.0])(_probs(), _labels())


def test_device_mismatch_message():
    x = _probs()
    y = torch.empty(2, 4, 5, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="device"):
        F.marginal_l1_ace(x, y, to_onehot_y=True)


def test_explicit_unavailable_backend_raises_with_reason():
    avail = calibops.available_backends()
    x = _probs()
    for name in ("cuda",):
        if avail[name] is not None or not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match=f"calibops backend '{name}' is not available"):
                F.marginal_l1_ace(x, _labels(), to_onehot_y=True, backend=name)


def test_validation_cost_switch(monkeypatch):
    # CALIBOPS_VALIDATE=0 skips the value checks like validate=False
    x = _probs()
    x[0, 0, 0, 0] = 2.0
    monkeypatch.setenv("CALIBOPS_VALIDATE", "0")
    F.marginal_l1_ace(x, _labels(), to_onehot_y=True)
    monkeypatch.setenv("CALIBOPS_VALIDATE", "1")
    with pytest.raises(ValueError):
        F.marginal_l1_ace(x, _labels(), to_onehot_y=True)


# ------------------------------------------------------------------ issue 13, item 5: the gaps, one test each
@pytest.mark.parametrize("value", [2**64, 2**63, -(2**63) - 1])
def test_ignore_index_outside_int64(value):
    with pytest.raises(ValueError, match="ignore_index"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index"):
        MarginalL1ACELoss(to_onehot_y=True, ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index"):
        calibops.DatasetCalibration(3, to_onehot_y=True, ignore_index=value)


@pytest.mark.parametrize(
    ("dtype", "value"),
    [(torch.uint8, 256), (torch.uint8, -1), (torch.int8, 200), (torch.int16, 2**15), (torch.bool, 2)],
)
def test_ignore_index_outside_the_label_dtype(backend, dtype, value):
    # a value the labels cannot hold never matches (and must not wrap around in a kernel): an error, always
    y = _labels().to(dtype) if dtype != torch.bool else _labels() > 0
    for validate in (True, False):
        with pytest.raises(ValueError, match=f"ignore_index={value}"):
            F.binned_stats(_probs(), y, to_onehot_y=True, ignore_index=value, validate=validate, backend=backend)
    lo = 0 if dtype in (torch.uint8, torch.bool) else torch.iinfo(dtype).min
    F.binned_stats(_probs(), y, to_onehot_y=True, ignore_index=lo, backend=backend)  # the dtype's own range is fine


@pytest.mark.parametrize(
    "weight", ["abc", b"ab", ["a", "b", "c"], {"a": 1}, object(), torch.tensor([True, False, True])]
)
def test_weight_of_the_wrong_type(weight):
    with pytest.raises(TypeError, match="weight"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, weight=weight)
    with pytest.raises(TypeError, match="weight"):
        MarginalL1ACELoss(to_onehot_y=True, weight=weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("kind", ["list", "numpy", "tensor"])
def test_weight_values(backend, bad, kind):
    import numpy as np

    w = [1.0, bad, 2.0]
    weight = {"list": w, "numpy": np.array(w), "tensor": torch.tensor(w)}[kind]
    with pytest.raises(ValueError, match="weight"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, weight=weight, backend=backend)
    with pytest.raises(ValueError, match="weight"):
        MarginalL1ACELoss(to_onehot_y=True, weight=weight)


def test_weight_tensor_values_share_the_one_synchronisation(backend):
    # a weight tensor's values are read back together with the kernel's counts: validate=False skips them
    w = torch.tensor([1.0, -1.0, 1.0])
    F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, weight=w, validate=False, backend=backend)
    with pytest.raises(ValueError, match="weight"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, weight=w, backend=backend)


def test_numpy_and_0d_tensor_scalars_are_numbers(backend):
    import numpy as np

    x, y = _probs(), _labels()
    y[0, 0, 0] = 7
    kw = {"to_onehot_y": True, "binning": "soft", "backend": backend}
    base = F.marginal_l1_ace(x, y, num_bins=12, empty_weight=0.25, ignore_index=7, **kw)
    # 0.25 is exact in float32 too, so every spelling must give the bitwise same loss
    for nb, ew, ii in [
        (np.int64(12), np.float64(0.25), np.int32(7)),
        (torch.tensor(12), torch.tensor(0.25), torch.tensor(7)),
        (np.uint8(12), np.float32(0.25), np.int8(7)),
        (12, np.int64(0), 7),
    ]:
        got = F.marginal_l1_ace(x, y, num_bins=nb, empty_weight=ew, ignore_index=ii, **kw)
        if float(ew) == 0.25:
            assert torch.equal(got, base)
        m = MarginalL1ACELoss(num_bins=nb, empty_weight=ew, ignore_index=ii, to_onehot_y=True, binning="soft")
        assert type(m.num_bins) is int and type(m.empty_weight) is float and type(m.ignore_index) is int
    m = MarginalL1ACELoss(empty_weight=torch.tensor(0.1))  # the example
    assert m.empty_weight == pytest.approx(0.1)
    d = calibops.DatasetCalibration(np.int64(3), num_bins=np.int16(8), to_onehot_y=True, ignore_index=np.int64(7))
    assert (d.num_classes, d.num_bins, d.ignore_index) == (3, 8, 7)
    assert type(d.num_classes) is int and type(d.num_bins) is int


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_bins", True),
        ("num_bins", torch.tensor(True)),
        ("num_bins", torch.tensor(20.0)),
        ("num_bins", torch.tensor([20])),
        ("num_bins", "20"),
        ("empty_weight", True),
        ("empty_weight", "0.1"),
        ("empty_weight", torch.tensor([0.1])),
        ("ignore_index", True),
        ("ignore_index", 255.0),
    ],
)
def test_bools_and_other_non_numbers_are_rejected(name, value):
    with pytest.raises(TypeError, match=name):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, **{name: value})
    with pytest.raises(TypeError, match=name):
        MarginalL1ACELoss(to_onehot_y=True, **{name: value})


FLAGS = ["include_background", "to_onehot_y", "softmax", "sigmoid", "ignore_empty_classes", "right", "validate"]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", ["yes", 1, None, 0.0, torch.tensor(True)])
def test_bool_options_must_be_bools(flag, value):
    with pytest.raises(TypeError, match=flag):
        F.marginal_l1_ace(_probs(), _labels(), **{flag: value})
    with pytest.raises(TypeError, match=flag):
        MarginalL1ACELoss(**{flag: value})
    if flag != "ignore_empty_classes":
        with pytest.raises(TypeError, match=flag):
            F.binned_stats(_probs(), _labels(), **{flag: value})
        with pytest.raises(TypeError, match=flag):
            calibops.DatasetCalibration(3, **{flag: value})
    if flag not in ("ignore_empty_classes",):
        with pytest.raises(TypeError, match=flag):
            F.calibration_errors(_probs(), _labels(), **{flag: value})


def test_numpy_bools_are_bools():
    import numpy as np

    a = F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=np.bool_(True), right=np.bool_(False))
    m = MarginalL1ACELoss(to_onehot_y=np.bool_(True))
    assert m.to_onehot_y is True and torch.isfinite(a)


def test_string_options_of_the_wrong_type():
    with pytest.raises(TypeError, match="binning"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, binning=1)
    with pytest.raises(TypeError, match="reduction"):
        MarginalL1ACELoss(reduction=None)
    with pytest.raises(TypeError, match="backend"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, backend=0)


def test_num_bins_cap():
    from calibops.options import MAX_BINS, check_options

    assert MAX_BINS == 2**24 and check_options(num_bins=2**24).num_bins == 2**24
    with pytest.raises(ValueError, match="num_bins"):
        F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, num_bins=2**24 + 1)
    with pytest.raises(ValueError, match="num_bins"):
        MarginalL1ACELoss(num_bins=2**24 + 1)
    with pytest.raises(ValueError, match="num_bins"):
        calibops.DatasetCalibration(3, num_bins=2**40)


def test_dataset_calibration_rejects_an_unknown_backend_at_construction():
    with pytest.raises(ValueError, match="backend"):
        calibops.DatasetCalibration(3, backend="bogus")
    with pytest.raises(TypeError, match="backend"):
        calibops.DatasetCalibration(3, backend=None)


@pytest.mark.parametrize("to_onehot_y", [True, False])
@pytest.mark.parametrize("act", [{}, {"softmax": True}, {"sigmoid": True}])
def test_meta_tensors_with_validation_on(to_onehot_y, act):
    # meta tensors hold no values: the value checks are skipped (as while compiling), shapes still flow
    x = torch.empty(2, 3, 4, 5, device="meta")
    y = torch.empty(2, 4, 5, dtype=torch.long, device="meta") if to_onehot_y else torch.empty_like(x)
    w = torch.empty(3, device="meta")
    loss = F.marginal_l1_ace(x, y, to_onehot_y=to_onehot_y, weight=w, reduction="none", validate=True, **act)
    assert loss.device.type == "meta" and loss.shape == (2, 3)
    s = F.binned_stats(x, y, to_onehot_y=to_onehot_y, num_bins=7, **act)
    assert s.count.shape == (2, 3, 7)
    e = F.calibration_errors(x, y, to_onehot_y=to_onehot_y, **act)
    assert e.ece.shape == (2, 3)


@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_empty_batch_mean_is_zero_like_sum(backend, binning):
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    y = torch.zeros(0, 4, 5, dtype=torch.long)
    for reduction in ("mean", "sum"):
        loss = F.marginal_l1_ace(
            x, y, to_onehot_y=True, softmax=True, binning=binning, reduction=reduction, backend=backend
        )
        assert loss.item() == 0.0, reduction
        (g,) = torch.autograd.grad(loss, x)
        assert g.shape == x.shape
    assert F.marginal_l1_ace(x, y, to_onehot_y=True, softmax=True, reduction="none", backend=backend).shape == (0, 3)


# ------------------------------------------------- non-finite probabilities: decision 1, checked here (decision 2)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_non_finite_logits_raise_naming_input(backend, value, act):
    x = torch.randn(2, 3, 4, 5)
    x[1, 2, 3, 4] = value
    if act == "sigmoid" and value == float("inf"):
        # sigmoid(+inf) = 1 is a probability: accepted
        F.marginal_l1_ace(x, _labels(), to_onehot_y=True, sigmoid=True, backend=backend)
        return
    n = 3 if act == "softmax" else 1  # softmax: every entry of the voxel is NaN
    with pytest.raises(ValueError, match=rf"input holds {n} non-finite probability value\(s\) after {act}"):
        F.marginal_l1_ace(x, _labels(), to_onehot_y=True, backend=backend, **{act: True})
    with pytest.raises(ValueError, match="input holds"):
        F.binned_stats(x, torch.zeros(2, 3, 4, 5), backend=backend, **{act: True})  # dense targets too
    # validate=False: left out of every statistic, never NaN
    s = F.binned_stats(x, _labels(), to_onehot_y=True, validate=False, backend=backend, **{act: True})
    assert all(bool(torch.isfinite(t).all()) for t in s)
    assert s.count[1].sum().item() == 3 * 20 - n
    loss = F.marginal_l1_ace(x, _labels(), to_onehot_y=True, validate=False, backend=backend, **{act: True})
    assert torch.isfinite(loss)


def test_one_minus_inf_logit_is_fine_all_minus_inf_is_not(backend):
    x = torch.randn(2, 3, 4, 5)
    x[0, 1, 0, 0] = float("-inf")  # p = 0 for class 1 of that voxel, the others finite
    F.marginal_l1_ace(x, _labels(), to_onehot_y=True, softmax=True, backend=backend)
    x[0, :, 0, 0] = float("-inf")  # all -inf: softmax is 0/0
    with pytest.raises(ValueError, match="input holds 3 non-finite"):
        F.marginal_l1_ace(x, _labels(), to_onehot_y=True, softmax=True, backend=backend)


def test_non_finite_entries_of_ignored_voxels_are_not_counted(backend):
    x = torch.randn(2, 3, 4, 5)
    y = _labels()
    x[0, :, 1, 1] = float("nan")
    y[0, 1, 1] = 255
    F.marginal_l1_ace(x, y, to_onehot_y=True, softmax=True, ignore_index=255, backend=backend)
