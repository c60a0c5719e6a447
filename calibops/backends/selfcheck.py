"""The self-check of a kernel backend against the reference, per kernel specialisation, on first use.

``backend="auto"`` on a CUDA tensor uses a GPU kernel backend (``cuda``, ``triton``) only where it is known to
be right: its (backend, architecture) pair is in the record of ``calibops/backends/verified.json``, or this
self-check passed in the current process for the *specialisation* the call uses (:class:`Spec`: mode, binning,
activation, target kind and dtype, R = 1 or R > 1, moments, ``num_bins`` and the kernel regime it selects, the
class tile and chunking, input dtype, edge rule, ``ignore_index``). A bug that fires only in some specialisation
(uint8 label maps, ``num_bins != 20``, several raters, ...) is therefore checked on the first call that would
run it, not hidden behind a few fixed cases. :func:`check_spec` runs that check (cached per device, backend and
specialisation); :mod:`calibops.backends.resolve` decides with it. ``python -m calibops selfcheck`` runs the same
check for the fixed :data:`CASES` (six specialisations) of every available backend and prints a table.

What it runs (:func:`spec_case`): a synthetic problem of the specialisation, with the classes and raters of the
call that first used it, :data:`SPEC_B` = 3 images (image offsets past the first pair), several tiles per image
(2.5 of the widest Triton tile and 1.5 CUDA tiles, at least 300 voxels), out-of-range labels (C, C + 1, ... and
negative ones for signed dtypes; never ``ignore_index``), ``ignore_index`` entries, non-finite inputs (NaN,
+inf, one -inf logit, all -inf) so both ``bad`` counts are compared, and without an activation entries exactly on
inner hard edges (kernel and reference see the very same p there, so the edge rule is tested). Forward and
backward (random upstream gradients on every statistic, so ``grad_output != 1``) through the candidate's op with
its autograd formula, and through the reference on the CPU (pure PyTorch, float64 accumulation) from the very
same input values, read in the dtype under test.

Kinks cannot flip: every probability computed through an activation is at least :func:`kink_margin` (1e-4, a
tenth of a bin for more than 1000 bins) away from every inner hard edge and every soft centre (where the
statistics or their derivatives jump), computed in float64 from the input as quantised to the dtype under test,
and redrawn otherwise. A kernel's softmax/sigmoid differs from torch's by a few float32 ulps (< 1e-6), so both
sides put every voxel in the same bins and on the same linear piece.

Error budget (the rules of tests/test_cuda_backend.py and tests/test_triton_backend.py):

- hard counts: exact (they are integers; budget 0.5).
- statistics: ``stat_rtol(N) * (|ref| + ref_count)`` with ``stat_rtol(N) = max(2e-5, 1.25 (N - 1) 2^-24)``, a
  bound for any float32 summation order of N terms per (image, class) ((N - 1) * 2^-24 of the sum of the
  absolute terms, which |stat| + count bounds since p, y, w <= 1); soft binning adds
  ``8 * eps32 * (N + M * sqrt(N))`` (memberships computed in float32 from a p that may differ by a few ulps,
  times the slope M).
- gradients: per element ``GRAD_RTOL[dtype] * |ref| + 1e-5 * max|ref|`` (float32 1e-5; float16 2^-10 and
  bfloat16 2^-7: one rounding of the float32 gradient to the input dtype, doubled; the Triton interpreter
  converts float32 to bfloat16 by truncation, error < 1 ulp, so its bfloat16 ratios reach ~0.97 in tests,
  where compiled code rounds to nearest and stays near 0.5).
- ``bad`` (label and non-finite counts): exact.

The check passes when every quantity is within budget (ratio error / budget <= 1). It runs in a separate
thread, so none of the caller's thread-local state (grad mode, ``inference_mode``, autocast, saved-tensor hooks,
dispatch modes) reaches it, with warnings ignored (they would be about the synthetic problem); it synchronises
the device once, when it runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..contract import MODES, SCHEME_HARD, SCHEME_SOFT, TARGET_DENSE, TARGET_LABELS, OpCall
from ..reference import ACT_NONE, ACT_SIGMOID, ACT_SOFTMAX, bin_centres, bin_edges, binned_stats_prepared
from . import registry as _registry

__all__ = [
    "CASES",
    "Spec",
    "case_specialisation",
    "check_spec",
    "checked_specialisations",
    "example_call",
    "kink_margin",
    "spec_case",
    "spec_of",
    "stat_rtol",
    "DTYPES",
    "CaseResult",
    "SelfCheckResult",
    "SelfCheckWarning",
    "cached_result",
    "check",
    "device_arch",
    "device_name",
    "failure_message",
    "is_verified",
    "record_entry",
    "run_selfcheck",
    "write_record",
]

EPS32 = float(torch.finfo(torch.float32).eps)
STAT_RTOL = 2e-5
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
HARD_COUNT_BUDGET = 0.5
KINK_MARGIN = 1e-4
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUANTITIES = ("count", "sum_p", "sum_y", "grad")
_ACT = {"none": ACT_NONE, "softmax": ACT_SOFTMAX, "sigmoid": ACT_SIGMOID}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
REPORT_HINT = (
    "Please report it: open an issue on the calibops repository with the output of `python -m calibops` "
    "run on this machine"
)


class SelfCheckWarning(RuntimeWarning):
    """A kernel backend disagreed with the reference in its self-check; ``auto`` falls back."""


@dataclass(frozen=True)
class Case:
    """One self-check problem in the kernel layout: input [B, C, N], labels [B, R, N] or dense target [B, C, N]."""

    name: str
    B: int
    C: int
    N: int
    num_bins: int
    soft: bool
    activation: str
    labels: bool
    ignore_index: int | None = None
    bad_labels: int = 0
    right: bool = False
    mode: str = "marginal"  # or "top_label"
    raters: int = 1  # label maps per image (labels only)
    moments: bool = False
    target_dtype: torch.dtype | None = None  # labels: int64, dense: float32 when None
    nonfinite: int = 0  # voxels per image whose input is made non-finite (NaN, +-inf)
    exact_edges: int = 0  # entries per image put exactly on an inner hard edge (hard binning, probabilities)


# ------------------------------------------------------------------------------------------------------------
# kernel specialisations
# ------------------------------------------------------------------------------------------------------------

#: Classes per register tile of the Triton kernels (``launch.MAX_C_BLOCK``); more classes run chunked.
MAX_C_BLOCK = 32
#: ``num_bins`` above this run Triton's scatter kernel, else its register kernel (``launch.MAX_REGISTER_BINS``;
#: ``CALIBOPS_TRITON_MAX_REGISTER_BINS`` moves it, as in the launcher).
TRITON_MAX_REGISTER_BINS = 64
#: The CUDA backward keeps the gradient table (statistics x rows x bins, float32) in shared memory up to this
#: size, else reads it from global memory (``grads_in_smem`` of ``csrc/cuda/launchers.cuh``).
CUDA_SMEM_GRAD_BYTES = 32 * 1024
#: Images in every specialisation's problem (> 2: the image offsets beyond the first pair).
SPEC_B = 3
SPEC_NONFINITE = 4  # non-finite voxels per image (a NaN, +inf, one -inf and an all -inf voxel)
SPEC_BAD_LABELS = 4  # out-of-range label entries per problem (C, C + 1, ... and -1, -2 for signed dtypes)
SPEC_EXACT_EDGES = 3  # entries per image exactly on an inner hard edge (probabilities, hard binning)
SPEC_MIN_N = 300  # voxels per image at least (more than 256)
_ACT_NAMES = {ACT_NONE: "none", ACT_SOFTMAX: "softmax", ACT_SIGMOID: "sigmoid"}


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _triton_register_bins() -> int:
    import os

    raw = os.environ.get("CALIBOPS_TRITON_MAX_REGISTER_BINS", "").strip()
    return int(raw) if raw.isdigit() else TRITON_MAX_REGISTER_BINS


class Spec(NamedTuple):
    """One kernel specialisation: everything about an op call that selects different kernel code (and so can
    hide a bug that other calls never reach). ``backend="auto"`` self-checks each one on first use.

    The sizes enter only through the regimes they select: ``scatter`` (Triton's scatter kernel for
    ``num_bins`` above :data:`TRITON_MAX_REGISTER_BINS`, else the register kernel), ``cuda_global`` (the CUDA
    backward reads its gradient table from global memory, above :data:`CUDA_SMEM_GRAD_BYTES`), ``c_block``
    and ``chunked`` (the class tile, and softmax over several chunks of 32 classes), ``multi_rater`` (R > 1).
    ``num_bins`` itself is part of the key: it is a compile-time constant of the kernels, so each value is
    separately compiled code.
    """

    mode: int
    scheme: int
    activation: int
    target_kind: int
    target_dtype: torch.dtype
    multi_rater: bool
    moments: bool
    num_bins: int
    scatter: bool
    cuda_global: bool
    c_block: int
    chunked: bool
    dtype: torch.dtype  # the input as the kernel reads it
    right: bool
    ignore_index: int | None

    def describe(self) -> str:
        """A one-line name: ``marginal/hard/softmax/labels:int64/R=1/M=20:register+smem/C:1 chunk of 4/float32``."""
        parts = [
            "marginal" if self.mode == MODES["marginal"] else "top-label",
            "soft" if self.scheme == SCHEME_SOFT else "hard",
            _ACT_NAMES.get(self.activation, str(self.activation)),
            ("labels:" if self.target_kind == TARGET_LABELS else "dense:") + _dtype_name(self.target_dtype),
            "R>1" if self.multi_rater else "R=1",
            f"M={self.num_bins}:{'scatter' if self.scatter else 'register'}+{'global' if self.cuda_global else 'smem'}",
            f"C:chunks of {self.c_block}" if self.chunked else f"C:1 chunk of {self.c_block}",
            _dtype_name(self.dtype),
        ]
        if self.moments:
            parts.append("moments")
        if self.right:
            parts.append("right")
        if self.ignore_index is not None:
            parts.append(f"ignore={self.ignore_index}")
        return "/".join(parts)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "")


def spec_of(*call: object) -> Spec:
    """The specialisation of an op call (``call``: :data:`calibops.contract.OpCall`, the prepared layout)."""
    input, target, _, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right = OpCall(*call)
    C = int(input.shape[1])
    labels = target_kind == TARGET_LABELS
    R = int(target.shape[1]) if labels else 1
    c_block = min(_next_pow2(max(C, 1)), MAX_C_BLOCK)
    rows = C if mode == MODES["marginal"] else 1
    nstat = 2 + R + (2 if moments else 0)
    return Spec(
        mode=int(mode),
        scheme=int(scheme),
        activation=int(activation),
        target_kind=int(target_kind),
        target_dtype=target.dtype,
        multi_rater=R > 1,
        moments=bool(moments),
        num_bins=int(num_bins),
        scatter=int(num_bins) > _triton_register_bins(),
        cuda_global=nstat * rows * int(num_bins) * 4 > CUDA_SMEM_GRAD_BYTES,
        c_block=c_block,
        chunked=C > MAX_C_BLOCK,
        dtype=input.dtype,
        right=bool(right),
        ignore_index=None if ignore_index is None or not labels else int(ignore_index),
    )


def _tile_widths(spec: Spec, C: int, R: int) -> tuple[int, int]:
    """The widest tiles (voxels) of the GPU kernels for this specialisation: Triton's forward and backward
    ``BLOCK_N`` (calibops/backends/triton/launch.py), and the CUDA tile ``V`` (csrc/cuda/launchers.cuh)."""
    marginal = spec.mode == MODES["marginal"]
    c_block = spec.c_block
    if spec.scatter:
        k_block = c_block if marginal else 1
        w = 8
        while k_block * (2 * w) ** 2 <= 2048 and 2 * w <= 32:
            w *= 2
        fwd = w
    else:
        tile = 1024 if c_block <= 8 else 512
        if marginal and (R > 1 or spec.moments):
            tile //= 2
        fwd = max(16, min(tile // c_block, 1024))
    bwd = max(16, 1024 // c_block)
    v = 1024
    while v > 32 and (C * v > 4096 or R * v > 4096):
        v //= 2
    return max(fwd, bwd), v


def spec_case(spec: Spec, C: int, R: int = 1, name: str | None = None) -> Case:
    """The self-check problem of ``spec`` with ``C`` classes and ``R`` raters (those of the call that first
    used it): :data:`SPEC_B` images, several tiles per image (2.5 Triton tiles and 1.5 CUDA tiles, at least
    :data:`SPEC_MIN_N` voxels), the same ``num_bins``, label or dense target dtype, ``ignore_index`` and edge
    rule; out-of-range labels and non-finite inputs so both ``bad`` counts are checked; entries exactly on hard
    edges where the input is the probability."""
    labels = spec.target_kind == TARGET_LABELS
    R = R if labels else 1
    tt, v = _tile_widths(spec, C, R)
    N = max(SPEC_MIN_N, 2 * tt + tt // 2 + 3, v + v // 2 + 3)
    return Case(
        name or f"{spec.describe()} (C={C}, R={R})",
        B=SPEC_B,
        C=C,
        N=N,
        num_bins=spec.num_bins,
        soft=spec.scheme == SCHEME_SOFT,
        activation=_ACT_NAMES[spec.activation],
        labels=labels,
        ignore_index=spec.ignore_index,
        bad_labels=SPEC_BAD_LABELS if labels else 0,
        right=spec.right,
        mode="top_label" if spec.mode == MODES["top_label"] else "marginal",
        raters=R,
        moments=spec.moments,
        target_dtype=spec.target_dtype,
        nonfinite=SPEC_NONFINITE,
        exact_edges=SPEC_EXACT_EDGES,
    )


def example_call(
    C: int,
    *,
    R: int = 1,
    num_bins: int = 20,
    soft: bool = False,
    activation: str = "softmax",
    labels: bool = True,
    mode: str = "marginal",
    moments: bool = False,
    target_dtype: torch.dtype | None = None,
    dtype: torch.dtype = torch.float32,
    ignore_index: int | None = None,
    right: bool = False,
) -> tuple:
    """Kernel-contract arguments of a tiny call (one voxel, CPU) with these options: what :func:`spec_of`
    reads, for listing specialisations without data."""
    x = torch.zeros(1, C, 1, dtype=dtype)
    if labels:
        t = torch.zeros(1, R, 1, dtype=target_dtype or torch.int64)
    else:
        t = torch.zeros(1, C, 1, dtype=target_dtype or torch.float32)
    edges = (bin_centres if soft else bin_edges)(num_bins)
    return (
        x,
        t,
        edges,
        num_bins,
        SCHEME_SOFT if soft else SCHEME_HARD,
        {"none": ACT_NONE, "softmax": ACT_SOFTMAX, "sigmoid": ACT_SIGMOID}[activation],
        TARGET_LABELS if labels else TARGET_DENSE,
        MODES[mode],
        moments,
        ignore_index,
        right,
    )


_CASE_SPECS: dict[str, str] = {}  # fixed case name -> its specialisation's description


def _representative(name: str, C: int, R: int = 1, **kw) -> Case:
    spec = spec_of(*example_call(C, R=R, **kw))
    _CASE_SPECS[name] = f"{spec.describe()} (C={C}, R={R})"
    return spec_case(spec, C, R, name=name)


def case_specialisation(case: Case) -> str:
    """The specialisation a fixed case (:data:`CASES`) is the problem of, described; else the case's name."""
    return _CASE_SPECS.get(case.name, case.name)


