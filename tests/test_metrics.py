"""DatasetCalibration: macro / micro errors and the dataset reliability histogram.

Checked against (1) a hand-computed case and (2) an independent float64 NumPy oracle written from docs/usage.md
"Semantics" (per-voxel binning of float32 probabilities with ``torch.bucketize`` on its edges, everything else in
float64), on random data with every option, odd shapes, images of different sizes, half precision inputs
and fully ignored images. Errors must agree within 1e-5, the histogram exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import calibops
from calibops import functional as F
from calibops.metrics import DatasetCalibration, reliability_histogram_counts

EPS32 = float(np.finfo(np.float32).eps)
ATOL = 1e-5  # the agreement bound for errors; the oracle is float64


def _backends() -> list[str]:
    return [b for b in ("reference", "cpu", "triton") if calibops.available_backends()[b] is None]


BACKENDS = _backends()


# ----------------------------------------------------------------------------------------- the oracle
def _oracle_probs(x: torch.Tensor, softmax: bool, sigmoid: bool) -> torch.Tensor:
    """(C, N) probabilities in float32, as docs/usage.md "Semantics" defines them (activation computed in float32)."""
    x = x.float()
    if softmax:
        return torch.softmax(x, dim=0)
    if sigmoid:
        return torch.sigmoid(x)
    return x


def oracle(
    batches,
    num_classes,
    num_bins,
    include_background=False,
    to_onehot_y=False,
    softmax=False,
    sigmoid=False,
    ignore_index=None,
    right=False,
):
    """Independent implementation: returns dict(macro=(3, C'), micro=(3, C'), hist=(C', M, M), n=(C',))."""
    M = num_bins
    edges = torch.linspace(0.0, 1.0 + EPS32, M + 1, dtype=torch.float32)
    inner64 = edges[1:].double().numpy()
    classes = list(range(num_classes)) if (include_background or num_classes == 1) else list(range(1, num_classes))
    per_image, tot_n, tot_p, tot_y, present = [], 0.0, 0.0, 0.0, 0
    hist = np.zeros((len(classes), M, M), dtype=np.int64)
    for inp, tgt in batches:
        B, C = inp.shape[:2]
        for b in range(B):
            p = _oracle_probs(inp[b].reshape(C, -1), softmax, sigmoid)
            bins = torch.bucketize(p, edges[1:], right=right).clamp(max=M - 1).numpy()
            p64 = p.double().numpy()
            if to_onehot_y:
                lab = tgt[b].reshape(-1).long().numpy()
                keep = np.ones_like(lab, dtype=bool) if ignore_index is None else lab != ignore_index
                y = (lab[None, :] == np.arange(C)[:, None]).astype(np.float64)
            else:
                y = tgt[b].reshape(C, -1).double().numpy()
                keep = np.ones(y.shape[1], dtype=bool)
            n = np.zeros((len(classes), M))
            sp = np.zeros((len(classes), M))
            sy = np.zeros((len(classes), M))
            for k, c in enumerate(classes):
                j = bins[c][keep]
                n[k] = np.bincount(j, minlength=M)
                sp[k] = np.bincount(j, weights=p64[c][keep], minlength=M)
                sy[k] = np.bincount(j, weights=y[c][keep], minlength=M)
                for jj in range(M):
                    if n[k, jj] > 0:
                        acc = sy[k, jj] / n[k, jj]
                        a = np.searchsorted(inner64, acc, side="right" if right else "left")
                        hist[k, min(a, M - 1), jj] += 1
            per_image.append(_errors(n, sp, sy))
            present = present + (sy.sum(1) > 0)
            tot_n, tot_p, tot_y = tot_n + n, tot_p + sp, tot_y + sy
    per_image = np.stack(per_image)  # [images, 3, C']
    defined = ~np.isnan(per_image)
    with np.errstate(invalid="ignore"):
        macro = np.where(defined.any(0), np.nansum(per_image, 0) / np.maximum(defined.sum(0), 1), np.nan)
    return {
        "macro": macro,
        "micro": _errors(tot_n, tot_p, tot_y),
        "hist": hist,
        "n": defined[:, 0].sum(0),
        "present": present,
    }


def _errors(n, sp, sy):
    """(3, C') ECE, ACE, MCE from (C', M) float64 statistics; NaN where a class has no voxel."""
    out = np.full((3, n.shape[0]), np.nan)
    for k in range(n.shape[0]):
        v = n[k] > 0
        if not v.any():
            continue
        gap = np.abs(sp[k][v] / n[k][v] - sy[k][v] / n[k][v])
        out[0, k] = (n[k][v] * gap).sum() / n[k][v].sum()
        out[1, k] = gap.mean()
        out[2, k] = gap.max()
    return out


def _assert_matches(metric: DatasetCalibration, expected: dict) -> None:
    res = metric.compute()
    got_macro = torch.stack(list(res.macro)).double().numpy()
    got_micro = torch.stack(list(res.micro)).double().numpy()
    np.testing.assert_allclose(got_macro, expected["macro"], atol=ATOL, rtol=0, equal_nan=True)
    np.testing.assert_allclose(got_micro, expected["micro"], atol=ATOL, rtol=0, equal_nan=True)
    h = metric.histogram()
    assert h.dtype == torch.int64
    assert h.shape == expected["hist"].shape
    np.testing.assert_array_equal(h.cpu().numpy(), expected["hist"])
    np.testing.assert_array_equal(res.images_per_class.cpu().numpy(), expected["n"])
    np.testing.assert_array_equal(res.images_with_class.cpu().numpy(), expected["present"])
    assert res.nonfinite == 0
    for field in (*res.macro, *res.micro):
        assert field.dtype == torch.float32 and field.shape == (metric.num_used_classes,)


# ------------------------------------------------------------------------------------ hand-checked case
def _hand_batches():
    # class-1 probabilities; class 0 gets 1 - p. Two images of different sizes (two update calls).
    p0 = torch.tensor([0.2, 0.4, 0.8, 0.9])
    y0 = torch.tensor([0, 1, 1, 1])
    p1 = torch.tensor([0.1, 0.6, 0.7])
    y1 = torch.tensor([0, 0, 1])
    mk = lambda p: torch.stack([1 - p, p])[None]  # noqa: E731  -> (1, 2, N)
    return [(mk(p0), y0[None]), (mk(p1), y1[None])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_checked(backend):
    m = DatasetCalibration(2, num_bins=2, include_background=False, to_onehot_y=True, backend=backend)
    for x, y in _hand_batches():
        m.update(x, y)
    res = m.compute()
    # image 0, class 1: bin0 {0.2:0, 0.4:1} conf .3 acc .5 gap .2; bin1 {.8:1, .9:1} conf .85 acc 1 gap .15
    #   ECE = (2*.2 + 2*.15)/4 = .175, ACE = .175, MCE = .2
    # image 1: bin0 {.1:0} gap .1; bin1 {.6:0, .7:1} conf .65 acc .5 gap .15
    #   ECE = (.1 + 2*.15)/3 = 2/15, ACE = .125, MCE = .15
    torch.testing.assert_close(res.macro.ece, torch.tensor([(0.175 + 2 / 15) / 2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.macro.ace, torch.tensor([0.15]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.macro.mce, torch.tensor([0.175]), atol=1e-6, rtol=0)
    # pooled: bin0 n=3 S_p=.7 S_y=1 gap .1; bin1 n=4 S_p=3 S_y=3 gap 0
    torch.testing.assert_close(res.micro.ece, torch.tensor([0.3 / 7]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.micro.ace, torch.tensor([0.05]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.micro.mce, torch.tensor([0.1]), atol=1e-6, rtol=0)
    assert res.num_images == 2 and res.classes == (1,)
    # bin accuracies: img0 (.5 -> a0, j0), (1 -> a1, j1); img1 (0 -> a0, j0), (.5 -> a0, j1)
    expected = torch.tensor([[[2, 1], [0, 1]]])
    assert torch.equal(m.histogram(), expected)
    assert m.pooled_counts().tolist() == [[3.0, 4.0]]


def test_hand_checked_matches_oracle():
    # the oracle itself reproduces the hand-computed numbers (guards the oracle used below)
    exp = oracle(_hand_batches(), 2, 2, to_onehot_y=True)
    np.testing.assert_allclose(exp["macro"][:, 0], [(0.175 + 2 / 15) / 2, 0.15, 0.175], atol=1e-7)
    np.testing.assert_allclose(exp["micro"][:, 0], [0.3 / 7, 0.05, 0.1], atol=1e-7)
    np.testing.assert_array_equal(exp["hist"], [[[2, 1], [0, 1]]])


# --------------------------------------------------------------------------------- random vs the oracle
SHAPES = [(2, (9, 7)), (1, (5, 4, 3)), (3, (11,)), (1, (6, 6))]


def _random_batches(seed, C, cfg, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i, (B, sp) in enumerate(SHAPES):
        if cfg.get("softmax") or cfg.get("sigmoid"):
            x = (3 * torch.randn(B, C, *sp, generator=g)).to(dtype)
        elif C > 1:
            x = torch.softmax(3 * torch.randn(B, C, *sp, generator=g), 1).to(dtype)
        else:
            x = torch.rand(B, C, *sp, generator=g).to(dtype)
        if cfg.get("to_onehot_y"):
            y = torch.randint(0, C, (B, 1, *sp), generator=g)
            if i == 1 and C > 2:
                y[y == 2] = 0  # class 2 absent from this image
            ii = cfg.get("ignore_index")
            if ii is not None:
                y[torch.rand(y.shape, generator=g) < 0.15] = ii
                if i == 3:
                    y[:] = ii  # a fully ignored image: its errors are NaN and skipped by macro
        elif cfg.get("soft_labels"):
            # mean of two raters: values in {0, .5, 1} keep S_y exact in float32
            y = torch.randint(0, 2, (B, C, *sp), generator=g) + torch.randint(0, 2, (B, C, *sp), generator=g)
            y = y.float() / 2
        else:
            y = torch.nn.functional.one_hot(torch.randint(0, C, (B, *sp), generator=g), C).movedim(-1, 1).float()
        batches.append((x, y))
    return batches


CONFIGS = {
    "labels-softmax": ({"to_onehot_y": True, "softmax": True}, 4, 20),
    "labels-bg-ignore-right": (
        {"to_onehot_y": True, "softmax": True, "include_background": True, "ignore_index": 255, "right": True},
        3,
        7,
    ),
    "onehot-probs": ({}, 3, 10),
    "sigmoid-soft-labels-bg": ({"sigmoid": True, "soft_labels": True, "include_background": True}, 3, 5),
    "one-bin": ({"to_onehot_y": True, "softmax": True}, 3, 1),
    "one-channel-sigmoid": ({"sigmoid": True, "soft_labels": True}, 1, 8),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_against_oracle(name, backend):
    cfg, C, M = CONFIGS[name]
    opts = {"include_background": False} | {k: v for k, v in cfg.items() if k != "soft_labels"}
    batches = _random_batches(100 + list(CONFIGS).index(name), C, cfg)
    m = DatasetCalibration(C, num_bins=M, backend=backend, **opts)
    for x, y in batches:
        m.update(x, y)
    expected = oracle(batches, C, M, **opts)
    _assert_matches(m, expected)
    if "ignore_index" in cfg:
        assert m.compute().num_images == sum(b for b, _ in SHAPES)
        assert (expected["n"] < m.compute().num_images).all()  # the fully ignored image was skipped


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    cfg = {"include_background": False, "to_onehot_y": True, "softmax": True}
    batches = _random_batches(7, 4, cfg, dtype=dtype)
    m = DatasetCalibration(4, num_bins=15, **cfg)
    for x, y in batches:
        m.update(x, y)
    _assert_matches(m, oracle(batches, 4, 15, **cfg))


def test_batching_does_not_matter():
    cfg = {"to_onehot_y": True, "softmax": True}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 8, 5, generator=g)
    y = torch.randint(0, 3, (6, 8, 5), generator=g)
    whole = DatasetCalibration(3, **cfg)
    whole.update(x, y)
    split = DatasetCalibration(3, **cfg)
    for b in range(6):
        split.update(x[b : b + 1], y[b : b + 1])
    a, s = whole.compute(), split.compute()
    for u, v in zip((*a.macro, *a.micro), (*s.macro, *s.micro), strict=True):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=0)
    assert torch.equal(whole.histogram(), split.histogram())


def test_matches_per_image_functional_metrics():
    """Macro = mean over images of calibops.functional.calibration_errors; records carry the same values."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 10, 6, generator=g)
    y = torch.randint(0, 3, (4, 1, 10, 6), generator=g)
    m = DatasetCalibration(3, include_background=False, to_onehot_y=True, softmax=True, keep_records=True)
    m.update(x, y, image_ids=["a", "b", "c", "d"])
    per = F.calibration_errors(x, y, include_background=False, to_onehot_y=True, softmax=True)
    res = m.compute()
    torch.testing.assert_close(res.macro.ece, per.ece.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.macro.mce, per.mce.mean(0), atol=1e-6, rtol=0)
    recs = m.records()
    assert [(r["image"], r["class"]) for r in recs] == [(i, c) for i in "abcd" for c in (1, 2)]
    got = torch.tensor([[r["ece"] for r in recs[2 * b : 2 * b + 2]] for b in range(4)])
    torch.testing.assert_close(got, per.ece, atol=1e-7, rtol=0)
    assert all(r["voxels"] == 60 for r in recs)


