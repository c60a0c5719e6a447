"""Case builders and the one error budget of the backend-conformance tests (docs/kernel_contract.md, v2).

Every cross-backend comparison in the test suite goes through :func:`error_budget` and :func:`check`:
tests/test_conformance.py (every backend x mode x target kind x scheme x activation x moments x dtype x right),
tests/test_kinks.py, tests/test_nonfinite.py and tests/test_properties.py. A backend's outputs are compared with
the reference's (the reference itself with the float64 NumPy oracle, tests/_oracle.py).

Error budget, derived from the contract (tolerances are per element; 0 means "bitwise equal"):

1. **Exact.** ``bad`` always. Hard ``count``, and hard ``sum_y`` when every target is 0 or 1 (labels, bool or
   uint8 dense targets): sums of 0 / 1 are exact in float32 below 2^24 in any order, and the contract says every
   backend bins a given float32 probability identically (exactly on an edge too, ``right`` False and True), so
   from probabilities (activation 0) these must be bitwise equal. Gradients that are structurally zero (unused
   voxels, entries left out by the non-finite rule, top-label classes other than the argmax when the argmax is
   exact) must be exactly 0.
2. **Float32 accumulation.** A statistic slot sums at most ``n`` terms (``n`` = the row's used entries); any
   summation order in float32 is within ``(n - 1)·u·Σ|terms|`` (u = 2^-24), each term (a product) carries 2 more
   roundings and the reference rounds its float64 sum once: ``(n + 4)·u·A`` with ``A`` a bound on Σ|terms|:
   ``count·q_max^k`` (k = 0 count / sum_y, 1 sum_p / sum_py, 2 sum_p2; ``q_max = max(1, max |q|)`` of the row).
3. **Soft memberships** are computed in float32 (``(c[t+1] - q) / d``: a few roundings, ``<= 4u`` per weight);
   per entry ``8·eps32`` on its two bins, bounded by the row: ``8·eps32·n·q_max^k``.
4. **Activation (logits in).** The contract bounds a backend's ``p`` by ``δ = (C' + 8)·eps32·p_ref + 2^-126``
   (C' = C for softmax, 1 for sigmoid; ``p_ref`` = torch's float32 activation, the reference's). Away from kinks:
   hard ``sum_p`` moves by Σδ (``sum_p2`` by 2·q_max·Σδ, ``sum_py`` by Σδ); soft memberships by δ/d (d = the
   smallest centre spacing): every statistic by ``Σδ/d·q_max^k`` plus those terms.
5. **Kinks** (the contract's kink rule). An entry whose ``[q - δ, q + δ]`` contains an inner hard edge may land in
   either bin: each bin it can reach gets ``+1`` on count and sum_y (per rater), ``+|q|`` on sum_p / sum_py,
   ``+q²`` on sum_p2. Top-label: a voxel whose two largest ``p_ref`` are within ``2δ`` may pick either class, so
   its reachable bins get ``+1`` on sum_y and ``+|q|`` on sum_py. The gradient of such a voxel (also one within
   δ of a soft centre) may be either side's: ``+4·G_q`` (the jump of ``g_q`` is at most ``2·G_q``, doubled by the
   softmax chain rule), with ``G_q`` the bound of item 6. Activation 0 has δ = 0: no allowance at all.
6. **Gradients.** ``g_q`` (the contract's backward formula) is bounded per (image, row) by ``G_q = 2·[|Gc|·D +
   |Gp|·(1 + q_max·D) + Σ_r|Gy_r|·D + |Gp2|·(2q_max + q_max²·D) + |Gpy|·(1 + q_max·D)]`` (row maxima of each
   gradient; ``D = 1/d`` soft, 0 hard) and its slope in q by ``L = 2·[2|Gp|·D + |Gp2|·(2 + 4q_max·D) +
   2|Gpy|·D]``. Float32 arithmetic: ``16·eps32·G_q`` (softmax: ``(C + 16)·eps32·2·G_q`` over the voxel's rows);
   activation error: ``δ·(3·G_q + 2·L)`` (sigmoid) or ``δ_voxel·((C + 2)·G_q + 2·L)`` (softmax); rounding the
   result to the input dtype: ``GRAD_RTOL[dtype]·|g_ref| + GRAD_TINY[dtype]`` (one ulp of float16 / bfloat16:
   two roundings of values a few float32 ulps apart land at most one output ulp apart).

Bugs show up as O(1) relative errors (a wrong bin, a missing term, a wrong class), orders of magnitude above
these bounds on the small problems used here (a few hundred entries per row).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import _oracle

EPS32 = 2.0**-23
U32 = 2.0**-24
TINY = 2.0**-126
OUTPUTS = ("count", "sum_p", "sum_y", "sum_p2", "sum_py")
ACT_NAMES = {0: "none", 1: "softmax", 2: "sigmoid"}
SCHEME_NAMES = {0: "hard", 1: "soft"}
MODE_NAMES = {0: "marginal", 1: "top_label"}
GRAD_RTOL = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GRAD_TINY = {torch.float32: 2.0**-148, torch.float64: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-132}
SIGNED_LABELS = (torch.int8, torch.int16, torch.int32, torch.int64)


@functools.lru_cache(maxsize=128)
def edges_for(num_bins: int, scheme: int) -> torch.Tensor:
    """The contract's float32 edges: hard ``linspace(0, 1 + eps32, M + 1)``, soft centres
    ``linspace(0, 1 + eps32, 2M + 1)[1::2]``."""
    if scheme == 1:
        return torch.linspace(0.0, 1.0 + EPS32, 2 * num_bins + 1, dtype=torch.float32)[1::2].contiguous()
    return torch.linspace(0.0, 1.0 + EPS32, num_bins + 1, dtype=torch.float32)


@dataclass(frozen=True)
class Case:
    """One kernel-op problem: the op's arguments (edges from the contract) and a name for messages."""

    input: torch.Tensor
    target: torch.Tensor
    num_bins: int
    scheme: int = 0
    activation: int = 0
    target_kind: int = 0
    mode: int = 0
    moments: bool = False
    ignore_index: int | None = None
    right: bool = False
    name: str = ""

    @property
    def edges(self) -> torch.Tensor:
        return edges_for(self.num_bins, self.scheme)

    def args(self) -> tuple:
        """The forward op's arguments, in order."""
        return (
            self.input,
            self.target,
            self.edges,
            self.num_bins,
            self.scheme,
            self.activation,
            self.target_kind,
            self.mode,
            self.moments,
            self.ignore_index,
            self.right,
        )

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(B, C, N, R, K)."""
        B, C, N = (int(s) for s in self.input.shape)
        R = int(self.target.shape[1]) if self.target_kind == 0 else 1
        return B, C, N, R, (C if self.mode == 0 else 1)

    def describe(self) -> str:
        B, C, N, R, _ = self.shape
        tk = f"labels R={R} {self.target.dtype}" if self.target_kind == 0 else f"dense {self.target.dtype}"
        return (
            f"[{self.name}] B={B} C={C} N={N} M={self.num_bins} {MODE_NAMES[self.mode]} {tk} "
            f"{SCHEME_NAMES[self.scheme]} act={ACT_NAMES[self.activation]} moments={self.moments} "
            f"{self.input.dtype} right={self.right} ignore_index={self.ignore_index}"
        )


# ---------------------------------------------------------------------------------------------------------
# Case builders
# ---------------------------------------------------------------------------------------------------------
def kink_values(num_bins: int) -> torch.Tensor:
    """Every hard edge and soft centre of ``num_bins`` (float32), each also one float32 step above and below,
    plus p = 0, p = 1 and two finite values outside [0, 1] (binned to the first / last bin)."""
    k = torch.cat([edges_for(num_bins, 0), edges_for(num_bins, 1)])
    up = torch.nextafter(k, torch.full_like(k, 2.0))
    down = torch.nextafter(k, torch.full_like(k, -1.0))
    return torch.cat([k, up, down, torch.tensor([0.0, 1.0, 0.0, 1.0, -0.25, 1.25])])


def make_case(
    *,
    B: int = 2,
    C: int = 3,
    N: int = 37,
    R: int = 1,
    M: int = 7,
    scheme: int = 0,
    activation: int = 0,
    target_kind: int = 0,
    mode: int = 0,
    moments: bool = False,
    dtype: torch.dtype = torch.float32,
    right: bool = False,
    ignore_index: int | None = -1,
    label_dtype: torch.dtype = torch.int64,
    dense_dtype: torch.dtype = torch.float32,
    specials: bool = True,
    nonfinite: bool = True,
    seed: int = 0,
    name: str = "random",
) -> Case:
    """A random problem with the contract's special values sprinkled in (``specials``):

    - probabilities (activation 0): exactly on hard edges and soft centres and one float32 step either side, p = 0,
      p = 1, finite values outside [0, 1], exact top-label ties between two classes (lowest index wins);
    - logits: exact ties (equal logits), p = 1 (one logit +60, sigmoid +inf), p = 0 (-inf), sigmoid logits of the
      kinks (p within a few ulps of an edge / centre);
    - ``nonfinite``: NaN, +inf, -inf entries;
    - labels: ignored entries (``ignore_index``, per rater), out-of-range labels (>= C, and < 0 for signed dtypes),
      an empty class (class C - 1 never labelled when C >= 3, marginal mode), raters that mostly agree, and in
      top-label mode labels equal to the argmax half of the time (so "correct" is not rare);
    - dense targets: uniform values with exact 0 and 1, or 0 / 1 for bool / uint8.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    def randint(lo, hi, shape):
        return torch.randint(lo, hi, shape, generator=g)

    if activation == 0:
        x = torch.softmax(torch.randn(B, C, N, generator=g) * 3, 1) if C > 1 else rand(B, C, N)
        if specials and x.numel():
            kv = kink_values(M)
            x = torch.where(rand(B, C, N) < 0.3, kv[randint(0, kv.numel(), (B, C, N))], x)
            if C >= 2:
                for b, i in (rand(B, N) < 0.15).nonzero().tolist():
                    lo = int(randint(0, C - 1, (1,)))
                    hi = int(randint(lo + 1, C, (1,)))
                    v = x[b, :, i].max() if float(rand(1)) < 0.7 else kv[int(randint(0, kv.numel(), (1,)))]
                    x[b, lo, i] = x[b, hi, i] = v
    else:
        x = torch.randn(B, C, N, generator=g) * 3
        if specials and x.numel():
            if activation == 1 and C >= 2:
                for b, i in (rand(B, N) < 0.15).nonzero().tolist():
                    lo = int(randint(0, C - 1, (1,)))
                    hi = int(randint(lo + 1, C, (1,)))
                    x[b, lo, i] = x[b, hi, i] = x[b, :, i].max() + float(rand(1))
                sure = rand(B, C, N) < 0.03
                x = torch.where(sure, torch.full_like(x, 60.0), x)
                x = torch.where(rand(B, C, N) < 0.03, torch.full_like(x, -float("inf")), x)
            if activation == 2:
                kv = kink_values(M)
                kv = kv[(kv > 0) & (kv < 1)].double()
                logit = torch.log(kv / (1 - kv)).float()
                x = torch.where(rand(B, C, N) < 0.2, logit[randint(0, logit.numel(), (B, C, N))], x)
                ext = torch.tensor([60.0, -60.0, float("inf"), -float("inf")])
                x = torch.where(rand(B, C, N) < 0.05, ext[randint(0, 4, (B, C, N))], x)
    if nonfinite and x.numel():
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x = torch.where(rand(B, C, N) < 0.04, vals[randint(0, 3, (B, C, N))], x)
    x = x.to(dtype)

    if target_kind == 0:
        n_cls = C - 1 if (specials and C >= 3 and mode == 0) else max(C, 1)
        t = randint(0, n_cls, (B, 1, N)).expand(B, R, N).clone()
        if R > 1:
            t = torch.where(rand(B, R, N) < 0.3, randint(0, n_cls, (B, R, N)), t)
        if mode == 1 and C > 0:
            a = x.float().nan_to_num(0.0).argmax(1, keepdim=True).expand(B, R, N)
            t = torch.where(rand(B, R, N) < 0.5, a, t)
        if specials:
            if ignore_index is not None:
                t = torch.where(rand(B, R, N) < 0.1, torch.full_like(t, ignore_index), t)
            bad = [C, C + 3] + ([-2] if label_dtype in SIGNED_LABELS and ignore_index != -2 else [])
            bad = torch.tensor([v for v in bad if v != ignore_index])
            t = torch.where(rand(B, R, N) < 0.04, bad[randint(0, bad.numel(), (B, R, N))], t)
        t = t.to(label_dtype)
    else:
        if dense_dtype in (torch.bool, torch.uint8):
            t = (rand(B, C, N) < 0.4).to(dense_dtype)
        else:
            t = rand(B, C, N)
            if specials:
                t = torch.where(rand(B, C, N) < 0.15, torch.zeros_like(t), t)
                t = torch.where(rand(B, C, N) < 0.15, torch.ones_like(t), t)
            t = t.to(dense_dtype)
    return Case(x, t, M, scheme, activation, target_kind, mode, moments, ignore_index, right, name)


