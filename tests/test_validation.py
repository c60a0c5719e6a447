"""Every bad input raises a clear ValueError/TypeError naming the argument (SPEC §3), on every backend."""

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
    F.marginal_l1_ace(_probs(), _labels(), to_onehot_y=True, include_background=False, weight=[1.0, 2.0],
                      backend=backend)
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