def test_dice_records_hand_checked():
    # 1 image, 3 classes, 4 voxels; argmax prediction [0, 1, 1, 2], labels [0, 1, 2, 2]
    x = torch.tensor([[[5.0, 0, 0, 0], [0, 5, 5, 0], [0, 0, 0, 5]]])
    y = torch.tensor([[0, 1, 2, 2]])
    m = DatasetCalibration(3, to_onehot_y=True, softmax=True, keep_records=True, dice=True)
    m.update(x, y)
    dice = {r["class"]: r["dice"] for r in m.records()}
    assert dice[1] == pytest.approx(2 * 1 / (2 + 1))  # pred {1,2}, label {1}
    assert dice[2] == pytest.approx(2 * 1 / (1 + 2))  # pred {3}, label {2,3}
    # a class absent from both prediction and label has Dice NaN, not 0 or 1
    m2 = DatasetCalibration(3, to_onehot_y=True, softmax=True, keep_records=True, dice=True)
    m2.update(x[..., :2], y[..., :2])
    assert math.isnan({r["class"]: r["dice"] for r in m2.records()}[2])


def test_nan_when_a_class_never_has_voxels():
    # every voxel ignored: no statistic anywhere -> NaN macro and micro, empty histogram
    m = DatasetCalibration(3, include_background=False, to_onehot_y=True, softmax=True, ignore_index=9)
    m.update(torch.randn(2, 3, 4), torch.full((2, 4), 9))
    res = m.compute()
    assert torch.isnan(torch.stack([*res.macro, *res.micro])).all()
    assert res.num_images == 2 and res.images_per_class.tolist() == [0, 0]
    assert m.histogram().sum() == 0