# What ``python -m calibops selfcheck`` checks (each a specialisation's problem): together hard and soft
# binning, integer labels (int64 with ignore_index, uint8 as NIfTI label maps store them) and dense targets,
# softmax, sigmoid and probabilities, the chunked path for more than 32 classes, both edge rules, top-label
# statistics of three raters' label maps, several raters in marginal mode, Triton's scatter kernel, and the
# second moments. ``backend="auto"`` checks the specialisation each call actually uses instead.
CASES: tuple[Case, ...] = (
    _representative("hard/labels/softmax", 4, ignore_index=-100),
    _representative("soft/labels:uint8/softmax/C=40", 40, soft=True, target_dtype=torch.uint8, ignore_index=255),
    _representative("soft/dense/sigmoid/moments", 3, soft=True, activation="sigmoid", labels=False, moments=True),
    _representative("hard/dense/probabilities/right", 3, activation="none", labels=False, right=True),
    _representative(
        "hard/top-label/3 raters/softmax/moments", 5, R=3, mode="top_label", moments=True, ignore_index=255
    ),
    _representative("hard/labels/softmax/2 raters/M=100 (scatter)", 4, R=2, num_bins=100),
)


@dataclass(frozen=True)
class CaseResult:
    """Outcome of one case: ``ratio`` = worst error / budget over all quantities (> 1 fails)."""

    name: str
    ok: bool
    ratio: float
    quantity: str  # the quantity with the worst ratio ("sum_p", "grad", ...) or "raised"
    max_abs_error: float
    error: str | None = None  # the exception, when the candidate raised


