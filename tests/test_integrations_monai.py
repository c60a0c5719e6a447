"""The MONAI drop-ins against the real MONAI package.

- ``CalibrationErrorMetric``: the same per-image values and aggregates as ``monai.metrics.CalibrationErrorMetric``
  for every calibration reduction, metric reduction, ``include_background`` and ``right`` (one-hot targets and
  probabilities, where the definitions coincide), on batch tensors and on decollated lists of different sizes;
  label maps / logits / ignore_index give the numbers of one-hot probabilities with the voxels removed.
- ``CalibrationError`` handler: a ``SupervisedEvaluator`` run on a tiny network, metrics and files per epoch.
- ``DiceCEL1ACELoss``: equal to MONAI's DiceCELoss plus the weighted calibration term, and a training step.

Tolerance: both sides bin identically (same edges, same bucketize rule); the per-bin sums are float32 in MONAI
and float32 per image (float64 when pooled) here, so values agree to a few float32 roundings: atol 1e-6.
"""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch

monai = pytest.importorskip("monai")
pytest.importorskip("ignite")

from monai.metrics import CalibrationErrorMetric as MonaiCalibration  # noqa: E402

from calibops import DatasetCalibration  # noqa: E402
from calibops.functional import marginal_l1_ace  # noqa: E402
from calibops.integrations.monai import CalibrationError, CalibrationErrorMetric, DiceCEL1ACELoss  # noqa: E402

ATOL = 1e-6


def _batch(seed, B=3, C=4, size=(10, 12)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, *size, generator=g) * 2
    labels = torch.randint(0, C, (B, 1, *size), generator=g)
    onehot = torch.nn.functional.one_hot(labels[:, 0], C).movedim(-1, 1).float()
    return logits, torch.softmax(logits, 1), labels, onehot


@pytest.mark.parametrize("reduction", ["expected", "average", "maximum"])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("right", [False, True])
def test_same_numbers_as_monai(reduction, include_background, right):
    ours = CalibrationErrorMetric(
        num_bins=15, include_background=include_background, calibration_reduction=reduction, right=right
    )
    ref = MonaiCalibration(
        num_bins=15, include_background=include_background, calibration_reduction=reduction, right=right
    )
    for seed in range(2):
        _, p, _, oh = _batch(seed)
        torch.testing.assert_close(ours(p, oh), ref(p, oh), atol=ATOL, rtol=0)
    # decollated lists of channel-first tensors, different spatial sizes
    _, p2, _, oh2 = _batch(5, B=2, size=(7, 9))
    ours(list(p2), list(oh2))
    ref(list(p2), list(oh2))
    torch.testing.assert_close(ours.get_buffer(), ref.get_buffer(), atol=ATOL, rtol=0)
    for red in ("mean", "sum", "mean_batch", "sum_batch", "mean_channel", "none"):
        torch.testing.assert_close(ours.aggregate(red), ref.aggregate(red), atol=1e-5, rtol=0)
    assert len(ours.get_buffer()) == 3 + 3 + 2
    ours.reset()
    assert ours.get_buffer() is None and int(ours.dataset.num_images) == 0


def test_edges_on_bin_boundaries_follow_monai():
    # probabilities exactly on inner edges: both bucketize(p, edges[1:], right=right)
    p = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.5]).view(1, 1, 6)
    p = torch.cat([p, 1 - p], 1)
    y = torch.tensor([1.0, 0, 1, 1, 0, 0]).view(1, 1, 6)
    y = torch.cat([y, 1 - y], 1)
    for right in (False, True):
        for red in ("expected", "average", "maximum"):
            a = CalibrationErrorMetric(num_bins=4, calibration_reduction=red, right=right)(p, y)
            b = MonaiCalibration(num_bins=4, calibration_reduction=red, right=right)(p, y)
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_label_maps_logits_ignore_index_and_extras():
    logits, p, labels, oh = _batch(7)
    ref = MonaiCalibration(num_bins=10, include_background=False)(p, oh)
    got = CalibrationErrorMetric(num_bins=10, include_background=False, to_onehot_y=True, softmax=True)(logits, labels)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # ignore_index: equal to MONAI on the kept voxels (first 4 rows removed)
    lab = labels.clone()
    lab[..., :4, :] = 255
    m = CalibrationErrorMetric(num_bins=10, to_onehot_y=True, softmax=True, ignore_index=255)
    got = m(logits, lab)
    ref = MonaiCalibration(num_bins=10)(p[..., 4:, :], oh[..., 4:, :])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    all3 = m.aggregate_all()
    assert set(all3) == {"ece", "ace", "mce"}
    torch.testing.assert_close(all3["ece"], m.aggregate(), rtol=0, atol=0)
    # the dataset accumulator saw the same data
    ds = DatasetCalibration(4, num_bins=10, include_background=True, to_onehot_y=True, softmax=True, ignore_index=255)
    ds.update(logits, lab)
    torch.testing.assert_close(m.dataset.compute().micro.ace, ds.compute().micro.ace, rtol=0, atol=0)
    assert torch.equal(m.dataset.histogram(), ds.histogram())


def test_single_channel_follows_monai_rule():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(2, 1, 9, 9, generator=g)
    y = torch.randint(0, 2, (2, 1, 9, 9), generator=g)
    m = CalibrationErrorMetric(to_onehot_y=True)
    with pytest.warns(UserWarning, match="to_onehot_y=True` ignored"):
        got = m(p, y)
    torch.testing.assert_close(got, MonaiCalibration()(p, y.float()), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        m(p, y * 3)


def test_bad_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="calibration_reduction"):
        CalibrationErrorMetric(calibration_reduction="median")
    with pytest.raises(ValueError, match="num_bins"):
        CalibrationErrorMetric(num_bins=0)
    with pytest.raises(ValueError, match="ignore_index"):
        CalibrationErrorMetric(ignore_index=3)  # needs to_onehot_y
    with pytest.raises(ValueError, match="nothing to aggregate"):
        CalibrationErrorMetric().aggregate()