# --------------------------------------------------------------------------------------- state & API
def _state_numel(m: DatasetCalibration) -> int:
    return sum(t.numel() for t in m.state_tensors().values())


def test_state_size_is_independent_of_data():
    C, M = 4, 12
    m = DatasetCalibration(C, num_bins=M, include_background=False, to_onehot_y=True, softmax=True)
    Cp = C - 1
    # count/sum_p/sum_y, macro sums (ece/ace/mce and l2) and counts, histogram, images_with_class, num_images and
    # num_nonfinite
    expected = 3 * Cp * M + 2 * 3 * Cp + Cp + Cp * M * M + Cp + 2
    assert _state_numel(m) == expected
    g = torch.Generator().manual_seed(0)
    m.update(torch.randn(1, C, 4, 4, generator=g), torch.randint(0, C, (1, 4, 4), generator=g))
    assert _state_numel(m) == expected
    for size in ((40, 40, 8), (3, 3), (100, 90)):
        m.update(torch.randn(2, C, *size, generator=g), torch.randint(0, C, (2, *size), generator=g))
    assert _state_numel(m) == expected
    sd = m.state_dict()
    assert sum(v.numel() for k, v in sd.items() if k != "config") == expected
    assert "records" not in sd


def test_state_dict_round_trip_and_reset():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 3, 7, 7, generator=g), torch.randint(0, 3, (3, 7, 7), generator=g)
    m = DatasetCalibration(3, num_bins=9, to_onehot_y=True, softmax=True, keep_records=True)
    m.update(x[:2], y[:2])
    m2 = DatasetCalibration(3, num_bins=9, to_onehot_y=True, softmax=True, keep_records=True)
    m2.load_state_dict(m.state_dict())
    m.update(x[2:], y[2:])
    m2.update(x[2:], y[2:])  # resumed accumulation continues exactly
    r, r2 = m.compute(), m2.compute()
    for u, v in zip((*r.macro, *r.micro), (*r2.macro, *r2.micro), strict=True):
        assert torch.equal(u, v)
    assert torch.equal(m.histogram(), m2.histogram())
    assert m.records() == m2.records()
    with pytest.raises(ValueError, match="config"):
        DatasetCalibration(3, num_bins=10, to_onehot_y=True, softmax=True).load_state_dict(m.state_dict())
    m.reset()
    assert m.compute().num_images == 0 and m.histogram().sum() == 0 and m.records() == []
    assert torch.isnan(m.compute().micro.ece).all()


