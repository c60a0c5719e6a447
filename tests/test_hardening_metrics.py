"""Hardening of the dataset metrics (issue 24): checkpoints validated against every invariant, older checkpoints,
histogram memory, exact rater volumes in the records, DDP with a rank that saw no batch."""

from __future__ import annotations

import math

import pytest
import torch

import calibops.functional as F
from calibops import DatasetCalibration


# ------------------------------------------------------------------ volume_crps records: exact rater volumes
def test_volume_crps_record_exact_above_2_pow_24():
    # two raters one voxel apart on 2**24 + 8 voxels: float32 sums stop counting at 2**24 and give both raters the
    # same volume (sigma 0) or a wrong one; the exact volumes are N and N - 1
    N = 2**24 + 8
    x = torch.full((1, 2, N), 0.25)
    x[:, 0] = 0.75
    t = torch.ones(1, 2, N, dtype=torch.uint8)
    t[0, 1, 0] = 0
    m = DatasetCalibration(
        2, num_bins=4, include_background=False, to_onehot_y=True, multi_rater=True, keep_records=True
    )
    m.update(x, t)
    got = m.records()[0]["volume_crps"]
    mu, sd = N - 0.5, 0.5
    v = 0.25 * N
    z = (v - mu) / sd
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    exact = sd * (z * (2 * Phi - 1) + 2 * phi - 1 / math.sqrt(math.pi))
    assert got == pytest.approx(exact, rel=1e-9)
    assert got == pytest.approx(F.volume_crps(x, t, to_onehot_y=True)[0, 0].item(), rel=1e-12)


# ------------------------------------------------------------------ histogram memory
def test_histogram_memory_refused_at_construction_naming_num_bins(monkeypatch):
    monkeypatch.delenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", raising=False)
    for M in (2 * 10**4, 10**5, 10**6):  # 2.98 GiB, 74.5 GiB, 7451 GiB: a raw allocator error / OOM on v0.2
        with pytest.raises(ValueError, match=rf"num_bins={M}: .* would need [0-9.]+ GiB .*num_bins=11585 or fewer"):
            DatasetCalibration(1, num_bins=M)
    with pytest.raises(ValueError, match=r"num_bins=5000: .* 2 group\(s\)"):
        DatasetCalibration(2, num_bins=5000, groups=("a", "b"))  # 3 x 2 x 5000^2 x 8 = 1.12 GiB
    DatasetCalibration(2, num_bins=100, groups=("a", "b"))
    # the bound is documented and overridable: by argument, and by the environment variable
    with pytest.raises(ValueError, match="num_bins=200"):
        DatasetCalibration(1, num_bins=200, histogram_memory_limit=200 * 200 * 8 - 1)
    assert DatasetCalibration(1, num_bins=200, histogram_memory_limit=200 * 200 * 8).histogram().shape == (1, 200, 200)
    monkeypatch.setenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", "1000")
    with pytest.raises(ValueError, match="num_bins=20: .*CALIBOPS_HISTOGRAM_MEMORY_LIMIT"):
        DatasetCalibration(1, num_bins=20)
    monkeypatch.setenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="CALIBOPS_HISTOGRAM_MEMORY_LIMIT must be a whole number"):
        DatasetCalibration(1, num_bins=20)
    monkeypatch.delenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT")
    with pytest.raises(ValueError, match="histogram_memory_limit must be >= 1"):
        DatasetCalibration(1, histogram_memory_limit=0)


def test_cli_histogram_check_is_the_metric_bound(monkeypatch):
    from calibops.cli.evaluate import UsageError, check_histogram_memory

    monkeypatch.setenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", str(50 * 50 * 8))
    check_histogram_memory(50, 1, 0)
    with pytest.raises(UsageError, match="--num-bins 51: .*--num-bins 50 or fewer"):
        check_histogram_memory(51, 1, 0)
    with pytest.raises(ValueError, match="num_bins=51"):
        DatasetCalibration(1, num_bins=51)


def test_histogram_memory_adapter_checks_classes_before_allocating(monkeypatch):
    pytest.importorskip("monai")
    from calibops.integrations.monai import CalibrationErrorMetric

    monkeypatch.setenv("CALIBOPS_HISTOGRAM_MEMORY_LIMIT", str(3 * 40 * 40 * 8))  # 3 classes fit, 4 do not
    metric = CalibrationErrorMetric(num_bins=40)  # C is learnt at the first batch
    x = torch.softmax(torch.randn(1, 4, 8, 8), 1)
    y = torch.randint(0, 4, (1, 1, 8, 8))
    with pytest.raises(ValueError, match="num_bins=40: .*4 class"):
        metric(y_pred=x, y=torch.nn.functional.one_hot(y[:, 0], 4).movedim(-1, 1).float())
    assert metric.dataset is None
