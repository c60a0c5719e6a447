"""An independent float64 implementation of the statistics and mL1-ACE semantics (README "Semantics",
docs/kernel_contract.md) in NumPy, written from those documents with explicit loops.

It shares no code with calibops: it is the oracle the reference (and through it every backend) is checked
against. Small inputs only (Python loops over voxels).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def edges(m: int) -> np.ndarray:
    return np.linspace(0.0, 1.0 + EPS32, m + 1, dtype=np.float32).astype(np.float64)


def centres(m: int) -> np.ndarray:
    return np.linspace(0.0, 1.0 + EPS32, 2 * m + 1, dtype=np.float32)[1::2].astype(np.float64)


def activate(x: np.ndarray, act: str | None) -> np.ndarray:
    """x: (B, C, N) float64."""
    if act == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if act == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return x


def hard_bin(p: float, m: int, right: bool) -> int:
    e = edges(m)
    j = sum(1 for k in range(1, m + 1) if (e[k] <= p if right else e[k] < p))
    return min(j, m - 1)


def soft_weights(p: float, m: int) -> list[tuple[int, float, float]]:
    """[(bin, weight, d weight / d p)] for one voxel."""
    c = centres(m)
    if m == 1 or p <= c[0]:
        return [(0, 1.0, 0.0)]
    if p > c[m - 1]:
        return [(m - 1, 1.0, 0.0)]
    for j in range(m - 1):
        if c[j] < p <= c[j + 1]:
            d = c[j + 1] - c[j]
            w = (c[j + 1] - p) / d
            return [(j, w, -1.0 / d), (j + 1, 1.0 - w, 1.0 / d)]
    raise AssertionError("unreachable")


def stats(p, y, keep, m, soft, right):
    """p, y: (B, C, N) float64; keep: (B, N) bool. Returns count, sum_p, sum_y (B, C, m)."""
    b_, c_, n_ = p.shape
    cnt = np.zeros((b_, c_, m))
    sp = np.zeros((b_, c_, m))
    sy = np.zeros((b_, c_, m))
    for b in range(b_):
        for c in range(c_):
            for i in range(n_):
                if not keep[b, i]:
                    continue
                pv = p[b, c, i]
                members = soft_weights(pv, m) if soft else [(hard_bin(pv, m, right), 1.0, 0.0)]
                for j, w, _ in members:
                    cnt[b, c, j] += w
                    sp[b, c, j] += w * pv
                    sy[b, c, j] += w * y[b, c, i]
    return cnt, sp, sy


def prepare(x, target, to_onehot_y, act, ignore_index):
    """x: (B, C, *sp) array; returns p, y (B, C, N) float64 and keep (B, N)."""
    x = np.asarray(x, dtype=np.float64)
    b_, c_ = x.shape[:2]
    x = x.reshape(b_, c_, -1)
    p = activate(x, act)
    n_ = x.shape[2]
    if to_onehot_y:
        lab = np.asarray(target).reshape(b_, n_).astype(np.int64)
        keep = np.ones((b_, n_), dtype=bool)
        if ignore_index is not None:
            keep &= lab != ignore_index
        y = np.zeros((b_, c_, n_))
        for c in range(c_):
            y[:, c, :] = (lab == c) & keep
    else:
        y = np.asarray(target, dtype=np.float64).reshape(b_, c_, n_)
        keep = np.ones((b_, n_), dtype=bool)
    return p, y, keep


def loss_and_grad(
    x,
    target,
    *,
    num_bins=20,
    binning="hard",
    include_background=True,
    to_onehot_y=False,
    act=None,
    ignore_empty_classes=True,
    weight=None,
    reduction="mean",
    empty_weight=0.01,
    right=False,
    ignore_index=None,
    grad_output=None,
):
    """mL1-ACE value and its gradient w.r.t. x (same shape as x) per README "Semantics", in float64."""
    x = np.asarray(x, dtype=np.float64)
    shape = x.shape
    b_, c_ = shape[:2]
    m = num_bins
    soft = binning == "soft"
    p, y, keep = prepare(x, target, to_onehot_y, act, ignore_index)
    cnt, sp, sy = stats(p, y, keep, m, soft, right)
    c0 = 0 if include_background or c_ == 1 else 1
    classes = list(range(c0, c_))
    ace = np.zeros((b_, len(classes)))
    coef = np.zeros((b_, c_, m))  # d ACE[b,c] / d gap_j * sign, before the upstream factor
    for b in range(b_):
        for k, c in enumerate(classes):
            valid = [j for j in range(m) if cnt[b, c, j] > 0 and (not soft or cnt[b, c, j] >= empty_weight)]
            if not valid:
                continue
            gaps = {j: sp[b, c, j] / cnt[b, c, j] - sy[b, c, j] / cnt[b, c, j] for j in valid}
            mask = 1.0
            if ignore_empty_classes and (y[b, c] * keep[b]).sum() <= 0:
                mask = 0.0
            wc = 1.0 if weight is None else float(weight[k])
            ace[b, k] = mask * wc * sum(abs(g) for g in gaps.values()) / len(valid)
            for j, g in gaps.items():
                coef[b, c, j] = mask * wc * np.sign(g) / len(valid)
    if reduction == "mean":
        value = ace.mean()
        up = np.full((b_, len(classes)), 1.0 / ace.size)
    elif reduction == "sum":
        value = ace.sum()
        up = np.ones((b_, len(classes)))
    else:
        value = ace
        up = np.ones((b_, len(classes)))
    if grad_output is not None:
        up = up * np.asarray(grad_output, dtype=np.float64)
    # gradient w.r.t. p
    n_ = p.shape[2]
    gp = np.zeros_like(p)
    for b in range(b_):
        for k, c in enumerate(classes):
            u = up[b, k]
            if u == 0:
                continue
            for i in range(n_):
                if not keep[b, i]:
                    continue
                pv = p[b, c, i]
                members = soft_weights(pv, m) if soft else [(hard_bin(pv, m, right), 1.0, 0.0)]
                for j, w, dw in members:
                    if coef[b, c, j] == 0:
                        continue
                    W = cnt[b, c, j]
                    d_sp = ((w + pv * dw) * W - sp[b, c, j] * dw) / W**2
                    d_sy = (y[b, c, i] * dw * W - sy[b, c, j] * dw) / W**2
                    gp[b, c, i] += u * coef[b, c, j] * (d_sp - d_sy)
    if act == "softmax":
        gx = p * (gp - (p * gp).sum(axis=1, keepdims=True))
    elif act == "sigmoid":
        gx = gp * p * (1 - p)
    else:
        gx = gp
    return value, gx.reshape(shape)


def calibration_errors(
    x, target, *, num_bins=20, include_background=False, to_onehot_y=False, act=None, ignore_index=None, right=False
):
    """(ece, ace, mce) each (B, C') float64, NaN where no voxel."""
    x = np.asarray(x, dtype=np.float64)
    b_, c_ = x.shape[:2]
    p, y, keep = prepare(x, target, to_onehot_y, act, ignore_index)
    cnt, sp, sy = stats(p, y, keep, num_bins, False, right)
    c0 = 0 if include_background or c_ == 1 else 1
    out = np.full((3, b_, c_ - c0), np.nan)
    for b in range(b_):
        for k, c in enumerate(range(c0, c_)):
            nz = [j for j in range(num_bins) if cnt[b, c, j] > 0]
            if not nz:
                continue
            gaps = [abs(sp[b, c, j] / cnt[b, c, j] - sy[b, c, j] / cnt[b, c, j]) for j in nz]
            ns = [cnt[b, c, j] for j in nz]
            out[0, b, k] = sum(n * g for n, g in zip(ns, gaps)) / sum(ns)
            out[1, b, k] = sum(gaps) / len(gaps)
            out[2, b, k] = max(gaps)
    return out[0], out[1], out[2]