def test_compute_does_not_change_state():
    m = DatasetCalibration(3, to_onehot_y=True, softmax=True)
    m.update(torch.randn(2, 3, 5), torch.randint(0, 3, (2, 5)))
    a = m.compute()
    b = m.compute()
    assert torch.equal(a.micro.ece, b.micro.ece) and a.num_images == b.num_images == 2


def test_histogram_helper_counts_only_non_empty_bins():
    count = torch.tensor([[[0.0, 2.0, 4.0]]])
    sum_y = torch.tensor([[[0.0, 2.0, 1.0]]])
    h = reliability_histogram_counts(calibops.BinnedStats(count, count * 0.5, sum_y))
    # bin 1: acc 1 -> a=2; bin 2: acc .25 -> a=0 (edges ~ 0, 1/3, 2/3, 1); bin 0 empty
    expected = torch.zeros(1, 3, 3, dtype=torch.int64)
    expected[0, 2, 1] = 1
    expected[0, 0, 2] = 1
    assert torch.equal(h, expected)


@pytest.mark.parametrize("right", [False, True])
def test_histogram_accuracy_edge_rule(right):
    # a bin accuracy exactly on an inner edge e_k goes to bin k-1 (right=False) or k (right=True), like p
    M = 5
    e = torch.linspace(0.0, 1.0 + EPS32, M + 1, dtype=torch.float32)
    count = torch.ones(1, 1, M)
    sum_y = e[1:].clone().view(1, 1, M)  # accuracies e_1 .. e_M
    h = reliability_histogram_counts(calibops.BinnedStats(count, count, sum_y), right=right)
    a = h[0].argmax(0)  # accuracy bin of each confidence bin j (one entry per column)
    expected = [min(k + 1, M - 1) for k in range(M)] if right else list(range(M))
    assert a.tolist() == expected and h.sum() == M