def exact_kink_case(M: int, scheme: int, right: bool, mode: int = 0, target_kind: int = 0, R: int = 1) -> Case:
    """Probabilities (activation 0) exactly on every edge and centre of M and one float32 step either side, p = 0
    and p = 1, in class 0 of C = 3; classes 1, 2 hold p/2 and p/4 (class 0 is the top label, ties at p = 0)."""
    p = kink_values(M)
    x = torch.stack([p, p * 0.5, p.flip(0) * 0.25]).unsqueeze(0).contiguous()
    N = x.shape[-1]
    if target_kind == 0:
        t = torch.stack([(torch.arange(N) + r) % 3 for r in range(R)]).unsqueeze(0)
    else:
        t = (torch.arange(3 * N).view(1, 3, N) % 5 == 0).float()
    return Case(x, t, M, scheme, 0, target_kind, mode, False, None, right, f"exact kinks M={M}")


def nonfinite_case(
    *,
    B: int,
    C: int,
    N: int,
    M: int,
    scheme: int,
    activation: int,
    target_kind: int,
    mode: int,
    dtype: torch.dtype = torch.float32,
    right: bool = False,
    seed: int = 0,
) -> Case:
    """A random problem (R = 1, moments on, ignore_index -1) with NaN / +-inf entries and these fixed voxels:
    0: NaN in class 0 of an ignored voxel (labels) / a counted one (dense); 1: +inf in an out-of-range voxel
    (labels) / a counted one (dense); for softmax also 2: one -inf logit (finite p = 0) and 3: every logit -inf
    (every p NaN)."""
    case = make_case(
        B=B,
        C=C,
        N=N,
        R=1,
        M=M,
        scheme=scheme,
        activation=activation,
        target_kind=target_kind,
        mode=mode,
        moments=True,
        dtype=torch.float32,
        right=right,
        ignore_index=-1,
        seed=seed,
        name="non-finite",
    )
    x, t = case.input.clone(), case.target.clone()
    nan, inf = float("nan"), float("inf")
    x[:, 0, 0] = nan
    x[:, 0, 1] = inf
    if activation == 1 and C > 1 and N > 3:
        x[:, :, 2] = torch.randn(B, C, generator=torch.Generator().manual_seed(seed))
        x[:, 0, 2] = -inf
        x[:, :, 3] = -inf
    if target_kind == 0:
        t[:, :, 0], t[:, :, 1] = -1, C
        if N > 3:
            t[:, :, 2:4] = 0
    return with_(case, input=x.to(dtype), target=t)


