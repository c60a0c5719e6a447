"""The one pipeline every entry point runs: prepare -> statistics -> slicing.

Functions (:mod:`calibops.functional`), loss modules (:mod:`calibops.losses`), the data-set metric
(:mod:`calibops.metrics`) and the adapters all call :func:`run` with a checked :class:`calibops.options.Options`:

1. **prepare** (:func:`prepare`): check the tensors against the options (shapes, dtypes, devices) and reshape
   them to the kernel layout, input [B, C, N] and target [B, R, N] labels or [B, C, N] dense; with validation
   on, also the values (probabilities in [0, 1] and finite when no activation is asked, dense targets in
   [0, 1]). One channel (C = 1) follows MONAI's binary rule (below).
2. **statistics**: the backend's op (:mod:`calibops.backends`), one read of input and target; its ``bad``
   counts (labels outside [0, C), non-finite probabilities) and a weight tensor's values are read back in one
   host synchronisation when validating.
3. **slicing**: the background row dropped (``include_background=False``), the row axis of top-label and the
   rater axis of one rater removed.

Validation (``validate=True``, the default) checks shapes, dtypes and option values (free: metadata only) and
the *values*: probabilities in [0, 1] and finite when neither softmax nor sigmoid is asked (one extra read of
the input: a single aminmax reduction), dense targets in [0, 1] (one read of the target), and labels in [0, C) or
``ignore_index`` (counted by the kernel itself, at the cost of one host synchronisation). ``validate=False``
(or the environment variable ``CALIBOPS_VALIDATE=0``) keeps the metadata checks and skips the value checks: use
it on the hot path of a training loop once the data pipeline is trusted. Nothing is validated while
``torch.compile`` traces (value checks would break the graph); kernels never read or write out of bounds
whatever the input — an out-of-range label is left out of the statistics.

Non-finite probabilities (NaN or ±inf after the activation: NaN logits, a +inf logit under softmax, or a voxel
whose logits are all -inf) are left out of every statistic by every backend and counted; with validation on,
any such entry raises a ``ValueError`` naming ``input``. Meta tensors are never value-checked.

**One channel (C = 1), MONAI's binary rule, in every entry point**: the channel is the foreground probability
(or its logit with ``sigmoid``); ``softmax=True`` is ignored (with MONAI's warning ``"single channel
prediction, `softmax=True` ignored."``), and so are ``include_background=False`` (the one channel is kept) and
``to_onehot_y=True``: a label map (B, 1, *spatial) or (B, *spatial) with values {0, 1} (or ``ignore_index``) is
the target of the channel (foreground = 1). Internally such a pair is binned as the two classes {background,
foreground} with the background row dropped, so ``ignore_index`` and the label check work as for C > 1.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, NamedTuple

import torch

from .backends import resolve_backend, resolve_call, stats_function
from .backends.extension import stats_backward
from .contract import DENSE_DTYPES, INPUT_DTYPES, LABEL_DTYPES, MODES, SCHEMES, TARGET_DENSE, TARGET_LABELS
from .options import Options, check_weight_values
from .reference import ACT_NONE, ACT_SIGMOID, ACT_SOFTMAX, scheme_edges
from .results import (
    BinnedStats,
    BinnedStatsMoments,
    ace_from_stats,
    class_factor,
    l1ace_backward,
    l1ace_forward,
    reduce_loss,
)

__all__ = [
    "Run",
    "check_weight",
    "classification_layout",
    "loss",
    "per_rater_stats",
    "prepare",
    "run",
    "voxel_volume",
]

_ACTIVATION_NAMES = {ACT_NONE: "no activation", ACT_SOFTMAX: "softmax", ACT_SIGMOID: "sigmoid"}


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _validate_values(validate: bool, device: torch.device) -> bool:
    """Whether the value checks run: validation on, not compiling, not a meta tensor, not CALIBOPS_VALIDATE=0."""
    if not validate or _compiling() or device.type == "meta":
        return False
    return os.environ.get("CALIBOPS_VALIDATE", "1").lower() not in ("0", "false", "no", "off")


def _label_range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype == torch.bool:
        return 0, 1
    if dtype.is_floating_point:
        return -(2**63), 2**63 - 1  # float labels are converted to int64
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


class Prepared(NamedTuple):
    """Input and target in the kernel layout, and what the op is told about them."""

    input: torch.Tensor  # [B, C, N] (C = 2 for a one-channel input with a label map: MONAI's binary rule)
    target: torch.Tensor  # [B, R, N] labels or [B, C, N] dense
    labels: bool
    activation: int
    B: int
    C: int  # classes of the user's input (1 for the binary rule)
    binary: bool  # one channel with a label map: binned as {background, foreground}, the background row dropped


def _single_channel_warnings(o: Options, stacklevel: int = 4) -> None:
    """MONAI's warnings for a one-channel prediction (C = 1): the options that do not apply there, each once.

    ``stacklevel`` points the warning at the user's call (4: the public function calling :func:`run`); the
    MONAI-signature losses (:mod:`calibops.losses`) call this themselves and hand :func:`run` options without
    the ignored flags, so a forward warns each message exactly once.
    """
    if o.softmax:
        warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=stacklevel)
    if o.to_onehot_y:
        warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=stacklevel)
    if not o.include_background and o.mode == "marginal":
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=stacklevel)


def prepare(input: torch.Tensor, target: Any, o: Options, backend_name: str, check_values: bool) -> Prepared:
    """Validate and reshape to the kernel layout: input [B, C, N], target [B, R, N] labels or [B, C, N] dense."""
    to_onehot_y, ignore_index, multi_rater = o.to_onehot_y, o.ignore_index, o.multi_rater
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (B, C, *spatial), got shape {tuple(input.shape)}")
    if input.dim() == 2:  # not B one-voxel images: one prediction per sample is a classification batch
        raise ValueError(
            f"input has shape (B, C) = {tuple(input.shape)} with no spatial axis: for classification predictions "
            "(one row per sample, pooled over the batch) use calibops.functional.classification_calibration_errors "
            "/ classification_marginal_l1_ace or DatasetCalibration(..., classification=True); for B images of "
            "one voxel each pass input[..., None] (B, C, 1)"
        )
    if not input.is_floating_point():
        raise TypeError(
            f"input must be floating point (float32, float16 or bfloat16 probabilities or logits), got {input.dtype}"
        )
    B, C = input.shape[0], input.shape[1]
    if C < 1:
        raise ValueError(f"input must have at least one class (dim 1), got shape {tuple(input.shape)}")
    softmax, sigmoid = o.softmax, o.sigmoid
    if C == 1:
        _single_channel_warnings(o)
        softmax = False
    spatial = tuple(input.shape[2:])
    N = math.prod(spatial)
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}: move them to one device")
    if target.dim() >= 1 and target.shape[0] != B:
        raise ValueError(
            f"target batch size {target.shape[0]} does not match input batch size {B} "
            f"(input {tuple(input.shape)}, target {tuple(target.shape)})"
        )

    kernel = backend_name != "reference"
    x = input
    if kernel and x.dtype not in INPUT_DTYPES:
        x = x.float()
    x = x.reshape(B, C, N)
    if kernel:
        x = x.contiguous()

    if to_onehot_y:
        shape = tuple(target.shape)
        if multi_rater:
            if len(shape) != 2 + len(spatial) or shape[2:] != spatial or shape[1] < 1:
                raise ValueError(
                    f"target must hold R >= 1 rater label maps of shape (B, R, *spatial) with *spatial = {spatial} "
                    f"when multi_rater=True, got {shape}"
                )
            R = shape[1]
        elif shape not in ((B, *spatial), (B, 1, *spatial)):
            hint = ""
            if len(shape) == 2 + len(spatial) and shape[2:] == spatial:
                hint = " (several rater label maps: pass multi_rater=True)"
            raise ValueError(
                f"target must be a label map of shape (B, 1, *spatial) or (B, *spatial) = {(B, 1, *spatial)} or "
                f"{(B, *spatial)} when to_onehot_y=True, got {shape}{hint}"
            )
        else:
            R = 1
        t = target
        if ignore_index is not None and (t.dtype == torch.bool or t.dtype in LABEL_DTYPES or t.is_floating_point()):
            lo, hi = _label_range(t.dtype)
            if not lo <= ignore_index <= hi:
                raise ValueError(
                    f"ignore_index={ignore_index} can never match a {t.dtype} label (values {lo}..{hi}): pass the "
                    "label value to leave out, within the labels' dtype"
                )
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        elif t.is_floating_point():
            if check_values and bool((t != t.round()).any()):
                raise ValueError("target holds non-integer label values; to_onehot_y=True expects class indices")
            t = t.to(torch.int64)
        elif t.dtype not in LABEL_DTYPES:
            raise TypeError(f"target labels must be an integer tensor, got {t.dtype}")
        t = t.reshape(B, R, N)
        if kernel:
            t = t.contiguous()
        labels = True
    else:
        if tuple(target.shape) != tuple(input.shape):
            hint = " (for integer label maps pass to_onehot_y=True)" if not target.is_floating_point() else ""
            raise ValueError(
                f"target must have the shape of input {tuple(input.shape)} when to_onehot_y=False, "
                f"got {tuple(target.shape)}{hint}"
            )
        t = target
        if t.is_complex():
            raise TypeError(f"target must be real (one-hot, bool or soft labels in [0, 1]), got {t.dtype}")
        if check_values and t.dtype != torch.bool and t.numel() > 0:
            lo, hi = torch.aminmax(t.detach()) if t.is_floating_point() else torch.aminmax(t)
            if not (bool(lo >= 0) and bool(hi <= 1)):
                raise ValueError(
                    f"target values must lie in [0, 1] (one-hot or soft labels), found range [{float(lo)}, {float(hi)}]"
                    "; for integer label maps pass to_onehot_y=True"
                )
        if t.dtype not in DENSE_DTYPES and not (not kernel and t.dtype == torch.float64):
            t = t.float()  # integer / other dense targets: as float32 (the reference also keeps float64)
        t = t.detach().reshape(B, C, N)
        if kernel:
            t = t.contiguous()
        labels = False

    if softmax:
        activation = ACT_SOFTMAX
    elif sigmoid:
        activation = ACT_SIGMOID
    else:
        activation = ACT_NONE
        if check_values and x.numel() > 0:
            # one reduction: aminmax propagates NaN, and NaN fails both comparisons below
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            if not (lo >= 0 and hi <= 1):
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ValueError(
                        "input holds non-finite values; pass probabilities in [0, 1], "
                        "or logits with softmax=True/sigmoid=True"
                    )
                raise ValueError(
                    f"input probabilities must lie in [0, 1], found range [{lo}, {hi}]; "
                    "for logits pass softmax=True or sigmoid=True"
                )
    binary = C == 1 and labels
    if binary:  # MONAI's binary rule: the label map {0, 1} is the target of the one channel
        p = x.float() if activation == ACT_NONE else torch.sigmoid(x.float())
        if input.dtype == torch.float64:
            p = x if activation == ACT_NONE else torch.sigmoid(x)
        x = torch.cat([1 - p, p], dim=1)
        activation = ACT_NONE
    return Prepared(x, t, labels, activation, B, C, binary)


class Run(NamedTuple):
    """What :func:`run` hands back: the statistics, the kernel's ``bad`` counts and their host copy."""

    # public shapes: marginal (B, C', M) with sum_y (B, C', R, M); top-label (B, M) with sum_y (B, R, M); the
    # rater axis is dropped unless multi_rater. Background dropped (marginal) unless include_background.
    stats: BinnedStats
    bad: torch.Tensor  # int64 (2,) on the input's device: [labels outside [0, C), non-finite probability entries]
    counts: list[int] | None  # host copy of ``bad`` when the values were checked (one synchronisation), else None
    weight: torch.Tensor | None  # the checked weight, float32 (C',) on the input's device
    num_classes: int  # C of the input (before dropping the background)


