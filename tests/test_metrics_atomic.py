"""Atomic updates: a batch that raises leaves every accumulator bit-identical, and its checkpoint still loads.

For every failure that can be provoked (bad spacing with raters, float rater maps, a bad item in the third place
of a MONAI list, NaN with ``nonfinite="raise"``, a group not declared, a wrong number of classes, labels out of
range, ...) the state before and after is compared entry by entry with ``torch.equal`` (every state-dict tensor,
the records, the image count), and a checkpoint written afterwards is saved, reloaded into a fresh accumulator
and compared again. Where v0.2 was not atomic (sums added before the spacing, the consensus Dice or a later list
item raised) these tests fail on it: e.g. v0.2 added a multi-rater batch's sums before a bad ``spacing`` raised
(image count 4 -> 6, no records), and that checkpoint then failed to load.
"""

from __future__ import annotations

import copy
import io
import re
import warnings

import pytest
import torch

from calibops import DatasetCalibration
from calibops.metrics import MetricConfig, contribution

C, R = 4, 3
GROUPS = ("a", "b")
RICH = {  # every optional sum at once: groups, fine bins, Brier moments, records
    "to_onehot_y": True,
    "softmax": True,
    "ignore_index": 255,
    "keep_records": True,
    "groups": GROUPS,
    "adaptive_bins": 4,
    "fine_bins": 40,
    "brier": True,
}


def _images(seed: int, B: int = 2, raters: int = 0, size=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(B, C, *size, generator=g)
    shape = (B, raters, *size) if raters else (B, *size)
    y = torch.randint(0, C, shape, generator=g)
    return x, y


def _canon(records):
    """Records with NaN written as a string, so that equal records compare equal (NaN != NaN)."""
    if records is None:
        return None
    return [{k: "nan" if isinstance(v, float) and v != v else v for k, v in r.items()} for r in records]


def _snapshot(m: DatasetCalibration) -> dict:
    sd = m.state_dict()
    return {
        "tensors": {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)},
        "records": _canon(copy.deepcopy(sd.get("records"))),
        "num_images": int(sd["num_images"]),
    }


def _assert_same(before: dict, m: DatasetCalibration, build) -> None:
    """Bit-identical state, and a checkpoint saved now loads into a fresh accumulator holding the same state."""
    for snap in (_snapshot(m), _reloaded(m, build)):
        assert snap["num_images"] == before["num_images"]
        assert snap["tensors"].keys() == before["tensors"].keys()
        for k, v in before["tensors"].items():
            assert snap["tensors"][k].dtype == v.dtype and torch.equal(snap["tensors"][k], v), k
        assert snap["records"] == before["records"]


def _reloaded(m: DatasetCalibration, build) -> dict:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = build()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return _snapshot(fresh)


# ------------------------------------------------------------------------------------------ segmentation
def _raters_metric():
    return DatasetCalibration(C, multi_rater=True, **RICH)


def _fed_raters():
    m = _raters_metric()
    for seed in (0, 1):
        x, t = _images(seed, raters=R)
        m.update(x, t, groups=["a", "b"], spacing=(0.5, 2.0))
    return m


@pytest.mark.parametrize("spacing", [(1.0,), (1.0, -2.0), (1.0, float("nan")), "fine", torch.ones(3, 2)])
def test_bad_spacing_with_raters_adds_nothing(spacing):
    m = _fed_raters()
    before = _snapshot(m)
    assert before["num_images"] == 4
    x, t = _images(2, raters=R)
    with pytest.raises((ValueError, TypeError), match="spacing"):
        m.update(x, t, groups=["a", "a"], spacing=spacing)
    _assert_same(before, m, _raters_metric)  # v0.2: image count 4 -> 6, no records, and the checkpoint failed
    m.update(x, t, groups=["a", "a"], spacing=(0.5, 2.0))  # the run goes on
    assert int(m.state_dict()["num_images"]) == 6 and len(m.records()) == 6 * C