def near_kink_logits_case(
    activation: int, M: int, scheme: int, mode: int = 0, seed: int = 0, n_random: int = 40
) -> Case:
    """Logits whose float32 reference probabilities sit on / within a few ulps of each kink (inner hard edges or
    soft centres), plus ``n_random`` random voxels; labels, R = 1. Sigmoid: C = 1, x = logit(v) and its float32
    neighbours (1 and 2 steps either way). Softmax: C = 3, x = (a, 0, b) with softmax(x)[0] = v (top-label:
    b = 0, only kinks above 1/3 + 0.01, so class 0 is the top label)."""
    g = torch.Generator().manual_seed(seed)
    kinks = (edges_for(M, 1) if scheme == 1 else edges_for(M, 0)[1:-1]).double()
    v = kinks[(kinks > 0) & (kinks < 1)]
    if activation == 1 and mode == 1:
        v = v[v > 1 / 3 + 0.01]
    if activation == 2:
        x0 = torch.log(v / (1 - v)).float().view(1, -1)
    else:
        b = torch.zeros_like(v) if mode == 1 else torch.randn(v.numel(), generator=g, dtype=torch.float64)
        a = torch.log(v * (1 + b.exp()) / (1 - v))
        x0 = torch.stack([a, torch.zeros_like(a), b]).float()
    cols = [x0]
    for steps in (1, 2, -1, -2):  # neighbouring float32 logits of class 0
        xn = x0.clone()
        for _ in range(abs(steps)):
            xn[0] = torch.nextafter(xn[0], torch.full_like(xn[0], float("inf") if steps > 0 else -float("inf")))
        cols.append(xn)
    C = x0.shape[0]
    cols.append(torch.randn(C, n_random, generator=g) * 3)
    x = torch.cat(cols, dim=-1).unsqueeze(0).contiguous()
    N = x.shape[-1]
    t = torch.randint(0, C, (1, 1, N), generator=g)
    return Case(x, t, M, scheme, activation, 0, mode, True, None, False, "logits near kinks")