def test_bad_arguments():
    with pytest.raises(TypeError, match="num_classes"):
        DatasetCalibration(3.0)
    with pytest.raises(ValueError, match="num_classes"):
        DatasetCalibration(0)
    with pytest.raises(ValueError, match="num_bins"):
        DatasetCalibration(3, num_bins=0)
    with pytest.raises(ValueError, match="softmax"):
        DatasetCalibration(3, softmax=True, sigmoid=True)
    with pytest.raises(ValueError, match="ignore_index"):
        DatasetCalibration(3, ignore_index=0)
    with pytest.raises(ValueError, match="keep_records"):
        DatasetCalibration(3, dice=True)
    with pytest.raises(TypeError, match="include_background"):
        DatasetCalibration(3, include_background=1)
    m = DatasetCalibration(3, to_onehot_y=True)
    with pytest.raises(ValueError, match="input"):
        m.update(torch.rand(1, 4, 5), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="input"):
        m.update([0.5], torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="probabilities"):
        m.update(torch.full((1, 3, 5), 2.0), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="label"):
        m.update(torch.full((1, 3, 5), 1 / 3), torch.full((1, 5), 7))
    with pytest.raises(ValueError, match="image_ids"):
        m.update(torch.full((2, 3, 5), 1 / 3), torch.zeros(2, 5, dtype=torch.long), image_ids=["a"])
    with pytest.raises(RuntimeError, match="keep_records"):
        m.records()
    assert m.compute().num_images == 0  # failed updates added nothing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_match_cpu_reference():
    cfg = {"to_onehot_y": True, "softmax": True, "ignore_index": 255}
    batches = _random_batches(21, 4, cfg)
    cpu = DatasetCalibration(4, backend="reference", **cfg)
    gpu = DatasetCalibration(4, **cfg)  # auto: cuda or triton kernels
    for x, y in batches:
        cpu.update(x, y)
        gpu.update(x.cuda(), y.cuda())
    assert gpu.histogram().device.type == "cuda"
    _assert_matches(gpu, oracle(batches, 4, 20, **cfg))
    assert torch.equal(gpu.histogram().cpu(), cpu.histogram())