def test_float_rater_maps_count_like_integer_ones_and_non_integer_ones_add_nothing():
    m = _fed_raters()
    ints = _fed_raters()
    x, t = _images(3, raters=R)
    ints.update(x, t, groups=["b", "a"])
    m.update(x, t.float(), groups=["b", "a"])  # v0.2: sums added, then the consensus Dice raised a TypeError
    after, want = _snapshot(m), _snapshot(ints)
    for k, v in want["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    assert after["records"] == want["records"]
    bad = t.float()
    bad[1, 2, 0, 0] = 1.5
    with pytest.raises(ValueError, match="non-integer"):
        m.update(x, bad, groups=["b", "a"])
    _assert_same(after, m, _raters_metric)


def _plain_metric(**extra):
    return DatasetCalibration(C, **RICH, **extra)


def _fed_plain(**extra):
    m = _plain_metric(**extra)
    for seed in (0, 1):
        m.update(*_images(seed), groups=["a", "b"])
    return m


def _bad_batches():
    """(name, input, target, groups, error type, message) of one failing batch each."""
    x, y = _images(5)
    nan = x.clone()
    nan[1, 2, 3, 4] = float("nan")
    out_of_range = y.clone()
    out_of_range[0, 1, 1] = C  # neither a class nor ignore_index
    return [
        ("nan", nan, y, ["a", "b"], ValueError, "non-finite"),
        ("undeclared group", x, y, ["a", "zz"], ValueError, "not in this metric's groups"),
        ("no groups", x, y, None, ValueError, "groups"),
        ("one group name short", x, y, ["a"], ValueError, "one group name per image"),
        ("wrong num_classes", x[:, :3], y, ["a", "b"], ValueError, r"\(B, 4, \*spatial\)"),
        ("labels out of range", x, out_of_range, ["a", "b"], ValueError, "outside"),
        ("target shape", x, y[:, :4], ["a", "b"], ValueError, "target"),
        ("target batch", x, y[:1], ["a", "b"], ValueError, "batch size"),
        ("image ids", x, y, ["a", "b"], ValueError, "image_ids"),
    ]


@pytest.mark.parametrize("case", _bad_batches(), ids=lambda c: c[0])
def test_a_failing_batch_leaves_the_state_bit_identical(case):
    name, x, y, groups, exc, match = case
    m = _fed_plain()
    before = _snapshot(m)
    ids = ["only one"] if name == "image ids" else None
    with pytest.raises(exc, match=match):
        m.update(x, y, image_ids=ids, groups=groups)
    _assert_same(before, m, _plain_metric)


def test_a_skipped_nonfinite_batch_that_then_fails_warns_nothing_and_adds_nothing():
    build = lambda: DatasetCalibration(C, multi_rater=True, nonfinite="skip", **RICH)  # noqa: E731
    m = build()
    m.update(*_images(0, raters=R), groups=["a", "b"])
    before = _snapshot(m)
    x, t = _images(1, raters=R)
    x[0, 1, 2, 2] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # v0.2 warned "left out ... non-finite", added the sums, then raised
        with pytest.raises(ValueError, match="spacing"):
            m.update(x, t, groups=["a", "b"], spacing=(1.0, 0.0))
    _assert_same(before, m, build)
    with pytest.warns(RuntimeWarning, match="non-finite"):  # committed: the warning comes with the sums
        m.update(x, t, groups=["a", "b"])
    assert m.compute().nonfinite == C  # a NaN logit: every probability of its voxel


def test_contribution_is_pure_and_update_commits_exactly_it():
    m = _fed_plain()
    before = _snapshot(m)
    x, y = _images(7)
    part = contribution(m.config, x, y, None, ["b", "b"], seen=m.state_tensors()["num_images"])
    _assert_same(before, m, _plain_metric)  # computing a contribution changes nothing
    assert part.sums.keys() == m.state_tensors().keys()  # every entry, the full shapes
    for k, v in part.sums.items():
        assert v.shape == m.state_tensors()[k].shape, k
    assert [r["image"] for r in part.records[::C]] == [4, 5]  # the running index continues
    m.update(x, y, groups=["b", "b"])
    after = _snapshot(m)
    for k, v in part.sums.items():
        assert torch.equal(after["tensors"][k], before["tensors"][k] + v.to(before["tensors"][k].dtype)), k
    assert after["records"] == before["records"] + _canon(part.records)


# ------------------------------------------------------------------------------------------ classification
def _class_metric():
    return DatasetCalibration(
        3, to_onehot_y=True, softmax=True, classification=True, groups=GROUPS, adaptive_bins=4, fine_bins=40, brier=True
    )


@pytest.mark.parametrize(
    "case",
    ["nan", "undeclared group", "wrong num_classes", "one-hot without to_onehot_y", "labels out of range"],
)
def test_a_failing_classification_batch_leaves_the_state_bit_identical(case):
    g = torch.Generator().manual_seed(11)
    m = _class_metric()
    m.update(torch.randn(9, 3, generator=g), torch.randint(0, 3, (9,), generator=g), groups=["a"] * 4 + ["b"] * 5)
    before = _snapshot(m)
    x, y, groups = torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g), ["b"] * 6
    if case == "nan":
        x[4, 0] = float("nan")
    elif case == "undeclared group":
        groups = ["b"] * 5 + ["c"]
    elif case == "wrong num_classes":
        x = torch.randn(6, 4, generator=g)
    elif case == "one-hot without to_onehot_y":
        y = torch.nn.functional.one_hot(y, 3).float()
    else:
        y[2] = 3
    with pytest.raises(ValueError):
        m.update(x, y, groups=groups)
    _assert_same(before, m, _class_metric)