@dataclass(frozen=True)
class SelfCheckResult:
    """Outcome of the self-check of one (backend, device, dtype)."""

    backend: str
    device: str
    arch: str
    dtype: torch.dtype
    ok: bool
    cases: tuple[CaseResult, ...]
    seconds: float
    error: str | None = None  # set when the check could not run at all
    card: str = field(default="")
    spec: Spec | None = None  # the specialisation checked (auto's first-use check), None for the fixed cases

    @property
    def worst(self) -> CaseResult | None:
        """The case with the largest error / budget ratio (a raising case counts as infinite)."""
        return max(self.cases, key=lambda c: c.ratio) if self.cases else None

    def describe(self) -> str:
        """What disagreed, in one line (or "all cases within budget")."""
        if self.error is not None:
            return f"the check could not run: {self.error}"
        bad = [c for c in self.cases if not c.ok]
        if not bad:
            w = self.worst
            return "all cases within budget" + (f" (worst {w.ratio:.2g}x, {w.name} {w.quantity})" if w else "")
        parts = []
        for c in bad:
            if c.error is not None:
                parts.append(f"case {c.name!r} raised {c.error}")
            elif math.isinf(c.ratio):  # NaN/inf values, a wrong shape or dtype, wrong bad counts
                what = c.quantity if c.quantity not in _QUANTITIES else f"{c.quantity} is NaN or infinite"
                parts.append(f"case {c.name!r}: {what}")
            else:
                parts.append(
                    f"case {c.name!r}: {c.quantity} off by {c.ratio:.3g}x its error budget "
                    f"(max abs error {c.max_abs_error:.3g})"
                )
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------------------------
# device facts and the record
# ------------------------------------------------------------------------------------------------------------


