"""An independent float64 implementation of the statistics and mL1-ACE semantics (docs/usage.md "Semantics",
docs/kernel_contract.md) in NumPy, written from those documents with explicit loops.

It shares no code with calibops: it is the oracle the reference (and through it every backend) is checked
against. Small inputs only (Python loops over voxels).

Two layers:
- :func:`op_forward` / :func:`op_backward`: the kernel ops of contract v2 (marginal and top-label entries,
  several raters, second moments, hard and soft schemes, the used-voxel and non-finite rules, ``bad``), entry by
  entry; the backward applies the product rule to each entry's membership and the activation's chain rule by
  hand (no autograd). Inputs are NumPy arrays (the caller converts tensors).
- :func:`loss_and_grad` / :func:`calibration_errors`: mL1-ACE and ECE/ACE/MCE on top of marginal statistics.
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


def soft_weights(p: float, m: int, right: bool = False) -> list[tuple[int, float, float]]:
    """[(bin, weight, d weight / d p)] for one voxel. ``right``: the intervals are closed below instead of above,
    so p exactly on a centre takes the slope of the interval above it (MONAI's ``SoftL1ACELoss(right=True)``)."""
    c = centres(m)
    if m == 1 or (p < c[0] if right else p <= c[0]):
        return [(0, 1.0, 0.0)]
    if p >= c[m - 1] if right else p > c[m - 1]:
        return [(m - 1, 1.0, 0.0)]
    for j in range(m - 1):
        if (c[j] <= p < c[j + 1]) if right else (c[j] < p <= c[j + 1]):
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
                members = soft_weights(pv, m, right) if soft else [(hard_bin(pv, m, right), 1.0, 0.0)]
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
    """mL1-ACE value and its gradient w.r.t. x (same shape as x) per docs/usage.md "Semantics", in float64."""
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
                members = soft_weights(pv, m, right) if soft else [(hard_bin(pv, m, right), 1.0, 0.0)]
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
    x, target, *, num_bins=20, include_background=True, to_onehot_y=False, act=None, ignore_index=None, right=False
):
    """(ece, ace, mce) each (B, C') float64, NaN where no voxel; include_background defaults to True like calibops."""
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


# ---------------------------------------------------------------------------------------------------------
# Kernel ops of contract v2 (docs/kernel_contract.md), entry by entry
# ---------------------------------------------------------------------------------------------------------
def _activate_rule(x: np.ndarray, act: int) -> np.ndarray:
    """p [B, C, N] float64 from x by activation id (0 none, 1 softmax over dim 1, 2 sigmoid). NumPy's float64
    arithmetic yields NaN exactly where the contract's non-finite rule says p is non-finite: softmax of a NaN or
    +inf logit (inf - inf) or of an all -inf voxel, sigmoid of NaN; sigmoid(+-inf) = 1 / 0."""
    with np.errstate(all="ignore"):
        if act == 1:
            if x.shape[1] == 0:
                return x.copy()
            m = x.max(axis=1, keepdims=True)
            e = np.exp(x - m)
            return e / e.sum(axis=1, keepdims=True)
        if act == 2:
            return 1.0 / (1.0 + np.exp(-x))
        return x.copy()


def membership(q: float, edges_: np.ndarray, m: int, scheme: int, right: bool) -> list[tuple[int, float, float]]:
    """[(bin, weight, d weight / d q)] of a finite q: the contract's (j, w, dw) expanded to its one or two bins.

    ``edges_`` are the op's float32 ``edges`` argument as float64: the M + 1 hard edges or the M soft centres.
    """
    if scheme == 0:
        inner = edges_[1 : m + 1]
        j = int(np.sum(inner <= q)) if right else int(np.sum(inner < q))
        return [(min(j, m - 1), 1.0, 0.0)]
    c = edges_
    t = (int(np.sum(c <= q)) if right else int(np.sum(c < q))) - 1  # right: an exact centre takes the interval above
    if m == 1 or t == -1:
        return [(0, 1.0, 0.0)]
    if t == m - 1:
        return [(m - 1, 1.0, 0.0)]
    d = c[t + 1] - c[t]
    w = (c[t + 1] - q) / d
    return [(t, w, -1.0 / d), (t + 1, 1.0 - w, 1.0 / d)]