def make_grads(
    case: Case,
    seed: int = 0,
    scale: float = 1.0,
    only: str | None = None,
    rater: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Random float32 gradients for the five outputs (``[0]`` for the moments when off), times ``scale``;
    ``only`` keeps one output's gradient (others zero), ``rater`` keeps one rater's slice of ``grad_sum_y``."""
    B, _, _, R, K = case.shape
    M = case.num_bins
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "count": (B, K, M),
        "sum_p": (B, K, M),
        "sum_y": (B, K, R, M),
        "sum_p2": (B, K, M) if case.moments else (0,),
        "sum_py": (B, K, M) if case.moments else (0,),
    }
    out = []
    for name in OUTPUTS:
        v = torch.randn(*shapes[name], generator=gen) * scale
        if only is not None and name != only:
            v = torch.zeros_like(v)
        if name == "sum_y" and rater is not None:
            keep = torch.zeros(1, 1, R, 1)
            keep[:, :, rater] = 1.0
            v = v * keep
        out.append(v.contiguous())
    return tuple(out)


def with_(case: Case, **kw) -> Case:
    """A copy of ``case`` with fields replaced."""
    return replace(case, **kw)


# ---------------------------------------------------------------------------------------------------------
# The error budget
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """Per-element tolerances: ``stats`` for the five statistics (float64, the outputs' shapes), ``grad`` for the
    input gradient ([B, C, N] float64, or None); ``uncertain`` counts the entries the kink rule applies to."""

    stats: tuple[torch.Tensor, ...]
    grad: torch.Tensor | None
    uncertain: int


def _activate32(x: torch.Tensor, act: int) -> torch.Tensor:
    x = x.float()
    if act == 1:
        return torch.softmax(x, 1) if x.shape[1] else x
    if act == 2:
        return torch.sigmoid(x)
    return x


def _hard_bin(v: torch.Tensor, edges: torch.Tensor, M: int, right: bool) -> torch.Tensor:
    return torch.searchsorted(edges[1:].double().contiguous(), v.contiguous(), right=right).clamp(max=M - 1)


def _used_voxels(case: Case) -> torch.Tensor:
    B, C, N, _, _ = case.shape
    if case.target_kind == 1:
        return torch.ones(B, N, dtype=torch.bool)
    t = case.target.long()
    ok = (t >= 0) & (t < C)
    if case.ignore_index is not None:
        ok &= t != case.ignore_index
    return ok.all(1)


def error_budget(
    case: Case,
    ref: tuple[torch.Tensor, ...],
    grads: tuple[torch.Tensor, ...] | None = None,
    ref_grad: torch.Tensor | None = None,
) -> Budget:
    """Tolerances for comparing a backend's outputs on ``case`` with ``ref`` (the reference's, or the oracle's),
    derived from the contract as the module docstring states. ``grads`` / ``ref_grad``: the backward's gradient
    arguments and the reference gradient (both or neither)."""
    B, C, N, R, K = case.shape
    M, scheme, act = case.num_bins, case.scheme, case.activation
    f64 = torch.float64
    if B * C * N == 0:  # no entry: every statistic and gradient is exactly zero
        shapes = [(B, K, M), (B, K, M), (B, K, R, M)] + [(B, K, M) if case.moments else (0,)] * 2
        z = tuple(torch.zeros(s, dtype=f64) for s in shapes)
        return Budget(z, torch.zeros(B, C, N, dtype=f64) if grads is not None else None, 0)
    edges = case.edges.double()
    p = _activate32(case.input, act).double()  # [B, C, N], the reference's float32 p
    finite = torch.isfinite(p)
    used = _used_voxels(case)
    vox_finite = finite.all(1)
    pz = torch.where(finite, p, torch.zeros((), dtype=f64))
    if act == 0:
        delta = torch.zeros_like(pz)
    else:
        delta = ((C if act == 1 else 1) + 8) * EPS32 * pz.abs() + TINY
    dvox = delta.amax(1)  # [B, N]

    # entries [B, K, N]: q, validity, δ, top-label ties
    if case.mode == 0:
        q, valid, dq = pz, used.unsqueeze(1) & finite, delta
        tie = torch.zeros(B, K, N, dtype=torch.bool)
        argmax = None
    else:
        valid = (used & vox_finite).unsqueeze(1)
        top2 = pz.topk(min(2, C), dim=1).values
        q = top2[:, :1]
        second = top2[:, 1:2] if C >= 2 else torch.full_like(q, -float("inf"))
        argmax = pz.argmax(1)  # ties: the first maximal value (lowest index), as the contract
        dq = dvox.unsqueeze(1)
        tie = valid & (q - second <= 2 * dq) & (act != 0)
    q = torch.where(valid, q, torch.zeros((), dtype=f64))
    dq = torch.where(valid, dq, torch.zeros((), dtype=f64))
    qabs = q.abs()
    qmax = qabs.amax(-1, keepdim=True).clamp(min=1.0)  # [B, K, 1]
    n_row = valid.sum(-1, keepdim=True).to(f64)  # [B, K, 1]
    s_delta = dq.sum(-1, keepdim=True)

    # where an uncertain entry can land: hard bins of q -+ δ, soft bins (t, t + 1) of q -+ δ
    if scheme == 0:
        j_lo, j_hi = _hard_bin(q - dq, edges, M, False), _hard_bin(q + dq, edges, M, True)
        near = valid & (act != 0) & (j_lo != j_hi)
        reach = [j_lo, j_hi]
    else:
        t_lo = torch.searchsorted(edges.contiguous(), (q - dq).contiguous(), right=False) - 1
        t_hi = torch.searchsorted(edges.contiguous(), (q + dq).contiguous(), right=True) - 1
        near = valid & (act != 0) & (t_lo != t_hi) & (M > 1)
        reach = [(t + s).clamp(0, M - 1) for t in (t_lo, t_hi) for s in (0, 1)]
    touch = torch.zeros(B, K, N, M, dtype=torch.bool)
    for j in reach:
        touch |= torch.nn.functional.one_hot(j.clamp(0, M - 1), M).bool()
    hard_near = near if scheme == 0 else torch.zeros_like(near)

    def spread(weight: torch.Tensor) -> torch.Tensor:  # Σ_i weight_i over the bins entry i can reach: [B, K, M]
        return (touch.to(f64) * weight.to(f64).unsqueeze(-1)).sum(2)

    ex_count = spread(hard_near)
    ex_y = spread(hard_near | tie)
    ex_p = spread(hard_near * qabs)
    ex_p2 = spread(hard_near * qabs * qabs)
    ex_py = spread((hard_near | tie) * qabs)

    mult = (1.0, qmax, 1.0, qmax * qmax, qmax)
    count_ref = ref[0].detach().cpu().to(f64).abs() + ex_count  # [B, K, M]
    acc = [(n_row + 4) * U32 * count_ref * m for m in mult]
    if scheme == 1:
        inv_d = 1.0 / float((edges[1:] - edges[:-1]).min()) if M > 1 else 0.0
        memb = [8 * EPS32 * n_row * m for m in mult]
        act_t = [s_delta * inv_d * m for m in mult]
    else:
        inv_d = 0.0
        memb = [torch.zeros(B, K, 1, dtype=f64)] * 5
        act_t = [torch.zeros(B, K, 1, dtype=f64)] * 5
    act_t[1] = act_t[1] + s_delta
    act_t[3] = act_t[3] + 2 * qmax * s_delta
    act_t[4] = act_t[4] + s_delta
    extra = (ex_count, ex_p, ex_y, ex_p2, ex_py)
    binary_y = case.target_kind == 0 or case.target.dtype in (torch.bool, torch.uint8)
    tols = []
    for k, name in enumerate(OUTPUTS):
        exact = scheme == 0 and (name == "count" or (name == "sum_y" and binary_y))
        tol = extra[k] + (0.0 if exact else acc[k] + memb[k] + act_t[k])
        if name == "sum_y":
            tol = tol.unsqueeze(2).expand(B, K, R, M)
        if name in ("sum_p2", "sum_py") and not case.moments:
            tol = torch.zeros(0, dtype=f64)
        tols.append(tol.contiguous())
    uncertain = int((near | tie).sum())

    gtol = None
    if grads is not None:
        assert ref_grad is not None
        gtol = _grad_budget(
            case,
            grads,
            ref_grad,
            qmax.squeeze(-1),
            inv_d,
            delta,
            dvox,
            near | tie,
            used,
            finite,
            vox_finite,
            argmax,
            tie,
        )
    return Budget(tuple(tols), gtol, uncertain)


def _grad_budget(case, grads, ref_grad, qmax, inv_d, delta, dvox, uncertain, used, finite, vox_finite, argmax, tie):
    """Item 6 of the module docstring, plus the structural zeros of item 1 and the kink allowance of item 5."""
    B, C, N, R, K = case.shape
    f64 = torch.float64
    act = case.activation
    gc, gp, gy, gp2, gpy = (g.detach().cpu().to(f64).abs() for g in grads)

    def rowmax(g):  # [B, K]
        return g.amax(-1) if g.numel() else torch.zeros(B, K, dtype=f64)

    a_c, a_p = rowmax(gc), rowmax(gp)
    a_y = gy.amax(-1).sum(-1) if gy.numel() else torch.zeros(B, K, dtype=f64)
    a_p2 = rowmax(gp2) if case.moments else torch.zeros(B, K, dtype=f64)
    a_py = rowmax(gpy) if case.moments else torch.zeros(B, K, dtype=f64)
    D = inv_d
    Gq = 2 * (a_c * D + a_p * (1 + qmax * D) + a_y * D + a_p2 * (2 * qmax + qmax * qmax * D) + a_py * (1 + qmax * D))
    L = 2 * (2 * a_p * D + a_p2 * (2 + 4 * qmax * D) + 2 * a_py * D)
    if case.mode == 0:
        Gq_e, L_e = Gq.unsqueeze(-1).expand(B, C, N), L.unsqueeze(-1).expand(B, C, N)
        unc_e = uncertain
    else:
        Gq_e, L_e = Gq.expand(B, C).unsqueeze(-1).expand(B, C, N), L.expand(B, C).unsqueeze(-1).expand(B, C, N)
        unc_e = uncertain.expand(B, C, N)
    Gq_img = Gq.amax(1).view(B, 1, 1)
    L_img = L.amax(1).view(B, 1, 1)
    if act == 1:
        tol = (C + 16) * EPS32 * 2 * Gq_img + dvox.unsqueeze(1) * ((C + 2) * Gq_img + 2 * L_img)
        unc_v = uncertain.any(1, keepdim=True) if case.mode == 0 else uncertain
        tol = tol + unc_v * 4 * Gq_img
    else:
        d_e = delta if case.mode == 0 else dvox.unsqueeze(1)
        tol = 16 * EPS32 * Gq_e + (d_e * (3 * Gq_e + 2 * L_e) if act == 2 else 0.0)
        tol = tol + unc_e * 4 * Gq_e
    dt = case.input.dtype
    tol = tol + GRAD_RTOL[dt] * ref_grad.detach().cpu().to(f64).abs() + GRAD_TINY[dt]
    # structural zeros
    zero = ~used.unsqueeze(1).expand(B, C, N)
    if act == 1 or case.mode == 1:
        zero = zero | ~vox_finite.unsqueeze(1)
    else:
        zero = zero | ~finite
    if case.mode == 1 and act != 1 and argmax is not None:
        other = torch.arange(C).view(1, C, 1) != argmax.unsqueeze(1)
        zero = zero | (other & ~tie.expand(B, C, N))
    return torch.where(zero, torch.zeros((), dtype=f64), tol.expand(B, C, N))


# ---------------------------------------------------------------------------------------------------------
# Running a backend and checking it
# ---------------------------------------------------------------------------------------------------------
def oracle_outputs(case: Case, grads: tuple[torch.Tensor, ...] | None = None):
    """The float64 NumPy oracle's forward outputs (torch float64, bad int64) and, with ``grads``, its gradient."""
    x = case.input.detach().double().numpy()
    t = case.target.long().numpy() if case.target_kind == 0 else case.target.double().numpy()
    e = case.edges.double().numpy()
    opts = (case.num_bins, case.scheme, case.activation, case.target_kind, case.mode, case.moments)
    out = _oracle.op_forward(x, t, e, *opts, case.ignore_index, case.right)
    out = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in out)
    if grads is None:
        return out, None
    gnp = [g.double().numpy() for g in grads]
    g = _oracle.op_backward(gnp, x, t, e, *opts, case.ignore_index, case.right)
    return out, torch.from_numpy(g)


def _assert_within(what: str, name: str, got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> None:
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: {name} shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if got.numel() == 0:
        return
    a = got.detach().cpu().to(torch.float64)
    b = ref.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise AssertionError(f"{what}: {name} non-finite at {(~torch.isfinite(a)).nonzero()[:3].tolist()}")
    err = (a - b).abs()
    bad = err > tol
    if bool(bad.any()):
        ratio = torch.where(tol > 0, err / tol.clamp(min=1e-300), torch.where(bad, torch.inf, 0.0))
        idx = tuple(int(v) for v in torch.unravel_index(ratio.argmax(), ratio.shape))
        raise AssertionError(
            f"{what}: {name} outside the error budget at {int(bad.sum())} of {bad.numel()} elements; worst at "
            f"{idx}: got {float(a[idx])!r}, expected {float(b[idx])!r}, |diff| {float(err[idx]):.3g}, "
            f"budget {float(tol[idx]):.3g}"
        )


def check(
    case: Case,
    got: tuple[torch.Tensor, ...],
    ref: tuple[torch.Tensor, ...],
    budget: Budget,
    what: str,
    got_grad: torch.Tensor | None = None,
    ref_grad: torch.Tensor | None = None,
    op_outputs: bool = True,
) -> None:
    """Assert a backend's outputs (and gradient) against ``ref`` within ``budget``: shapes, dtypes, contiguity
    (``op_outputs``: the op's own outputs, not views the public layer made of them), ``bad`` bitwise, each
    statistic and the gradient elementwise."""
    assert len(got) == 6, f"{what}: {len(got)} outputs, the contract has 6"
    out_dtype = torch.float64 if case.input.dtype == torch.float64 else torch.float32
    for name, v in zip(OUTPUTS, got[:5]):
        assert v.dtype == out_dtype, f"{what}: {name} is {v.dtype}, expected {out_dtype}"
        assert v.is_contiguous() or not op_outputs, f"{what}: {name} is not contiguous"
    bad = got[5].cpu()
    assert bad.dtype == torch.int64 and tuple(bad.shape) == (2,), f"{what}: bad {bad.dtype} {tuple(bad.shape)}"
    assert bad.tolist() == ref[5].tolist(), f"{what}: bad {bad.tolist()} != expected {ref[5].tolist()}"
    for name, a, b, tol in zip(OUTPUTS, got[:5], ref[:5], budget.stats):
        _assert_within(what, name, a, b, tol)
    if got_grad is not None:
        assert got_grad.dtype == case.input.dtype, f"{what}: grad_input {got_grad.dtype} != {case.input.dtype}"
        _assert_within(what, "grad_input", got_grad, ref_grad, budget.grad)


def conform(backend, case: Case, grads: tuple[torch.Tensor, ...] | None = None) -> Budget:
    """Run ``backend`` (tests/_kernel_backends.py) on ``case`` and check it: kernel backends against the
    reference, the reference against the float64 oracle. Returns the budget used (for tests that inspect it)."""
    from . import _kernel_backends as kb

    args = case.args()
    got = tuple(v.cpu() for v in backend.forward(*args))
    got_grad = backend.backward(*grads, *args).cpu() if grads is not None else None
    if backend.name == "reference":
        ref, ref_grad = oracle_outputs(case, grads)
    else:
        ref = kb.backends()[0].forward(*args)
        ref_grad = kb.reference_backward(*grads, *args) if grads is not None else None
    budget = error_budget(case, ref, grads, ref_grad)
    check(case, got, ref, budget, f"{backend.name} {case.describe()}", got_grad, ref_grad)
    return budget
