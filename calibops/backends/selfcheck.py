"""The one-time self-check of a kernel backend against the reference on a device it has not been verified on.

``backend="auto"`` on a CUDA tensor uses a GPU kernel backend (``cuda``, ``triton``) only where it is known to
be right: its (backend, architecture) pair is in the record of ``calibops/backends/verified.json``, or this self-check
passed in the current process for that (device, backend, input dtype). ``python -m calibops selfcheck`` runs
the same check for every available backend and prints a table.

What it runs: five small problems (:data:`CASES`) that together cover hard and soft binning, integer labels
(with ``ignore_index`` and out-of-range labels) and dense targets, softmax, sigmoid and probabilities, the
chunked path for more than 32 classes, images in a batch, both edge rules, top-label statistics of three raters'
label maps and the second moments. Each runs forward and backward (random upstream gradients on every statistic,
so ``grad_output != 1``) through the candidate's op with
its autograd formula, and through the reference on the CPU (pure PyTorch, float64 accumulation) from the very
same input values. The input is read in the dtype under test (float32, float16 or bfloat16): a kernel can be
right in float32 and wrong in bfloat16, so results are cached per (device, backend, dtype).

Kinks cannot flip: every probability is at least :data:`KINK_MARGIN` (1e-4) away from every inner hard edge
and every soft centre (where the statistics or their derivatives jump), computed in float64 from the input as
quantised to the dtype under test, and redrawn otherwise. A kernel's softmax/sigmoid differs from torch's by a
few float32 ulps (< 1e-6), so both sides put every voxel in the same bins and on the same linear piece.

Error budget (the rules of tests/test_cuda_backend.py and tests/test_triton_backend.py):

- hard counts: exact (they are integers; budget 0.5).
- statistics: ``STAT_RTOL * (|ref| + ref_count)`` with ``STAT_RTOL = 2e-5``, a bound for any float32
  summation order of at most 256 terms per (image, class) as here ((n - 1) * 2^-24 <= 1.6e-5 of the sum of
  the absolute terms, which |stat| + count bounds since p, y, w <= 1); soft binning adds
  ``8 * eps32 * (N + M * sqrt(N))`` (memberships computed in float32 from a p that may differ by a few ulps,
  times the slope M).
- gradients: per element ``GRAD_RTOL[dtype] * |ref| + 1e-5 * max|ref|`` (float32 1e-5; float16 2^-10 and
  bfloat16 2^-7: one rounding of the float32 gradient to the input dtype, doubled; the Triton interpreter
  converts float32 to bfloat16 by truncation, error < 1 ulp, so its bfloat16 ratios reach ~0.95 in tests,
  where compiled code rounds to nearest and stays near 0.5).
- ``bad`` (label and non-finite counts): exact.

The check passes when every quantity of every case is within budget (ratio error / budget <= 1). It runs in a
separate thread, so none of the caller's thread-local state (grad mode, ``inference_mode``, autocast,
saved-tensor hooks, dispatch modes) reaches it; it synchronises the device once, when it runs.
"""

from __future__ import annotations

import datetime
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..contract import MODES, SCHEME_HARD, SCHEME_SOFT, TARGET_DENSE, TARGET_LABELS
from ..reference import ACT_NONE, ACT_SIGMOID, ACT_SOFTMAX, bin_centres, bin_edges, binned_stats_prepared
from .registry import stats_function