def test_classification_contribution_is_pure_and_update_commits_exactly_it():
    g = torch.Generator().manual_seed(12)
    m = _class_metric()
    m.update(torch.randn(9, 3, generator=g), torch.randint(0, 3, (9,), generator=g), groups=["a"] * 4 + ["b"] * 5)
    before = _snapshot(m)
    x, y, groups = torch.randn(7, 3, generator=g), torch.randint(0, 3, (7,), generator=g), ["a", "b"] * 3 + ["b"]
    part = contribution(m.config, x, y, None, groups)
    _assert_same(before, m, _class_metric)
    assert part.sums.keys() == m.state_tensors().keys() and part.records == [] and part.errors is None
    assert int(part.sums["num_images"]) == 7 and part.sums["group_images"].tolist() == [3, 4]
    m.update(x, y, groups=groups)
    after = _snapshot(m)
    for k, v in part.sums.items():
        assert torch.equal(after["tensors"][k], before["tensors"][k] + v.to(before["tensors"][k].dtype)), k


# ------------------------------------------------------------------------------------------ MONAI
def _monai_items(n: int = 4, seed: int = 20):
    g = torch.Generator().manual_seed(seed)
    preds = [2 * torch.randn(C, 5, 4, generator=g) for _ in range(n)]
    labels = [torch.randint(0, C, (1, 5, 4), generator=g) for _ in range(n)]
    return preds, labels


def _monai_dataset_build():
    def build():
        return DatasetCalibration.from_config(
            MetricConfig.build(
                C, num_bins=10, include_background=True, to_onehot_y=True, softmax=True, keep_records=True
            )
        )

    return build