def normalize_device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit index for CUDA (the current device when none is given)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_arch(device: torch.device | str) -> str:
    """The GPU architecture of ``device`` as the record names it ("sm_90"; "gfx90a" on ROCm), else its type."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    if getattr(torch.version, "hip", None):
        return str(torch.cuda.get_device_properties(device).gcnArchName).split(":")[0]
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def device_name(device: torch.device | str) -> str:
    """The card's name for a CUDA device, else a description of the device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def is_verified(backend: str, arch: str, record: tuple[dict[str, str], ...] | None = None) -> bool:
    """True when (backend, arch) is in the record of verified GPU architectures (``verified.json``)."""
    entries = verified_record() if record is None else record
    return any(e.get("backend") == backend and e.get("arch") == arch for e in entries)


# ------------------------------------------------------------------------------------------------------------
# building the cases
# ------------------------------------------------------------------------------------------------------------


def _kinks(num_bins: int, soft: bool) -> torch.Tensor:
    """float64 points where the statistics (hard: inner edges) or their derivatives (soft: centres) jump."""
    if soft:
        return bin_centres(num_bins).double()
    return bin_edges(num_bins).double()[1:-1]


def kink_distance(p: torch.Tensor, kinks: torch.Tensor) -> torch.Tensor:
    """Distance of every entry of ``p`` (float64) to the nearest of the sorted ``kinks`` (inf without kinks;
    NaN for NaN entries), by binary search: O(log M) per entry, so many bins stay cheap."""
    if kinks.numel() == 0:
        return torch.full_like(p, math.inf)
    if kinks.numel() == 1:
        return (p - kinks[0]).abs()
    i = torch.searchsorted(kinks, p.contiguous()).clamp(1, kinks.numel() - 1)
    return torch.minimum((p - kinks[i - 1]).abs(), (p - kinks[i]).abs())