__all__ = [
    "CASES",
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


# num_bins = 20 (the default) everywhere, so on a GPU the Triton kernels compiled here are the ones a default
# loss uses too. N <= 256 per (image, class) keeps the STAT_RTOL bound valid for any summation order. Only the
# first case has two images (the image offsets); the others have one, which keeps the Triton interpreter's
# per-program cost down in tests.
CASES: tuple[Case, ...] = (
    Case(
        "hard/labels/softmax",
        B=2,
        C=4,
        N=200,
        num_bins=20,
        soft=False,
        activation="softmax",
        labels=True,
        ignore_index=-100,
        bad_labels=3,
    ),
    Case("soft/labels/softmax/C=40", B=1, C=40, N=64, num_bins=20, soft=True, activation="softmax", labels=True),
    Case(
        "soft/dense/sigmoid/moments",
        B=1,
        C=3,
        N=150,
        num_bins=20,
        soft=True,
        activation="sigmoid",
        labels=False,
        moments=True,
    ),
    Case(
        "hard/dense/probabilities",
        B=1,
        C=3,
        N=128,
        num_bins=20,
        soft=False,
        activation="none",
        labels=False,
        right=True,
    ),
    Case(
        "hard/top-label/3 raters/softmax/moments",
        B=1,
        C=5,
        N=128,
        num_bins=20,
        soft=False,
        activation="softmax",
        labels=True,
        ignore_index=255,
        mode="top_label",
        raters=3,
        moments=True,
    ),
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


def _probs64(x: torch.Tensor, activation: str) -> torch.Tensor:
    x = x.double()
    if activation == "softmax":
        return torch.softmax(x, 1)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    return x


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU input (in ``dtype``) and target of ``case``, every probability at least KINK_MARGIN from a kink."""
    g = torch.Generator().manual_seed(seed)
    B, C, N = case.B, case.C, case.N

    def draw() -> torch.Tensor:
        z = torch.randn(B, C, N, generator=g, dtype=torch.float32, device="cpu") * 3
        if case.activation == "none":
            z = torch.softmax(z, 1) if C > 1 else torch.rand(B, C, N, generator=g, dtype=torch.float32, device="cpu")
        return z.to(dtype)

    kinks = _kinks(case.num_bins, case.soft)
    x = draw()
    for _ in range(100):
        p = _probs64(x, case.activation)
        near = ((p.unsqueeze(-1) - kinks).abs() < KINK_MARGIN).any(-1).any(1, keepdim=True)  # [B, 1, N]
        if case.mode == "top_label" and C > 1:  # the argmax must not hang on rounding either
            top2 = p.topk(2, dim=1).values
            near = near | ((top2[:, :1] - top2[:, 1:]) < KINK_MARGIN)
        if not bool(near.any()):
            break
        x = torch.where(near, draw(), x)
    else:  # pragma: no cover - a design error of CASES, caught by the tests
        raise RuntimeError(f"self-check case {case.name}: could not draw probabilities away from the kinks")
    if case.labels:
        R = case.raters
        t = torch.randint(0, C, (B, R, N), generator=g, dtype=torch.int64, device="cpu")
        if case.ignore_index is not None:
            t[torch.rand(B, R, N, generator=g, dtype=torch.float32, device="cpu") < 0.15 / R] = case.ignore_index
        if case.bad_labels:
            idx = torch.randperm(B * R * N, generator=g, device="cpu")[: case.bad_labels]
            t.view(-1)[idx] = C + torch.arange(case.bad_labels, device="cpu")  # out of range, not ignore_index
    else:
        t = torch.rand(B, C, N, generator=g, dtype=torch.float32, device="cpu")
        if case.activation == "none":  # one-hot targets for the probabilities case
            t = torch.nn.functional.one_hot(t.argmax(1), C).permute(0, 2, 1).float()
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


def _bad_parts(bad: torch.Tensor) -> tuple[int, int]:
    v = [int(b) for b in bad.reshape(-1).tolist()]
    return (v[0] if v else 0), sum(v[1:])


def compare(got, ref, case: Case, dtype: torch.dtype) -> tuple[float, str, float]:
    """(worst error/budget ratio, quantity, its max abs error) of candidate ``got`` vs reference ``ref``."""
    rc = ref[0].double()
    worst = (0.0, "", 0.0)
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
            budget = STAT_RTOL * (r.abs() + n.abs()) + soft_atol + 1e-30
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
        fn = stats_function(backend)

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


# (device, backend, dtype) -> result; filled once per key, read by _backends' auto decision
_RESULTS: dict[tuple[str, str, torch.dtype], SelfCheckResult] = {}


def cached_result(backend: str, device: torch.device | str, dtype: torch.dtype) -> SelfCheckResult | None:
    """The self-check result of this process for (device, backend, dtype), if it ran."""
    return _RESULTS.get((str(normalize_device(device)), backend, dtype))


def check(
    backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32, *, arch: str | None = None
) -> SelfCheckResult:
    """The self-check result for (device, backend, dtype): run on first use, then cached for the process."""
    device = normalize_device(device)
    key = (str(device), backend, dtype)
    res = _RESULTS.get(key)
    if res is None:
        res = run_selfcheck(backend, device, dtype, arch=arch)
        _RESULTS[key] = res
    return res


def failure_message(failed: list[SelfCheckResult], chosen: str) -> str:
    """The one warning ``auto`` gives when candidates failed: which, where, what disagreed, how to report."""
    r0 = failed[0]
    where = f"{r0.device} ({r0.arch}{', ' + r0.card if r0.card else ''})"
    lines = [
        f"calibops: backend {r.backend!r} disagreed with the reference in its first-use self-check on {where} "
        f"for {_DTYPE_NAMES.get(r.dtype, str(r.dtype))} inputs: {r.describe()}."
        for r in failed
    ]
    names = " or ".join(repr(r.backend) for r in failed)
    lines.append(
        f"backend='auto' uses {chosen!r} on this device for this dtype instead"
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