def _entries(x, target, c_, act, target_kind, mode, ignore_index):
    """(p [B, C, N], list of entries (b, k, i, cls, q, ys), bad [2]). An entry's ``cls`` is the class its
    probability q belongs to (marginal: k; top-label: the argmax a), ``ys`` its R targets."""
    b_, _, n_ = x.shape
    p = _activate_rule(x, act)
    entries = []
    bad = [0, 0]
    if c_ == 0:
        return p, entries, bad
    for b in range(b_):
        for i in range(n_):
            if target_kind == 0:
                labs = [int(v) for v in target[b, :, i]]
                used = True
                for lab in labs:
                    if ignore_index is not None and lab == ignore_index:
                        used = False
                    elif not 0 <= lab < c_:
                        used = False
                        bad[0] += 1
                if not used:
                    continue
            col = p[b, :, i]
            finite = [bool(np.isfinite(v)) for v in col]
            bad[1] += finite.count(False)

            if target_kind == 0:
                ys_of = [[1.0 if lab == c else 0.0 for lab in labs] for c in range(c_)]
            else:
                ys_of = [[float(target[b, c, i])] for c in range(c_)]
            if mode == 0:
                for c in range(c_):
                    if finite[c]:
                        entries.append((b, c, i, c, float(col[c]), ys_of[c]))
            elif all(finite):
                a = 0
                for c in range(1, c_):  # scan upwards, replace only on a strictly larger p: ties to the lowest index
                    if col[c] > col[a]:
                        a = c
                entries.append((b, 0, i, a, float(col[a]), ys_of[a]))
    return p, entries, bad


def op_forward(x, target, edges_, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right):
    """The forward op: (count, sum_p, sum_y, sum_p2, sum_py, bad) as float64 arrays (bad int64)."""
    x = np.asarray(x, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64 if target_kind == 1 else np.int64)
    edges_ = np.asarray(edges_, dtype=np.float64)
    b_, c_, _ = x.shape
    m = num_bins
    r_ = target.shape[1] if target_kind == 0 else 1
    k_ = c_ if mode == 0 else 1
    cnt = np.zeros((b_, k_, m))
    sp = np.zeros((b_, k_, m))
    sy = np.zeros((b_, k_, r_, m))
    sp2 = np.zeros((b_, k_, m))
    spy = np.zeros((b_, k_, m))
    _, entries, bad = _entries(x, target, c_, activation, target_kind, mode, ignore_index)
    for b, k, _i, _cls, q, ys in entries:
        ybar = sum(ys) / len(ys)
        for j, w, _dw in membership(q, edges_, m, scheme, right):
            cnt[b, k, j] += w
            sp[b, k, j] += w * q
            for r, y in enumerate(ys):
                sy[b, k, r, j] += w * y
            sp2[b, k, j] += w * q * q
            spy[b, k, j] += w * q * ybar
    if not moments:
        sp2, spy = np.zeros(0), np.zeros(0)
    return cnt, sp, sy, sp2, spy, np.asarray(bad, dtype=np.int64)


def op_backward(
    grads, x, target, edges_, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right
):
    """d/dx of sum(count*Gc + sum_p*Gp + sum_y*Gy + sum_p2*Gp2 + sum_py*Gpy), [B, C, N] float64.

    Per entry, the product rule on each of its memberships (w, dw): d(w)/dq = dw, d(w q)/dq = w + q dw,
    d(w y_r)/dq = y_r dw, d(w q^2)/dq = 2 q w + q^2 dw, d(w q ybar)/dq = ybar (w + q dw); the entry's dq lands on
    its class (top-label: the argmax; the argmax itself is piecewise constant). Then the activation by hand:
    sigmoid p (1 - p), softmax p_c (g_c - sum_k p_k g_k) over the voxel; non-finite voxels stay 0.
    """
    gc, gp, gy, gp2, gpy = (np.asarray(g, dtype=np.float64) for g in grads)
    x = np.asarray(x, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64 if target_kind == 1 else np.int64)
    edges_ = np.asarray(edges_, dtype=np.float64)
    b_, c_, n_ = x.shape
    p, entries, _ = _entries(x, target, c_, activation, target_kind, mode, ignore_index)
    g_p = np.zeros_like(x)
    for b, k, i, cls, q, ys in entries:
        ybar = sum(ys) / len(ys)
        g = 0.0
        for j, w, dw in membership(q, edges_, num_bins, scheme, right):
            g += gc[b, k, j] * dw + gp[b, k, j] * (w + q * dw)
            g += sum(gy[b, k, r, j] * y for r, y in enumerate(ys)) * dw
            if moments:
                g += gp2[b, k, j] * (2 * q * w + q * q * dw) + gpy[b, k, j] * ybar * (w + q * dw)
        g_p[b, cls, i] += g
    out = np.zeros_like(x)
    for b in range(b_):
        for i in range(n_):
            col, gcol = p[b, :, i], g_p[b, :, i]
            if activation == 1:
                if np.all(np.isfinite(col)):
                    s = float(np.dot(col, gcol))
                    out[b, :, i] = col * (gcol - s)
            elif activation == 2:
                for c in range(c_):
                    if np.isfinite(col[c]):
                        out[b, c, i] = gcol[c] * col[c] * (1.0 - col[c])
            else:
                out[b, :, i] = gcol
    return out