def _probs64(x: torch.Tensor, activation: str) -> torch.Tensor:
    x = x.double()
    if activation == "softmax":
        return torch.softmax(x, 1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def kink_margin(num_bins: int) -> float:
    """How far every probability is kept from a kink: :data:`KINK_MARGIN`, narrowed to a tenth of a bin width
    for many bins (at least 2e-6, still above the few float32 ulps an activation may differ by)."""
    return max(min(KINK_MARGIN, 0.1 / max(num_bins, 1)), 2e-6)


def _bad_label_values(case: Case, dtype: torch.dtype) -> list[int]:
    """``case.bad_labels`` label values outside [0, C), none equal to ``ignore_index``, all representable in
    ``dtype``: C, C + 1, ... and, for signed dtypes, alternately -1, -2, ..."""
    info = torch.iinfo(dtype)
    out: list[int] = []
    hi, lo = case.C, -1
    while len(out) < case.bad_labels and (hi <= info.max or lo >= info.min):
        for v, ok in ((hi, hi <= info.max), (lo, info.min < 0 and lo >= info.min)):
            if ok and v != case.ignore_index and len(out) < case.bad_labels:
                out.append(v)
        hi, lo = hi + 1, lo - 1
    return out


def _put_nonfinite(x: torch.Tensor, case: Case, g: torch.Generator) -> None:
    """Make ``case.nonfinite`` voxels of every image non-finite in place, cycling through the ways an input
    can be: a NaN entry, +inf, one -inf logit (softmax: p = 0, finite) and all -inf (softmax: NaN)."""
    B, C, N = x.shape
    k = min(case.nonfinite, N)
    for b in range(B):
        voxels = torch.randperm(N, generator=g, device="cpu")[:k].tolist()
        for j, n in enumerate(voxels):
            c = int(torch.randint(0, C, (1,), generator=g, device="cpu"))
            kind = j % 4
            if kind == 0:
                x[b, c, n] = float("nan")
            elif kind == 1:
                x[b, c, n] = float("inf")
            elif kind == 2:
                x[b, c, n] = float("-inf")
            else:
                x[b, :, n] = float("-inf")


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU input (in ``dtype``) and target of ``case``, every finite probability at least :func:`kink_margin`
    from a kink, except ``case.exact_edges`` entries per image put exactly on an inner hard edge (only without
    an activation, where kernel and reference see the very same p). A voxel that cannot be drawn away from the
    kinks (absurdly many bins) is made NaN: both sides leave it out and count it."""
    g = torch.Generator().manual_seed(seed)
    B, C, N = case.B, case.C, case.N

    def draw() -> torch.Tensor:
        z = torch.randn(B, C, N, generator=g, dtype=torch.float32, device="cpu") * 3
        if case.activation == "none":
            z = torch.softmax(z, 1) if C > 1 else torch.rand(B, C, N, generator=g, dtype=torch.float32, device="cpu")
        return z.to(dtype)

    kinks = _kinks(case.num_bins, case.soft)
    margin = kink_margin(case.num_bins)
    x = draw()
    near = torch.zeros(B, 1, N, dtype=torch.bool)
    for _ in range(100):
        p = _probs64(x, case.activation)
        near = (kink_distance(p, kinks) < margin).any(1, keepdim=True)  # [B, 1, N]
        if case.mode == "top_label" and C > 1:  # the argmax must not hang on rounding either
            top2 = p.topk(2, dim=1).values
            near = near | ((top2[:, :1] - top2[:, 1:]) < margin)
        if not bool(near.any()):
            break
        x = torch.where(near, draw(), x)
    if bool(near.any()):
        x = torch.where(near, torch.full((), float("nan"), dtype=dtype), x)
    if case.exact_edges and not case.soft and case.activation == "none" and case.num_bins > 1:
        inner = bin_edges(case.num_bins)[1:-1]  # float32: the values the kernels compare with
        for b in range(B):
            voxels = torch.randperm(N, generator=g, device="cpu")[: case.exact_edges].tolist()
            for n in voxels:
                c = int(torch.randint(0, C, (1,), generator=g, device="cpu"))
                k = int(torch.randint(0, inner.numel(), (1,), generator=g, device="cpu"))
                x[b, c, n] = inner[k].to(dtype)
    if case.nonfinite:
        _put_nonfinite(x, case, g)
    if case.labels:
        R = case.raters
        ldtype = case.target_dtype or torch.int64
        t = torch.randint(0, C, (B, R, N), generator=g, dtype=torch.int64, device="cpu")
        if case.ignore_index is not None:
            t[torch.rand(B, R, N, generator=g, dtype=torch.float32, device="cpu") < 0.15 / R] = case.ignore_index
        values = _bad_label_values(case, ldtype) if case.bad_labels else []
        if values:
            idx = torch.randperm(B * R * N, generator=g, device="cpu")[: len(values)]
            t.view(-1)[idx] = torch.tensor(values, dtype=torch.int64)
        t = t.to(ldtype)
    else:
        ddtype = case.target_dtype or torch.float32
        t = torch.rand(B, C, N, generator=g, dtype=torch.float32, device="cpu")
        if case.activation == "none" or not ddtype.is_floating_point:  # one-hot targets
            t = torch.nn.functional.one_hot(t.argmax(1), C).permute(0, 2, 1).float()
        t = t.to(ddtype)
    return x.contiguous(), t.contiguous()


def _upstream(case: Case, seed: int) -> tuple[torch.Tensor, ...]:
    """Random gradients of (count, sum_p, sum_y, sum_p2, sum_py), each of its output's shape."""
    g = torch.Generator().manual_seed(seed + 1)
    K = case.C if case.mode == "marginal" else 1
    R = case.raters if case.labels else 1
    stat = (case.B, K, case.num_bins)
    mom = stat if case.moments else (0,)
    shapes = (stat, stat, (case.B, K, R, case.num_bins), mom, mom)
    scales = (0.5, 1.0, 0.7, 0.6, 0.8)
    return tuple(torch.randn(*sh, generator=g, dtype=torch.float32, device="cpu") * s for sh, s in zip(shapes, scales))


# ------------------------------------------------------------------------------------------------------------
# running and comparing
# ------------------------------------------------------------------------------------------------------------


def _fwd_bwd(fn, x, t, edges, case: Case, ups, device: torch.device):
    xd = x.to(device).requires_grad_(True)
    out = fn(
        xd,
        t.to(device),
        edges.to(device),
        case.num_bins,
        SCHEME_SOFT if case.soft else SCHEME_HARD,
        _ACT[case.activation],
        TARGET_LABELS if case.labels else TARGET_DENSE,
        MODES[case.mode],
        case.moments,
        case.ignore_index,
        case.right,
    )
    count, sum_p, sum_y, sum_p2, sum_py, bad = out
    stats = (count, sum_p, sum_y, sum_p2, sum_py)
    loss = sum((u.to(device) * o).sum() for u, o in zip(ups, stats))
    (grad,) = torch.autograd.grad(loss, xd)
    # (count, sum_p, sum_y, bad, grad, sum_p2, sum_py): the moments last (empty unless the case asks for them)
    return tuple(v.detach().cpu() for v in (count, sum_p, sum_y, bad, grad, sum_p2, sum_py))


def stat_rtol(n: int) -> float:
    """Relative statistics budget for ``n`` float32 terms per (image, class) summed in any order: the
    ``(n - 1) * 2^-24`` bound with a 25 % margin, and at least :data:`STAT_RTOL` (256 terms)."""
    return max(STAT_RTOL, 1.25 * (n - 1) * 2.0**-24)


def _bad_parts(bad: torch.Tensor) -> tuple[int, int]:
    v = [int(b) for b in bad.reshape(-1).tolist()]
    return (v[0] if v else 0), sum(v[1:])


def compare(got, ref, case: Case, dtype: torch.dtype) -> tuple[float, str, float]:
    """(worst error/budget ratio, quantity, its max abs error) of candidate ``got`` vs reference ``ref``."""
    rc = ref[0].double()
    worst = (0.0, "", 0.0)
    rtol = stat_rtol(case.N)
    soft_atol = 8 * EPS32 * (case.N + case.num_bins * math.sqrt(case.N)) if case.soft else 0.0
    named = [(0, "count"), (1, "sum_p"), (2, "sum_y")]
    if len(ref) > 5 and ref[5].numel() > 0:
        named += [(5, "sum_p2"), (6, "sum_py")]
    for i, name in named:
        if i >= len(got):
            return math.inf, f"{name} missing", 0.0
        a, r = got[i], ref[i].double()
        if a.shape != r.shape or a.dtype != torch.float32:
            return math.inf, f"{name} shape/dtype {tuple(a.shape)} {a.dtype} (expected {tuple(r.shape)} float32)", 0.0
        err = (a.double() - r).abs()
        if name == "count" and not case.soft:
            budget = torch.full_like(r, HARD_COUNT_BUDGET)
        else:
            n = rc.unsqueeze(-2) if name == "sum_y" else rc  # sum_y has the rater axis before the bins
            budget = rtol * (r.abs() + n.abs()) + soft_atol + 1e-30
        ratio = err / budget
        ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
        k = int(ratio.argmax()) if ratio.numel() else 0
        if ratio.numel() and float(ratio.view(-1)[k]) > worst[0]:
            worst = (float(ratio.view(-1)[k]), name, float(err.view(-1)[k]))
    gb, rb = _bad_parts(got[3]), _bad_parts(ref[3])
    if gb != rb:
        return math.inf, f"bad counts {list(gb)} (reference {list(rb)})", float(abs(gb[0] - rb[0]) + abs(gb[1] - rb[1]))
    g, r = got[4], ref[4].double()
    if g.shape != r.shape or g.dtype != dtype:
        return math.inf, f"grad shape/dtype {tuple(g.shape)} {g.dtype} (expected {tuple(r.shape)} {dtype})", 0.0
    err = (g.double() - r).abs()
    budget = GRAD_RTOL[dtype] * r.abs() + 1e-5 * float(r.abs().max()) + 1e-30
    ratio = err / budget
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
    if ratio.numel():
        k = int(ratio.argmax())
        if float(ratio.view(-1)[k]) > worst[0]:
            worst = (float(ratio.view(-1)[k]), "grad", float(err.view(-1)[k]))
    return worst


def run_case(fn, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> CaseResult:
    """Run ``case`` through ``fn`` (kernel-contract signature, with autograd) on ``device`` and compare."""
    x, t = make_inputs(case, dtype, seed)
    edges = (bin_centres if case.soft else bin_edges)(case.num_bins)  # CPU, bit-identical on every device
    ups = _upstream(case, seed)
    ref = _fwd_bwd(binned_stats_prepared, x.float(), t, edges, case, ups, torch.device("cpu"))
    try:
        got = _fwd_bwd(fn, x, t, edges, case, ups, device)
    except Exception as exc:  # noqa: BLE001 - a raising candidate fails the check, it must not break the caller
        return CaseResult(case.name, False, math.inf, "raised", math.inf, f"{type(exc).__name__}: {exc}")
    ratio, quantity, err = compare(got, ref, case, dtype)
    return CaseResult(case.name, ratio <= 1.0, ratio, quantity, err)


_OPENMP: list[bool] = []


def _openmp() -> bool:
    """True when ATen's CPU parallel backend is OpenMP (its thread count is then thread-local)."""
    if not _OPENMP:
        _OPENMP.append("parallel backend: OpenMP" in torch.__config__.parallel_info())
    return _OPENMP[0]


def _in_clean_thread(work, device: torch.device):
    """Run ``work()`` in a fresh thread: no grad-mode, inference-mode, autocast, hook or mode state of the caller."""
    box: dict = {}

    def target() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            threads = torch.get_num_threads()
            if _openmp():
                # Tiny tensors: one thread is fastest, and on a loaded machine (data-loader workers) two threads
                # per op made the check 10-50x slower. OpenMP's thread count is per thread, so threads that have
                # run parallel work keep theirs; the default a thread starts with is restored right after.
                torch.set_num_threads(1)
            try:
                # warnings about the synthetic problem (its non-finite inputs make numpy in the Triton interpreter
                # warn) are not the caller's business, and under -W error they would fail a right kernel; the
                # caller's thread waits in join() meanwhile, so changing the process-wide filters is confined
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    box["value"] = work()
            finally:
                if _openmp():
                    torch.set_num_threads(threads)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    th = threading.Thread(target=target, name="calibops-selfcheck", daemon=True)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_selfcheck(
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    arch: str | None = None,
    cases: tuple[Case, ...] | None = None,
) -> SelfCheckResult:
    """Run the self-check of ``backend`` on ``device`` for ``dtype`` inputs now (no cache); ``cases``
    defaults to :data:`CASES`."""
    cases = CASES if cases is None else cases

    device = normalize_device(device)
    if dtype not in GRAD_RTOL:
        raise ValueError(f"dtype must be one of {tuple(_DTYPE_NAMES.values())}, got {dtype}")
    t0 = time.perf_counter()
    try:
        arch = device_arch(device) if arch is None else arch
        card = device_name(device)
        fn = _registry.stats_function(backend)

        def work() -> tuple[CaseResult, ...]:
            out = []
            for case in cases:
                res = run_case(fn, case, dtype, device)
                out.append(res)
                if res.error is not None and device.type == "cuda":
                    break  # a launch error may leave the CUDA context unusable: stop at the first
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return tuple(out)

        results = _in_clean_thread(work, device)
    except Exception as exc:  # noqa: BLE001 - e.g. the device itself failed; reported, never raised
        return SelfCheckResult(
            backend,
            str(device),
            arch or "?",
            dtype,
            False,
            (),
            time.perf_counter() - t0,
            error=f"{type(exc).__name__}: {exc}",
        )
    ok = bool(results) and all(r.ok for r in results)
    return SelfCheckResult(backend, str(device), arch, dtype, ok, results, time.perf_counter() - t0, card=card)


# (device, backend, dtype, spec or None) -> result; filled once per key, read by auto's decision
_RESULTS: dict[tuple[str, str, torch.dtype, Spec | None], SelfCheckResult] = {}


def cached_result(
    backend: str, device: torch.device | str, dtype: torch.dtype, spec: Spec | None = None
) -> SelfCheckResult | None:
    """The self-check result of this process for (device, backend, dtype) and specialisation ``spec`` (None:
    the fixed :data:`CASES`), if it ran."""
    return _RESULTS.get((str(normalize_device(device)), backend, dtype, spec))


def check(
    backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32, *, arch: str | None = None
) -> SelfCheckResult:
    """The self-check of the fixed :data:`CASES` for (device, backend, dtype): run on first use, then cached."""
    device = normalize_device(device)
    key = (str(device), backend, dtype, None)
    res = _RESULTS.get(key)
    if res is None:
        res = run_selfcheck(backend, device, dtype, arch=arch)
        _RESULTS[key] = res
    return res


def check_spec(
    backend: str, device: torch.device | str, spec: Spec, C: int, R: int = 1, *, arch: str | None = None
) -> SelfCheckResult:
    """The self-check of ``backend`` for one specialisation on ``device``: its problem (:func:`spec_case`
    with the ``C`` classes and ``R`` raters of the call that first used it) against the reference, forward
    and backward; run on first use, then cached for the process."""
    device = normalize_device(device)
    key = (str(device), backend, spec.dtype, spec)
    res = _RESULTS.get(key)
    if res is None:
        res = run_selfcheck(backend, device, spec.dtype, arch=arch, cases=(spec_case(spec, C, R),))
        res = dataclasses.replace(res, spec=spec)
        _RESULTS[key] = res
    return res


def checked_specialisations() -> list[SelfCheckResult]:
    """Every specialisation self-checked in this process (by ``backend="auto"``), in the order checked."""
    return [r for (_, _, _, spec), r in _RESULTS.items() if spec is not None]


def failure_message(failed: list[SelfCheckResult], chosen: str) -> str:
    """The one warning ``auto`` gives when candidates failed: which, where, what disagreed, how to report."""
    r0 = failed[0]
    where = f"{r0.device} ({r0.arch}{', ' + r0.card if r0.card else ''})"
    lines = [
        f"calibops: backend {r.backend!r} disagreed with the reference in its first-use self-check on {where} "
        f"for {_DTYPE_NAMES.get(r.dtype, str(r.dtype))} inputs"
        + (f" (specialisation {r.spec.describe()})" if r.spec is not None else "")
        + f": {r.describe()}."
        for r in failed
    ]
    names = " or ".join(repr(r.backend) for r in failed)
    lines.append(
        f"backend='auto' uses {chosen!r} for "
        + ("this specialisation" if r0.spec is not None else "this dtype")
        + " on this device instead"
        + (" (slower, same results)." if chosen == "reference" else ".")
        + f" {REPORT_HINT}. To run the kernel anyway pass backend={names} explicitly."
    )
    return " ".join(lines)


# ------------------------------------------------------------------------------------------------------------
# the record writer (python -m calibops selfcheck --record)
# ------------------------------------------------------------------------------------------------------------

_RECORD_KEYS = ("backend", "arch", "card", "torch", "triton", "cuda", "date")
RECORD_PATH = Path(__file__).with_name("verified.json")


def record_entry(backend: str, device: torch.device | str, date: str | None = None) -> dict[str, str]:
    """The record entry of (backend, architecture of ``device``) with card, versions and date."""
    device = normalize_device(device)
    try:
        import triton

        triton_version = str(triton.__version__)
    except Exception:  # noqa: BLE001
        triton_version = "-"
    cuda_version = getattr(torch.version, "hip", None) or torch.version.cuda or "-"
    return {
        "backend": backend,
        "arch": device_arch(device),
        "card": device_name(device),
        "torch": str(torch.__version__),
        "triton": triton_version,
        "cuda": str(cuda_version),
        "date": date or datetime.date.today().isoformat(),
    }


def read_record(path: Path | str = RECORD_PATH) -> tuple[dict[str, str], ...]:
    """The entries of a record file (JSON, like the package's ``verified.json``); empty if it does not exist."""
    path = Path(path)
    if not path.exists():
        return ()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["verified"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError("'verified' must be a list of objects")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a calibops record of verified GPUs ({exc})") from None
    return tuple({str(k): str(v) for k, v in e.items()} for e in entries)


_RECORD: list[tuple[dict[str, str], ...]] = []  # the package's record, read once


def verified_record() -> tuple[dict[str, str], ...]:
    """The package's record of verified (backend, architecture) pairs (``calibops/backends/verified.json``)."""
    if not _RECORD:
        _RECORD.append(read_record(RECORD_PATH))
    return _RECORD[0]


def write_record(entries: list[dict[str, str]], path: Path | str = RECORD_PATH) -> tuple[dict[str, str], ...]:
    """Add or update ``entries`` (by (backend, arch)) in the record file at ``path``; return the new record.

    A file that does not exist yet starts from the package's record (so it is a drop-in replacement of
    ``calibops/backends/verified.json``). The file is rewritten whole, entries sorted by (backend, arch), one key
    per line, so the diff of a new entry is a few added lines.
    """
    path = Path(path)
    base = read_record(path) if path.exists() else verified_record()
    merged = {(e["backend"], e["arch"]): dict(e) for e in base}
    for e in entries:
        missing = [k for k in _RECORD_KEYS if not isinstance(e.get(k), str) or not e.get(k)]
        if missing:
            raise ValueError(f"record entry {e!r} lacks {missing}")
        merged[(e["backend"], e["arch"])] = {k: e[k] for k in _RECORD_KEYS}
    record = tuple(merged[k] for k in sorted(merged))
    about = json.loads(RECORD_PATH.read_text(encoding="utf-8")).get("about", "") if RECORD_PATH.exists() else ""
    text = json.dumps({"about": about, "verified": list(record)}, indent=2) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    if path.resolve() == RECORD_PATH.resolve():
        _RECORD.clear()
    return record
