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
    m = DatasetCalibration(2, num_bins=4, include_background=False, to_onehot_y=True, multi_rater=True, keep_records=True)
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