@pytest.mark.parametrize("bad", ["shape", "nan", "labels out of range", "num_classes", "not a tensor"])
def test_monai_list_with_a_bad_third_item_changes_neither_dataset_nor_buffer(bad):
    mm = pytest.importorskip("calibops.integrations.monai")
    metric = mm.CalibrationErrorMetric(num_bins=10, to_onehot_y=True, softmax=True)
    preds, labels = _monai_items()
    metric(preds[:2], labels[:2])
    before, buf = _snapshot(metric.dataset), metric.get_buffer().clone()
    preds, labels = _monai_items(seed=21)
    if bad == "shape":
        labels[2] = labels[2][:, :4]
    elif bad == "nan":
        preds[2][1, 0, 0] = float("nan")
    elif bad == "labels out of range":
        labels[2][0, 0, 0] = C + 3
    elif bad == "num_classes":
        preds[2] = preds[2][:3]
    else:
        labels[2] = labels[2].numpy()
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type and message are checked below, after the state
        metric(preds, labels)
    # v0.2: items 0 and 1 were already in metric.dataset (image count 2 -> 4) but not in the buffer
    _assert_same(before, metric.dataset, _monai_dataset_build())
    assert torch.equal(metric.get_buffer(), buf)
    assert metric.get_buffer().shape[0] == int(metric.dataset.state_dict()["num_images"])
    assert isinstance(info.value, (ValueError, TypeError)) and re.search(r"item 2|\[2\]", str(info.value))


def test_monai_list_commits_every_item_like_one_batch():
    mm = pytest.importorskip("calibops.integrations.monai")
    preds, labels = _monai_items()
    as_list = mm.CalibrationErrorMetric(num_bins=10, to_onehot_y=True, softmax=True)
    as_batch = mm.CalibrationErrorMetric(num_bins=10, to_onehot_y=True, softmax=True)
    got = as_list(preds, labels)
    want = as_batch(torch.stack(preds), torch.stack(labels))
    assert torch.equal(got, want)
    a, b = _snapshot(as_list.dataset), _snapshot(as_batch.dataset)
    assert a["records"] == b["records"] and a["num_images"] == b["num_images"] == 4
    for k, v in b["tensors"].items():
        torch.testing.assert_close(a["tensors"][k], v, rtol=1e-12, atol=0)


def test_monai_first_list_with_items_of_different_classes_is_refused_whole():
    mm = pytest.importorskip("calibops.integrations.monai")
    metric = mm.CalibrationErrorMetric(num_bins=10, to_onehot_y=True, softmax=True)
    preds, labels = _monai_items()
    preds[1] = preds[1][:3]  # the first item fixes C = 4, also in the first call
    with pytest.raises(ValueError, match=r"item 1 .*\(B, 4, \*spatial\)"):
        metric(preds, labels)
    assert metric.dataset is None and metric.get_buffer() is None


def test_monai_first_call_that_fails_creates_no_dataset():
    mm = pytest.importorskip("calibops.integrations.monai")
    metric = mm.CalibrationErrorMetric(num_bins=10, to_onehot_y=True, softmax=True)
    preds, labels = _monai_items()
    labels[2] = labels[2] + C
    with pytest.raises(ValueError) as info:
        metric(preds, labels)
    assert metric.dataset is None and metric.get_buffer() is None  # v0.2: items 0 and 1 in metric.dataset
    assert "item 2" in str(info.value)
    metric(preds[:1], labels[:1])  # C is fixed by the first call that commits
    assert int(metric.dataset.state_dict()["num_images"]) == 1


# ------------------------------------------------------------------------------------------ torchmetrics
def test_torchmetrics_failing_update_leaves_every_state_bit_identical():
    tm = pytest.importorskip("calibops.integrations.torchmetrics")
    m = tm.DatasetCalibrationMetric(C, num_bins=8, to_onehot_y=True, softmax=True)
    m.update(*_images(0))
    names = sorted(m._defaults)
    before = {k: getattr(m, k).clone() for k in names}
    x, y = _images(1)
    y[1, 0, 0] = C
    with pytest.raises(ValueError, match="outside"):
        m.update(x, y)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        m.update(x, _images(1)[1])
    for k in names:
        assert torch.equal(getattr(m, k), before[k]), k
    ref = DatasetCalibration(C, num_bins=8, to_onehot_y=True, softmax=True)
    ref.update(*_images(0))
    for k, v in ref.state_tensors().items():
        assert torch.equal(getattr(m, k), v), k