def _nonfinite_message(n: int, activation: int) -> str:
    what = {
        ACT_SOFTMAX: "a NaN or +inf logit makes every probability of its voxel NaN, and so do all -inf logits",
        ACT_SIGMOID: "NaN logits give NaN probabilities",
        ACT_NONE: "the probabilities themselves are NaN or infinite",
    }[activation]
    return (
        f"input holds {n} non-finite probability value(s) after {_ACTIVATION_NAMES[activation]} ({what}); "
        "fix the predictions upstream, or pass validate=False to leave such entries out of every statistic "
        "(counted, never NaN)"
    )


class _Launch(NamedTuple):
    """A call made ready for the statistics op: the prepared tensors, the op's arguments and the backend."""

    prep: Prepared
    call: tuple  # the op's arguments (calibops.contract.OpCall order)
    stats: Any  # the backend's statistics function (calibops.backends.stats_function)
    check: bool  # the values are validated (one host synchronisation after the op)
    drop_background: bool  # the statistics' row 0 is dropped
    weight: torch.Tensor | None  # the checked weight, float32 (C',) on the input's device
    weight_bad: torch.Tensor | None  # its count of bad entries, read back with the op's ``bad`` counts


def _launch(input: Any, target: Any, o: Options, weight: Any) -> _Launch:
    """Resolve the backend, prepare the tensors, check the weight's shape and build the op's arguments."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    name = resolve_backend(o.backend, input.device, input.dtype)
    check = _validate_values(o.validate, input.device)
    prep = prepare(input, target, o, name, check)
    # rows of the statistics kept: the background is dropped on request (C > 1) and always for the binary rule
    drop_background = o.mode != "top_label" and (prep.binary or (not o.include_background and prep.C > 1))
    used = 1 if prep.binary else (prep.C - 1 if drop_background else prep.C)
    w, w_bad = check_weight(weight, used, input.device, check)
    scheme = SCHEMES[o.binning]
    call = (
        prep.input,
        prep.target,
        scheme_edges(o.num_bins, scheme, input.device),
        o.num_bins,
        scheme,
        prep.activation,
        TARGET_LABELS if prep.labels else TARGET_DENSE,
        MODES[o.mode],
        o.moments,
        o.ignore_index,
        o.right,
    )
    # auto on a GPU: the kernel known to be right for this call's specialisation (a dict lookup after its first
    # call, which self-checks it); otherwise ``name`` itself
    name = resolve_call(o.backend, name, call)
    return _Launch(prep, call, stats_function(name), check, drop_background, w, w_bad)


def _read_counts(launch: _Launch, bad: torch.Tensor, o: Options, raise_nonfinite: bool) -> tuple:
    """``(bad, counts)``: the op's ``bad`` counts (voxels, for the binary rule) and, when the values are checked,
    their host copy read in the one synchronisation of the call, with a ValueError for each kind of bad value."""
    prep, w_bad = launch.prep, launch.weight_bad
    if prep.binary:  # both channels of a non-finite voxel are counted: count voxels, like one channel
        bad = torch.stack([bad[0], bad[1] // 2])
    # probabilities given directly were range-checked (finite included) in prepare, so without labels, an
    # activation or a weight tensor there is nothing left to read back
    if not (launch.check and (prep.labels or prep.activation != ACT_NONE or w_bad is not None)):
        return bad, None
    both = bad if w_bad is None else torch.cat([bad, w_bad.view(1)])
    counts = both.tolist()  # the one host synchronisation of a validated call
    if counts[0] > 0:
        if prep.binary:
            allowed = "{0, 1}" + (f" or ignore_index={o.ignore_index}" if o.ignore_index is not None else "")
            raise ValueError(
                f"target holds {counts[0]} label(s) outside {allowed}: with a single-channel input (C=1) the "
                "label map is the target of the channel (MONAI's binary rule), so labels must be 0 or 1"
            )
        allowed = f"[0, {prep.C})" + (f" or ignore_index={o.ignore_index}" if o.ignore_index is not None else "")
        raise ValueError(f"target holds {counts[0]} label(s) outside {allowed} (input has C={prep.C} classes)")
    if raise_nonfinite and counts[1] > 0:
        raise ValueError(_nonfinite_message(counts[1], ACT_SIGMOID if o.sigmoid else prep.activation))
    if w_bad is not None and counts[2] > 0:
        raise ValueError(f"weight must be finite and >= 0, got {launch.weight.tolist()}")
    return bad, counts[:2]


def run(input: Any, target: Any, o: Options, *, raise_nonfinite: bool = True, weight: Any = None) -> Run:
    """The pipeline of every entry point: resolve the backend, prepare, run the statistics op, check its ``bad``
    counts (and ``weight``'s values) in one host synchronisation, slice the rows."""
    launch = _launch(input, target, o, weight)
    return _finish(launch, launch.stats(*launch.call), o, raise_nonfinite)


def _finish(launch: _Launch, outputs: tuple, o: Options, raise_nonfinite: bool) -> Run:
    """The op's outputs read back (:func:`_read_counts`) and sliced to the public shapes."""
    count, sum_p, sum_y, sum_p2, sum_py, bad = outputs
    bad, counts = _read_counts(launch, bad, o, raise_nonfinite)
    parts = [count, sum_p, sum_y] + ([sum_p2, sum_py] if o.moments else [])
    if o.mode == "top_label":  # one statistic row per image: drop the row axis
        parts = [t.select(1, 0) for t in parts]
    elif launch.drop_background:
        parts = [t[:, 1:] for t in parts]
    if not o.multi_rater:
        parts[2] = parts[2].select(-2, 0)  # the one rater
    stats = BinnedStatsMoments(*parts) if o.moments else BinnedStats(*parts)
    return Run(stats, bad, counts, launch.weight, launch.prep.C)


class _LossPlan(NamedTuple):
    """What :class:`_FusedLoss` does after the statistics op."""

    drop_background: bool
    multi_rater: bool
    soft: bool
    empty_weight: float
    ignore_empty_classes: bool
    weight: torch.Tensor | None
    reduction: str


def _pad_background(g: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient over the kept rows (dim 1) with a zero row 0 in front: the gradient of the dropped background."""
    return None if g is None else torch.nn.functional.pad(g, (0, 0) * (g.dim() - 2) + (1, 0))


class _FusedLoss(torch.autograd.Function):
    """Per-class mL1-ACE on a kernel backend in eager mode as one autograd node: the statistics op, the row
    slicing (background, raters) and :func:`calibops.results.l1ace_forward`; backward
    :func:`calibops.results.l1ace_backward`, then the backend's statistics backward op
    (:func:`calibops.backends.extension.stats_backward`). The formulas are those of the composed path (statistics
    Function, slicing views, the epilogue Function) that the reference backend and compiled graphs run; one node
    instead of two Python Functions and their view nodes takes about 100 µs off a 1x4x16^3 forward+backward."""

    @staticmethod
    def forward(ctx, stats, plan: _LossPlan, input, target, edges, *options):
        with torch._C._AutoDispatchBelowAutograd():  # the op's kernel directly (as torch.library's own wrapper)
            outputs = stats.forward_op(input, target, edges, *options)
        count, sum_p, sum_y = outputs[:3]
        if plan.drop_background:
            count, sum_p, sum_y = count[:, 1:], sum_p[:, 1:], sum_y[:, 1:]
        # the rater mean: sum_y is linear in y, so Σ w·mean_r y_r = mean_r Σ w·y_r
        sum_y = sum_y.mean(-2) if plan.multi_rater else sum_y.select(-2, 0)
        factor = class_factor(sum_y, plan.ignore_empty_classes, plan.weight)
        per_class, saved = l1ace_forward(count, sum_p, sum_y, plan.soft, plan.empty_weight, factor)
        ctx.save_for_backward(input, target, edges, *saved)
        ctx.stats, ctx.plan, ctx.options = stats, plan, options
        ctx.shapes = tuple(t.shape for t in outputs[:5])
        ctx.entries = per_class.numel()
        # without moments the op returns empty sum_p2 / sum_py: an empty tensor is its own zero gradient
        ctx.moment_grads = (None, None) if outputs[3].numel() else (outputs[3], outputs[4])
        ctx.mark_non_differentiable(outputs[5])
        return reduce_loss(per_class, plan.reduction), outputs[5]

    @staticmethod
    def backward(ctx, grad, _grad_bad):
        none = (None,) * (5 + len(ctx.options))
        if not ctx.needs_input_grad[2]:
            return none
        input, target, edges, *saved = ctx.saved_tensors
        plan = ctx.plan
        if plan.reduction == "mean" and ctx.entries > 0:
            grad = grad / ctx.entries  # a 0-d gradient broadcasts over (B, C') in the epilogue's backward
        g_count, g_p, g_y = l1ace_backward(grad, tuple(saved), plan.soft, plan.soft)
        if g_count is None:  # hard counts carry no gradient
            g_count = torch.zeros_like(g_p)
        g_y = g_y.unsqueeze(-2)  # back to the op's rater axis (B, C, R, M)
        raters = ctx.shapes[2][-2]
        if plan.multi_rater and raters > 1:
            g_y = (g_y / raters).expand(*g_y.shape[:-2], raters, g_y.shape[-1])
        if plan.drop_background:
            g_count, g_p, g_y = _pad_background(g_count), _pad_background(g_p), _pad_background(g_y)
        grads = (g_count, g_p, g_y, *ctx.moment_grads)
        grad_input = stats_backward(ctx.stats.backward_op, grads, ctx.shapes, input, target, edges, ctx.options)
        return none[:2] + (grad_input,) + none[3:]


def loss(input: Any, target: Any, o: Options, weight: Any = None) -> torch.Tensor:
    """mL1-ACE of one batch under ``o`` (marginal; reduced by ``o.reduction``: a scalar, or (B, C') for
    ``"none"``), differentiable w.r.t. ``input``. Eager calls on a kernel backend run :class:`_FusedLoss`; the
    reference backend and compiled graphs compose the statistics, the slicing and the epilogue."""
    launch = _launch(input, target, o, weight)
    soft = o.binning == "soft"
    if (
        getattr(launch.stats, "backward_op", None) is not None
        and launch.call[0].requires_grad
        and torch.is_grad_enabled()
        and not _compiling()
    ):
        plan = _LossPlan(
            launch.drop_background,
            o.multi_rater,
            soft,
            float(o.empty_weight),
            o.ignore_empty_classes,
            launch.weight,
            o.reduction,
        )
        out, bad = _FusedLoss.apply(launch.stats, plan, *launch.call)
        _read_counts(launch, bad, o, True)
        return out
    r = _finish(launch, launch.stats(*launch.call), o, True)
    stats = r.stats
    if o.multi_rater:  # the rater mean: sum_y is linear in y, so Σ w·mean_r y_r = mean_r Σ w·y_r
        stats = BinnedStats(stats.count, stats.sum_p, stats.sum_y.mean(-2))
    per_class = ace_from_stats(
        stats, soft=soft, empty_weight=o.empty_weight, ignore_empty_classes=o.ignore_empty_classes, weight=r.weight
    )
    return reduce_loss(per_class, o.reduction)


def check_weight(
    weight: Any, num_classes: int, device: torch.device, check: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight as float32 (C',) on ``device``, device count of bad entries to read back or None).

    Types and host values (lists, NumPy) are checked by :func:`calibops.options.check_weight_values`; a
    tensor's values are counted here and read back with the statistics' ``bad`` counts (validation on only).
    """
    w = check_weight_values(weight)
    if w is None:
        return None, None
    tensor_given = isinstance(weight, torch.Tensor)
    w = w.to(device)
    if w.dim() == 0:
        w = w.expand(num_classes)
    if w.dim() != 1 or w.shape[0] != num_classes:
        raise ValueError(
            f"weight must have one entry per class used ({num_classes} after include_background), "
            f"got shape {tuple(w.shape)}"
        )
    w_bad = None
    if tensor_given and check and w.device.type != "meta":
        w_bad = (~torch.isfinite(w) | (w < 0)).sum()
    return w, w_bad


def per_rater_stats(stats: BinnedStats) -> BinnedStats:
    """Multi-rater statistics (count (..., M), sum_y (..., R, M)) as R stacked single-rater statistics with the
    rater axis first after the image axis: (B, R, ..., M) each (count and sum_p repeated; a view, no copy)."""
    sum_y = stats.sum_y.movedim(-2, 1)  # (B, R, ..., M)
    R = sum_y.shape[1]

    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1).expand(t.shape[0], R, *t.shape[1:])

    return BinnedStats(rep(stats.count), rep(stats.sum_p), sum_y)


def _is_bool_like(v: Any) -> bool:
    """A bool, a NumPy bool, a bool array / tensor, or a sequence holding one."""
    if isinstance(v, bool) or type(v).__name__ == "bool_" or str(getattr(v, "dtype", "")) in ("bool", "torch.bool"):
        return True
    return isinstance(v, (list, tuple)) and any(_is_bool_like(e) for e in v)


def voxel_volume(spacing: Any, B: int, D: int, device: torch.device) -> torch.Tensor:
    """Voxel volume per image, float64 (B,): the product of the spacing along the D spatial axes."""
    if spacing is None:
        return torch.ones(B, dtype=torch.float64, device=device)
    if _is_bool_like(spacing):  # True would silently be a spacing of 1
        raise TypeError(
            f"spacing must be None, a number, a sequence of {D} numbers or a (B, {D}) tensor, got {spacing!r}: a "
            "bool is not a voxel size"
        )
    if isinstance(spacing, (int, float)):
        s = torch.full((D,), float(spacing), dtype=torch.float64)
    else:
        try:
            s = torch.as_tensor(spacing, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"spacing must be None, a number, a sequence of {D} numbers or a (B, {D}) tensor, got {spacing!r}"
            ) from None
    s = s.to(device)
    if s.dim() == 0:
        s = s.expand(D)
    if s.dim() == 1:
        s = s.unsqueeze(0).expand(B, -1)
    if s.dim() != 2 or s.shape != (B, D):
        raise ValueError(
            f"spacing must hold one value per spatial axis ({D}), or a (B, D) = ({B}, {D}) tensor for per-image "
            f"spacing, got shape {tuple(s.shape)}"
        )
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"spacing must be finite and > 0, got {s.tolist()}")
    return s.prod(1)


def classification_layout(input: Any, target: Any, to_onehot_y: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) predictions with (B,) class indices (``to_onehot_y``) or (B, C) dense targets as one pooled
    'image': input (1, C, B) and target (1, B) or (1, C, B)."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be torch.Tensors")
    if input.dim() != 2:
        raise ValueError(
            f"classification input must be (B, C) predictions (one row per sample), got shape {tuple(input.shape)}; "
            "for segmentation (B, C, *spatial) use the per-image functions"
        )
    B, C = input.shape
    if to_onehot_y:
        if tuple(target.shape) in ((B,), (B, 1)):
            return input.t().unsqueeze(0), target.reshape(1, B)
        raise ValueError(
            f"classification target must be (B,) = ({B},) class indices with to_onehot_y=True, got shape "
            f"{tuple(target.shape)}" + (" (one-hot targets: pass to_onehot_y=False)" if target.dim() == 2 else "")
        )
    if tuple(target.shape) == (B, C):
        return input.t().unsqueeze(0), target.t().unsqueeze(0)
    hint = " (class indices: pass to_onehot_y=True)" if target.dim() == 1 else ""
    raise ValueError(
        f"classification target must be (B, C) = ({B}, {C}) one-hot/soft labels with to_onehot_y=False, got shape "
        f"{tuple(target.shape)}{hint}"
    )