def test_write_records_csv(tmp_path):
    import csv

    m = DatasetCalibration(3, include_background=False, to_onehot_y=True, softmax=True, keep_records=True, dice=True)
    g = torch.Generator().manual_seed(2)
    m.update(torch.randn(2, 3, 6, 5, generator=g), torch.randint(0, 3, (2, 6, 5), generator=g), ["p", "q"])
    m.write_records_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "class", "ece", "ace", "mce", "voxels", "dice", "l2"]  # l2 appended
    assert [(r["image"], r["class"]) for r in rows] == [("p", "1"), ("p", "2"), ("q", "1"), ("q", "2")]
    recs = m.records(gather=True)  # not distributed: the local records, unchanged
    assert [float(r["ece"]) for r in rows] == pytest.approx([r["ece"] for r in recs], abs=0)


# ---------------------------------------------------- issue 13: non-finite inputs, counts, micro, state checks
def _good_batch(seed, B=2, C=3, size=(5, 4)):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(B, C, *size, generator=g), torch.randint(0, C, (B, *size), generator=g)


def _state(m):
    return {k: v.clone() for k, v in m.state_tensors().items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise_with_the_image_and_lose_nothing(backend, value):
    cfg = {"include_background": False, "to_onehot_y": True, "softmax": True, "backend": backend, "keep_records": True}
    m = DatasetCalibration(3, **cfg)
    clean = DatasetCalibration(3, **cfg)
    for seed in (0, 1):
        x, y = _good_batch(seed)
        m.update(x, y)
        clean.update(x, y)
    before = _state(m)
    x, y = _good_batch(2, B=3)
    x[1, 0, 2, 3] = value  # the 6th image seen (running index 5), batch position 1
    with pytest.raises(ValueError, match=r"after softmax.*image 5 \(batch position 1\): 3\b.*4 images before"):
        m.update(x, y)
    with pytest.raises(ValueError, match=r"image 'case-b' \(batch position 1\)"):
        m.update(x, y, image_ids=["case-a", "case-b", "case-c"])
    after = _state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing of the bad batch was added
    assert len(m.records()) == 4 * 2
    # the run goes on: the result is the one without the bad batch, and never NaN
    x, y = _good_batch(3)
    m.update(x, y)
    clean.update(x, y)
    r, rc = m.compute(), clean.compute()
    for u, v in zip((*r.macro, *r.micro), (*rc.macro, *rc.micro), strict=True):
        assert torch.equal(u, v) and bool(torch.isfinite(u).all())
    assert r.num_images == 6 and torch.equal(r.images_per_class, rc.images_per_class)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_skip_counts_and_equals_leaving_the_voxels_out(backend):
    x, y = _good_batch(4, B=3)
    x[0, 1, 0, 0] = float("nan")
    x[2, :, 1, 2] = float("-inf")  # all -inf: NaN softmax
    x[2, 0, 3, 3] = float("-inf")  # one -inf: a valid voxel (p = 0 for class 0)
    m = DatasetCalibration(
        3, include_background=False, to_onehot_y=True, softmax=True, backend=backend, nonfinite="skip"
    )
    with pytest.warns(RuntimeWarning, match=r"left out 6 non-finite.*image 0 \(batch position 0\): 3.*image 2"):
        m.update(x, y)
    # the same statistics as ignoring those two voxels (their labels set to ignore_index)
    y_ign = y.clone()
    y_ign[0, 0, 0] = 9
    y_ign[2, 1, 2] = 9
    x_fin = torch.where(torch.isnan(x) | (x == float("-inf")).all(1, keepdim=True), 0.0, x)
    ref = DatasetCalibration(
        3, include_background=False, to_onehot_y=True, softmax=True, ignore_index=9, backend=backend
    )
    ref.update(x_fin, y_ign)
    r, rr = m.compute(), ref.compute()
    for u, v in zip((*r.macro, *r.micro), (*rr.macro, *rr.micro), strict=True):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=0)
        assert bool(torch.isfinite(u).all())
    assert r.nonfinite == 6 and rr.nonfinite == 0
    assert r.num_images == 3 and r.images_per_class.tolist() == [3, 3]
    assert torch.equal(m.histogram(), ref.histogram())


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_counts_nonfinite_without_a_check(backend):
    x, y = _good_batch(5)
    x[1, 2, 0, 0] = float("nan")
    m = DatasetCalibration(3, to_onehot_y=True, softmax=True, backend=backend, validate=False)
    m.update(x, y)
    r = m.compute()
    assert r.nonfinite == 3 and bool(torch.isfinite(torch.stack([*r.macro, *r.micro])).all())