def test_supervised_evaluator_with_handler(tmp_path, caplog):
    from monai.data import DataLoader, Dataset, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CalibrationError as MonaiHandler
    from monai.handlers import from_engine
    from monai.transforms import Activations, AsDiscreted, Compose, Lambdad

    torch.manual_seed(0)
    C = 3
    net = torch.nn.Conv2d(1, C, 3, padding=1)
    g = torch.Generator().manual_seed(1)
    items = [
        {
            "image": MetaTensor(torch.randn(1, 12, 10, generator=g), meta={"filename_or_obj": f"/data/case{i}.nii.gz"}),
            "label": torch.randint(0, C, (1, 12, 10), generator=g),
        }
        for i in range(5)
    ]
    loader = DataLoader(Dataset(items), batch_size=2)
    post = Compose([Lambdad("pred", Activations(softmax=True)), AsDiscreted("label", to_onehot=C)])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=net, postprocessing=post
    )
    ours = CalibrationError(
        num_bins=10,
        include_background=False,
        output_transform=from_engine(["pred", "label"]),
        output_dir=tmp_path,
        class_names=["bg", "a", "b"],
    )
    ours.attach(evaluator, "cal")
    MonaiHandler(num_bins=10, include_background=False, output_transform=from_engine(["pred", "label"])).attach(
        evaluator, "monai_ece"
    )
    with caplog.at_level(logging.INFO, logger="calibops"):
        evaluator.run()
        evaluator.run()  # a second epoch: fresh state, new files
    s = evaluator.state
    assert s.metrics["cal"] == pytest.approx(s.metrics["monai_ece"], abs=ATOL)
    assert s.metrics["cal_ece"] == pytest.approx(s.metrics["monai_ece"], abs=ATOL)
    for k in ("cal_ace", "cal_mce", "cal_micro_ece", "cal_micro_ace", "cal_micro_mce"):
        assert 0 <= s.metrics[k] <= 1
    assert s.metric_details["cal"].shape == (5, 2)
    torch.testing.assert_close(s.metric_details["cal"], s.metric_details["monai_ece"], atol=ATOL, rtol=0)
    assert "cal: ECE" in caplog.text
    epoch = s.epoch
    rows = list(csv.DictReader(open(tmp_path / f"cal_epoch{epoch:04d}_per_image.csv")))
    assert len(rows) == 5 * 2
    assert rows[0]["image"] == "case0.nii.gz" and rows[0]["class"] == "1"
    assert float(rows[0]["ece"]) == pytest.approx(float(s.metric_details["cal"][0, 0]), abs=ATOL)
    z = np.load(tmp_path / f"cal_epoch{epoch:04d}_histogram.npz")
    assert z["histogram"].shape == (2, 10, 10) and list(z["class_names"]) == ["a", "b"]
    assert (tmp_path / f"cal_epoch{epoch:04d}_histogram.png").stat().st_size > 1000
    # one histogram entry per (image, class, non-empty bin): columns non-empty where voxels are, <= 5 images
    col = z["histogram"].sum(1)
    assert np.array_equal(col > 0, z["counts"] > 0) and col.max() <= 5 and z["counts"].sum() == 5 * 12 * 10 * 2


def test_compound_loss_matches_monai_and_trains():
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, generator=g)
    y = torch.randint(0, 3, (2, 1, 9, 8), generator=g)
    w = torch.tensor([0.5, 1.0, 2.0])
    loss = DiceCEL1ACELoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        weight=w,
        lambda_dice=0.3,
        lambda_ce=0.5,
        lambda_ace=0.2,
        binning="soft",
    )
    got = loss(x, y)
    dice_ce = DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, weight=w, lambda_dice=0.3, lambda_ce=0.5
    )(x, y)
    ace = marginal_l1_ace(x, y, include_background=False, to_onehot_y=True, softmax=True, weight=w[1:], binning="soft")
    torch.testing.assert_close(got, dice_ce + 0.2 * ace, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.last_terms["ace"], ace, rtol=0, atol=0)
    with pytest.raises(ValueError, match="lambda_ace"):
        DiceCEL1ACELoss(lambda_ace=-1)

    # a MONAI-style training step: the loss goes down on a fixed batch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    img = torch.randn(2, 1, 16, 16, generator=g)
    lab = (img > 0.5).long() + (img > 1.2).long()
    crit = DiceCEL1ACELoss(to_onehot_y=True, softmax=True, lambda_dice=1 / 3, lambda_ce=1 / 3, lambda_ace=1 / 3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        val = crit(net(img), lab)
        val.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(val.detach()))
    assert losses[-1] < losses[0]


def test_handler_takes_every_option_of_the_metric():
    # the handler passes the metric's options through; none of the metric's keyword-only options is missing
    import inspect

    metric = inspect.signature(CalibrationErrorMetric).parameters
    handler = inspect.signature(CalibrationError).parameters
    kw_only = [k for k, p in metric.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert kw_only and set(kw_only) <= set(handler), sorted(set(kw_only) - set(handler))
    for k in kw_only:
        assert handler[k].default == metric[k].default, k
    h = CalibrationError(validate=False, nonfinite="skip", right=True, to_onehot_y=True)
    acc = h.metric_fn._acc.base.options  # the options the handler's metric was built with
    assert (acc.validate, acc.right, acc.to_onehot_y) == (False, True, True)
    assert h.metric_fn._acc.base.nonfinite == "skip"
    with pytest.raises(ValueError, match="nonfinite"):
        CalibrationError(nonfinite="bogus")