def test_nonfinite_option():
    with pytest.raises(ValueError, match="nonfinite"):
        DatasetCalibration(3, nonfinite="ignore")
    with pytest.raises(TypeError, match="nonfinite"):
        DatasetCalibration(3, nonfinite=True)


def test_images_per_class_and_images_with_class():
    # the case: classes 1 and 2 each present in one image of three. Every image has voxels, so every
    # class's macro values average over all 3 images (images_per_class); the class is in 1 (images_with_class)
    y = torch.zeros(3, 4, 4, dtype=torch.long)
    y[0, :2] = 1
    y[1, 1:3, 1:3] = 2
    m = DatasetCalibration(3, include_background=False, to_onehot_y=True, softmax=True)
    m.update(torch.randn(3, 3, 4, 4), y)
    r = m.compute()
    assert r.images_per_class.tolist() == [3, 3]
    assert r.images_with_class.tolist() == [1, 1]
    # an image whose voxels are all ignored counts for neither
    y2 = torch.full((1, 4, 4), 7)
    m2 = DatasetCalibration(3, include_background=False, to_onehot_y=True, softmax=True, ignore_index=7)
    m2.update(torch.randn(1, 3, 4, 4), y2)
    m2.update(torch.randn(3, 3, 4, 4), y)
    r2 = m2.compute()
    assert r2.num_images == 4 and r2.images_per_class.tolist() == [3, 3] and r2.images_with_class.tolist() == [1, 1]


def test_micro_pools_sums_unlike_the_2025_paper_code():
    """Two images, one bin: pooled gap 0.5694 (calibops micro) vs 0.5400 (per-image bin means averaged)."""
    # class-1 probability 0.925 everywhere (hard bin 18 of 20); image A: 20 voxels, 13 labelled 1;
    # image B: 25 voxels, 3 labelled 1
    sizes, positives = (20, 25), (13, 3)
    m = DatasetCalibration(2, num_bins=20, include_background=False, to_onehot_y=True)
    for n, k in zip(sizes, positives, strict=True):
        p = torch.full((1, n), 0.925)
        m.update(torch.stack([1 - p, p], 1), (torch.arange(n) < k).long()[None])
    r = m.compute()
    # independent computation, float64, from the counts alone
    conf = float(torch.tensor(0.925, dtype=torch.float32))  # the float32 probability the kernels see
    pooled = abs(conf - sum(positives) / sum(sizes))  # Σ S_p / Σ n - Σ S_y / Σ n
    paper = abs(conf - sum(k / n for n, k in zip(sizes, positives, strict=True)) / 2)  # unweighted over images
    assert round(pooled, 4) == 0.5694 and round(paper, 4) == 0.5400
    for v in r.micro:  # one non-empty bin: ECE = ACE = MCE = its gap
        assert v.item() == pytest.approx(pooled, abs=1e-6)
    assert m.pooled_counts()[0, 18].item() == 45 and m.pooled_counts().sum().item() == 45


def _sd(seed=0, keep_records=False):
    m = DatasetCalibration(3, num_bins=6, to_onehot_y=True, softmax=True, keep_records=keep_records)
    for s in (seed, seed + 1):
        m.update(*_good_batch(s))
    return m.state_dict()


def _corrupt(key, how):
    def f(sd):
        v = sd[key]
        if how == "nan":
            v.view(-1)[0] = float("nan")
        elif how == "inf":
            v.view(-1)[0] = float("inf")
        elif how == "negative":
            v.view(-1)[0] = -1
        elif how == "fraction":
            sd[key] = v.double() + 0.5
        elif how == "shape":
            sd[key] = v.reshape(-1)[:-1] if v.numel() > 1 else v.reshape(1, 1)
        elif how == "string":
            sd[key] = "oops"
        elif how == "missing":
            del sd[key]

    return f


def _bump(key, index, value):
    def f(sd):
        sd[key][index] = value

    return f


BAD_STATES = {
    "sum_p-nan": ("sum_p", _corrupt("sum_p", "nan")),
    "sum_y-inf": ("sum_y", _corrupt("sum_y", "inf")),
    "count-negative": ("count", _corrupt("count", "negative")),
    "macro_sum-nan": ("macro_sum", _corrupt("macro_sum", "nan")),
    "hist-negative": ("hist", _corrupt("hist", "negative")),
    "num_images-fraction": ("num_images", _corrupt("num_images", "fraction")),
    "macro_n-shape": ("macro_n", _corrupt("macro_n", "shape")),
    "count-string": ("count", _corrupt("count", "string")),
    "images_with_class-missing": ("images_with_class", _corrupt("images_with_class", "missing")),
    "sum_p-above-count": ("sum_p", lambda sd: sd["sum_p"].copy_(sd["count"] + 1)),
    "sum_y-above-count": ("sum_y", lambda sd: sd["sum_y"].copy_(sd["count"] * 2 + 1)),
    "macro_n-above-images": ("macro_n", _bump("macro_n", (0, 0), 99)),
    "images_with_class-above": ("images_with_class", _bump("images_with_class", 0, 99)),
    "macro_sum-above-n": ("macro_sum", _bump("macro_sum", (1, 0), 50.0)),
    "hist-without-count": ("hist", lambda sd: [sd[k].zero_() for k in ("count", "sum_p", "sum_y")]),
    "hist-above-images": ("hist", _bump("hist", (0, 0, 0), 99)),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_load_state_dict_rejects_impossible_states(name):
    key, damage = BAD_STATES[name]
    sd = _sd()
    damage(sd)
    m = DatasetCalibration(3, num_bins=6, to_onehot_y=True, softmax=True)
    m.update(*_good_batch(9))
    before = _state(m)
    with pytest.raises(ValueError, match=key):
        m.load_state_dict(sd)
    after = _state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched by a failed load


def test_load_state_dict_checks_records():
    sd = _sd(keep_records=True)
    sd["records"] = sd["records"][:-1]
    m = DatasetCalibration(3, num_bins=6, to_onehot_y=True, softmax=True, keep_records=True)
    with pytest.raises(ValueError, match="records"):
        m.load_state_dict(sd)
    m.load_state_dict(_sd(keep_records=True))  # the genuine one loads
    assert m.compute().num_images == 4
