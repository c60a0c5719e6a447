"""``nn.Module`` losses over the engine's mL1-ACE, with MONAI's argument conventions.

Each module builds one checked :class:`~calibops.options.Options` at construction (``self.options``) and hands
it to :func:`calibops.engine.loss` on every call; nothing is checked twice. The constructors take MONAI's first
five arguments in MONAI's order (``include_background, to_onehot_y, sigmoid, softmax, other_act``, as in
``monai.losses.DiceLoss``), everything else keyword-only, and follow MONAI's rules:

- ``sigmoid`` / ``softmax`` / ``other_act``: at most one; ``other_act`` is any callable applied to the input
  (in PyTorch, differentiated by autograd) whose output must be probabilities in [0, 1].
- One channel (C = 1): MONAI's binary rule (:mod:`calibops.engine`), with MONAI's warnings, once each.
- ``reduction="none"`` returns (B, C') by default; ``none_shape="broadcast"`` returns MONAI's broadcastable
  (B, C', 1, ..., 1) instead.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from . import engine
from .backends.extension import EXTENSION_ERROR, extension_loaded, has_cpu_kernels
from .contract import ACT_NONE, ACT_SIGMOID, ACT_SOFTMAX, SCHEMES, TARGET_DENSE
from .options import DEFAULTS, Options, check_weight_values, options_from
from .reference import scheme_edges

__all__ = ["HardL1ACELoss", "MarginalL1ACELoss", "MonaiShapeError", "SoftL1ACELoss"]

_NONE_SHAPES = ("compact", "broadcast")


class MarginalL1ACELoss(nn.Module):
    """Marginal L1 Average Calibration Error loss (mL1-ACE), an auxiliary loss for segmentation.

    Add it to Dice + CE: ``loss = dice_ce(logits, labels) + MarginalL1ACELoss(to_onehot_y=True,
    softmax=True)(logits, labels)``. See the module docstring for the MONAI conventions,
    :func:`calibops.functional.marginal_l1_ace` for the other options and docs/options.md for the option table.

    Args:
        include_background, to_onehot_y, sigmoid, softmax, other_act: as in ``monai.losses.DiceLoss`` (same
            order; the rest is keyword-only).
        num_bins: confidence bins M.
        binning: ``"hard"`` or ``"soft"``.
        ignore_empty_classes, weight, reduction, empty_weight, right, ignore_index, backend, validate,
            multi_rater: see :func:`calibops.functional.marginal_l1_ace`. ``weight`` is stored as a buffer
            (follows ``.to``).
        none_shape: with ``reduction="none"``: ``"compact"`` (B, C') or ``"broadcast"`` (B, C', 1, ..., 1)
            as MONAI's losses return.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        num_bins: int = 20,
        binning: str = "hard",
        ignore_empty_classes: bool = True,
        weight: torch.Tensor | list[float] | tuple[float, ...] | float | None = None,
        reduction: str = "mean",
        none_shape: str = "compact",
        empty_weight: float = 0.01,
        right: bool = False,
        ignore_index: int | None = None,
        multi_rater: bool = False,
        backend: str = "auto",
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(include_background, bool) and isinstance(include_background, int):
            raise TypeError(
                f"include_background must be True or False, got {include_background!r}: the first positional "
                "argument follows MONAI's order (include_background, to_onehot_y, sigmoid, softmax, other_act); "
                f"pass the number of bins as num_bins={include_background}"
            )
        self.options = options_from(locals())
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be callable (e.g. torch.tanh) or None, got {type(other_act).__name__}")
        if other_act is not None and (softmax or sigmoid):
            raise ValueError(
                "other_act cannot be combined with softmax=True or sigmoid=True (as in MONAI): pick one activation"
            )
        if not isinstance(none_shape, str) or none_shape not in _NONE_SHAPES:
            raise ValueError(f"none_shape must be one of {_NONE_SHAPES}, got {none_shape!r}")
        self.other_act = other_act
        self.none_shape = none_shape
        w = check_weight_values(weight)  # types, and the values of lists / NumPy arrays
        if w is not None:
            if w.dim() > 1:
                raise ValueError(f"weight must be a 1-D sequence of per-class weights, got shape {tuple(w.shape)}")
            if w.device.type != "meta" and not bool((torch.isfinite(w) & (w >= 0)).all()):
                raise ValueError(f"weight must be finite and >= 0, got {w.tolist()}")
            self.register_buffer("weight", w)
        else:
            self.weight = None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mL1-ACE of ``input`` (B, C, *spatial) against ``target``; a scalar, or for reduction="none" (B, C')
        (``none_shape="broadcast"``: (B, C', 1, ..., 1))."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        x = _activate(self.other_act, input)
        out = engine.loss(x, target, self.options, self.weight)
        if self.options.reduction == "none" and self.none_shape == "broadcast":
            out = out.reshape(*out.shape, *([1] * (input.dim() - 2)))
        return out

    def extra_repr(self) -> str:
        o = self.options
        act = f", other_act={self.other_act!r}" if self.other_act is not None else ""
        return (
            f"include_background={o.include_background}, to_onehot_y={o.to_onehot_y}, "
            f"sigmoid={o.sigmoid}, softmax={o.softmax}{act}, num_bins={o.num_bins}, "
            f"binning={o.binning!r}, reduction={o.reduction!r}, backend={o.backend!r}"
        )


def _activate(other_act: Callable | None, input: torch.Tensor) -> torch.Tensor:
    """``other_act(input)`` (differentiated by autograd), checked to keep the input's shape; ``input`` without one."""
    if other_act is None:
        return input
    x = other_act(input)
    if not isinstance(x, torch.Tensor) or x.shape != input.shape:
        raise ValueError(
            f"other_act must return a tensor of the input's shape {tuple(input.shape)}, got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    return x


def _option_property(name: str) -> property:
    doc = f"The ``{name}`` option (read-only: see ``options``)."
    return property(lambda self: getattr(self.options, name), doc=doc)


for _name in DEFAULTS:  # loss.num_bins, loss.binning, ...: read-only views of the one Options
    setattr(MarginalL1ACELoss, _name, _option_property(_name))


# --------------------------------------------------------------------------------------------------------------
# MONAI 1.7's HardL1ACELoss / SoftL1ACELoss, as drop-ins
# --------------------------------------------------------------------------------------------------------------


class MonaiShapeError(ValueError, AssertionError):
    """A target whose shape does not fit the input, raised by :class:`HardL1ACELoss` / :class:`SoftL1ACELoss`.

    MONAI 1.7's losses raise ``AssertionError`` for a label map with more than one channel (``to_onehot_y=True``)
    and ``ValueError`` (``AssertionError`` in its tests' expectations) for a target of another shape than the
    input; this type derives from both, so every ``except`` clause written for MONAI still catches it.
    """


_MONAI_REDUCTIONS = ("none", "mean", "sum")


def _reduction_value(reduction: Any) -> str:
    """MONAI's ``LossReduction`` enum or its string value as the string (MONAI's check: ``LossReduction(r)``)."""
    value = reduction.value if isinstance(reduction, enum.Enum) else reduction
    if not isinstance(value, str) or value not in _MONAI_REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_MONAI_REDUCTIONS} (or monai.utils.LossReduction), got {reduction!r}"
        )
    return value


def _class_weight(weight: Any) -> torch.Tensor | None:
    """MONAI's ``class_weight`` buffer: ``torch.as_tensor(weight)`` (its dtype kept, so checkpoints match), checked
    once here: a scalar or 1-D, finite, >= 0."""
    if weight is None:
        return None
    if isinstance(weight, (str, bytes)):
        raise TypeError(f"weight must be a number, a sequence of per-class numbers or a tensor, got {weight!r}")
    try:
        w = torch.as_tensor(weight)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"weight must be a number, a sequence of per-class numbers or a tensor, got {type(weight).__name__} ({exc})"
        ) from None
    if w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"weight must hold real numbers (one per class used, or one for all), got {w.dtype} values")
    if w.ndim > 1:
        raise ValueError(f"weight must be a scalar or a one-dimensional sequence, got shape {tuple(w.shape)}")
    if w.device.type != "meta":
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weight must contain only finite values, got {w.tolist()}")
        if bool((w < 0).any()):
            raise ValueError(
                f"the value/values of the `weight` should be no less than 0 (a negative class weight rewards "
                f"miscalibration), got {w.tolist()}"
            )
    return w


class _MonaiL1ACELoss(_Loss):
    """MONAI 1.7's marginal L1-ACE loss interface over the calibops engine (shared by the hard and soft classes).

    Construction builds two checked :class:`~calibops.options.Options` once: one for C > 1 and one for a
    single-channel input (MONAI ignores ``softmax``, ``to_onehot_y`` and ``include_background=False`` there and
    treats the target as the channel's dense target). Setting an option attribute (``loss.num_bins = 10``)
    rebuilds them, checked once; a forward never re-checks an option.
    """

    _BINNING = "hard"
    class_weight: torch.Tensor | None

    def _setup(self, args: dict[str, Any]) -> None:
        """The constructor's work; ``args``: the subclass constructor's ``locals()`` (MONAI's arguments)."""
        num_bins = args["num_bins"]
        nn.Module.__init__(self)  # not _Loss.__init__: ``reduction`` is a property over the one Options
        if isinstance(num_bins, bool):
            raise TypeError(
                f"num_bins must be an integer, got a bool ({num_bins!r}): the first positional argument is "
                "num_bins (MONAI 1.7's order: num_bins, include_background, to_onehot_y, sigmoid, softmax, ...)"
            )
        self._build(
            options_from(args, binning=self._BINNING, reduction=_reduction_value(args["reduction"]))
        )  # option types and values first (sigmoid=True with softmax=True is refused there)
        other_act = args["other_act"]
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be None or callable (e.g. torch.tanh), got {type(other_act).__name__}")
        if other_act is not None and (self.options.sigmoid or self.options.softmax):
            raise ValueError(
                "Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None]; "
                "pick one activation"
            )
        self.other_act = other_act
        self.register_buffer("class_weight", _class_weight(args["weight"]))

    def _build(self, options: Options) -> None:
        # one channel: MONAI ignores softmax / to_onehot_y / include_background=False (warned per call, once each)
        self.__dict__["options"] = options
        self.__dict__["_options_c1"] = options.replace(softmax=False, to_onehot_y=False, include_background=True)

    def _set_option(self, name: str, value: Any) -> None:
        if name == "reduction":
            value = _reduction_value(value)
        self._build(self.options.replace(**{name: value}))

    @property
    def binning(self) -> str:
        """``"hard"`` or ``"soft"`` (fixed by the class)."""
        return self.options.binning

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of ``input`` (B, C, *spatial) against ``target``: a scalar for ``reduction="mean"``/``"sum"``,
        (B, C', 1, ..., 1) for ``"none"`` (C' = C - 1 without the background)."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
        if input.ndim < 3:
            raise ValueError(f"input must have shape (B, C, spatial...), got ndim={input.ndim} {tuple(input.shape)}")
        if not input.is_floating_point():
            raise TypeError(f"input must be a floating point tensor (probabilities or logits), got {input.dtype}")
        o = self.options
        C = input.shape[1]
        x = _activate(self.other_act, input)
        if C == 1:
            engine._single_channel_warnings(o, stacklevel=3)
            run_opts = self._options_c1
        else:
            run_opts = o
        if run_opts.to_onehot_y:
            expected = (input.shape[0], 1, *input.shape[2:])
            if tuple(target.shape) != expected:
                raise MonaiShapeError(
                    f"labels should have a channel with length equal to one: with to_onehot_y=True the target must "
                    f"be a label map of shape (B, 1, *spatial) = {expected}, got {tuple(target.shape)}"
                )
        elif target.shape != input.shape:
            raise MonaiShapeError(
                f"ground truth has different shape ({tuple(target.shape)}) from input ({tuple(input.shape)})"
                + ("; for a label map pass to_onehot_y=True" if target.shape[1:2] == (1,) and C > 1 else "")
            )
        w = self.class_weight
        if w is not None and w.ndim == 1:
            used = C if (C == 1 or o.include_background) else C - 1
            if w.shape[0] != used:
                raise ValueError(
                    "The length of the `weight` sequence should be the same as the number of classes. "
                    "If `include_background=False`, the weight should not include the background category class 0. "
                    f"(got {w.shape[0]} weights for {used} classes used)"
                )
        out = engine.loss(x, target, run_opts, w)
        if o.reduction == "none":
            return out.reshape(*out.shape, *([1] * (input.ndim - 2)))
        return out

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(loss)`` compiles: :class:`_ScriptedL1ACELoss`, the same loss written for
        TorchScript over the compiled ``calibops::binned_stats`` op (see its docstring for what differs)."""
        return _ScriptedL1ACELoss(self)

    def extra_repr(self) -> str:
        o = self.options
        act = f", other_act={self.other_act!r}" if self.other_act is not None else ""
        ew = f", empty_weight={o.empty_weight}" if o.binning == "soft" else ""
        return (
            f"num_bins={o.num_bins}, include_background={o.include_background}, to_onehot_y={o.to_onehot_y}, "
            f"sigmoid={o.sigmoid}, softmax={o.softmax}{act}, reduction={o.reduction!r}{ew}, right={o.right}, "
            f"ignore_empty_classes={o.ignore_empty_classes}, backend={o.backend!r}, validate={o.validate}"
        )


def _monai_option_property(name: str) -> property:
    def get(self: _MonaiL1ACELoss) -> Any:
        return getattr(self.options, name)

    def set_(self: _MonaiL1ACELoss, value: Any) -> None:
        self._set_option(name, value)

    return property(get, set_, doc=f"The ``{name}`` option; setting it rebuilds the checked options once.")


for _name in (
    "num_bins",
    "include_background",
    "to_onehot_y",
    "sigmoid",
    "softmax",
    "right",
    "ignore_empty_classes",
    "reduction",
    "backend",
    "validate",
):
    setattr(_MonaiL1ACELoss, _name, _monai_option_property(_name))


class HardL1ACELoss(_MonaiL1ACELoss):
    """Hard-binned marginal L1 Average Calibration Error loss: ``monai.losses.HardL1ACELoss`` (MONAI 1.7), drop-in.

    Per image and class, probabilities fall into ``num_bins`` equal bins (edges ``linspace(0, 1 + eps32)``); the
    loss is the mean over occupied bins of ``|mean p - mean y|``, each occupied bin counting equally. Same
    constructor as MONAI's (names, positional order, defaults), the same results to float32 rounding, the same
    ``reduction="none"`` shape (B, C', 1, ..., 1), ``class_weight`` buffer (MONAI checkpoints load with
    ``strict=True``), warnings and catchable errors (docs/integrations.md, "MONAI 1.7's losses"). What differs:
    speed and memory (the fused kernels), fp16/bf16 logits activated in float32 (more accurate), and clear errors
    where MONAI computes on bad input (NaN/inf, probabilities outside [0, 1], labels outside [0, C)) unless
    ``validate=False``.

    Args:
        num_bins: number of equally spaced bins. Defaults to 20.
        include_background: whether channel 0 contributes (ignored with a warning when C = 1).
        to_onehot_y: the target is a label map (B, 1, *spatial), one-hot encoded to C classes (ignored, with a
            warning, when C = 1: the target then has the input's shape).
        sigmoid: apply sigmoid to the input.
        softmax: apply softmax over the channels (ignored with a warning when C = 1).
        other_act: a callable applied to the input instead (differentiated by autograd); at most one activation.
        reduction: ``"mean"`` (over all B x C' entries, ignored classes counting as 0), ``"sum"`` or ``"none"``;
            a string or ``monai.utils.LossReduction``.
        weight: a scalar or one non-negative value per class used; stored as the ``class_weight`` buffer.
        right: which side of a bin edge an exact edge value falls on (``torch.bucketize``'s ``right``).
        ignore_empty_classes: a class absent from an image's target contributes 0.
        backend: calibops only (keyword-only): ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or
            ``"reference"``; ``"auto"`` runs float64 input on the float64 reference.
        validate: calibops only (keyword-only): check values (probabilities in [0, 1] and finite, targets in
            [0, 1], labels in [0, C)); ``False`` skips the value checks on a trusted hot path.
    """

    _BINNING = "hard"

    def __init__(
        self,
        num_bins: int = 20,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        reduction: str = "mean",
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        right: bool = False,
        ignore_empty_classes: bool = True,
        *,
        backend: str = "auto",
        validate: bool = True,
    ) -> None:
        self._setup(locals())


class SoftL1ACELoss(_MonaiL1ACELoss):
    """Soft-binned marginal L1 Average Calibration Error loss: ``monai.losses.SoftL1ACELoss`` (MONAI 1.7), drop-in.

    Each probability is shared linearly between its two neighbouring bin centres (``num_bins`` centres of
    ``linspace(0, 1 + eps32, 2 * num_bins + 1)``; below the first / above the last centre it goes wholly to the
    end bin); bins whose effective count is below ``empty_weight`` are left out. Everything else, and what
    differs from MONAI, as :class:`HardL1ACELoss`.

    Args:
        num_bins, include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, weight,
            ignore_empty_classes, backend, validate: as :class:`HardL1ACELoss`.
        empty_weight: minimum effective bin weight (finite, >= 0); empty bins are always left out. Defaults to 0.01.
        right: at an exact bin centre, which interval's slope the gradient takes (MONAI's rule; see
            docs/kernel_contract.md).
    """

    _BINNING = "soft"

    def __init__(
        self,
        num_bins: int = 20,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        reduction: str = "mean",
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        empty_weight: float = 0.01,
        right: bool = False,
        ignore_empty_classes: bool = True,
        *,
        backend: str = "auto",
        validate: bool = True,
    ) -> None:
        self._setup(locals())


SoftL1ACELoss.empty_weight = _monai_option_property("empty_weight")  # type: ignore[attr-defined]


class _ScriptedL1ACELoss(nn.Module):
    """The TorchScript form of :class:`HardL1ACELoss` / :class:`SoftL1ACELoss` (``torch.jit.script(loss)``).

    The eager loss runs Python that TorchScript cannot compile (the frozen options, backend resolution, value
    validation), so scripting compiles this module instead: the same steps written in TorchScript, with the
    statistics from the compiled ``calibops::binned_stats`` op (TorchScript calls registered ops; its autograd
    formula is registered with the op, so ``backward`` works from the scripted module too). Same results as the
    eager loss on float32/float16/bfloat16 input. What differs: it needs the compiled extension (CPU or CUDA
    kernels; not Triton), float64 input is binned in float32 (the result is returned as float64), values are not
    validated (as ``validate=False``), ``other_act`` cannot be scripted (a Python callable), and the errors are
    TorchScript's ``torch.jit.Error`` (a ``RuntimeError``) carrying the eager messages. A scripted module saved
    with ``torch.jit.save`` loads where ``import calibops`` has registered the op.
    """

    def __init__(self, loss: _MonaiL1ACELoss) -> None:
        super().__init__()
        if loss.other_act is not None:
            raise RuntimeError(
                "torch.jit.script cannot compile this calibops loss with other_act set (a Python callable); "
                "use sigmoid=True / softmax=True, or keep the loss eager (or use torch.compile)"
            )
        if not extension_loaded() or not has_cpu_kernels():
            raise RuntimeError(
                "torch.jit.script of a calibops loss needs the compiled extension calibops._C (the scripted loss "
                f"calls the calibops::binned_stats op): {EXTENSION_ERROR or 'it has no CPU kernels'}"
            )
        o = loss.options
        self.num_bins: int = o.num_bins
        self.soft: bool = o.binning == "soft"
        self.scheme: int = SCHEMES[o.binning]
        self.include_background: bool = o.include_background
        self.to_onehot_y: bool = o.to_onehot_y
        self.sigmoid: bool = o.sigmoid
        self.softmax: bool = o.softmax
        self.right: bool = o.right
        self.ignore_empty_classes: bool = o.ignore_empty_classes
        self.empty_weight: float = o.empty_weight
        self.reduction: str = o.reduction
        # the kernel's activation: softmax only for C > 1 (MONAI ignores it for one channel)
        single = ACT_SIGMOID if o.sigmoid else ACT_NONE
        self.activation_multi: int = ACT_SOFTMAX if o.softmax else single
        self.activation_single: int = single
        self.target_kind: int = TARGET_DENSE
        self.register_buffer("class_weight", loss.class_weight)
        self.register_buffer("edges", scheme_edges(o.num_bins, self.scheme, "cpu").clone(), persistent=False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """As :meth:`HardL1ACELoss.forward`."""
        if input.dim() < 3:
            raise ValueError("input must have shape (B, C, spatial...), got ndim=" + str(input.dim()))
        if not input.is_floating_point():
            raise TypeError("input must be a floating point tensor (probabilities or logits)")
        B = input.shape[0]
        C = input.shape[1]
        softmax = self.softmax
        to_onehot_y = self.to_onehot_y
        drop_background = not self.include_background
        if C == 1:
            if softmax:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=2)
            if to_onehot_y:
                warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=2)
            if drop_background:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=2)
            softmax = False
            to_onehot_y = False
            drop_background = False
        x = input.reshape(B, C, -1)
        if x.dtype != torch.float16 and x.dtype != torch.bfloat16:
            x = x.float()
        x = x.contiguous()
        if to_onehot_y:
            if target.dim() != input.dim() or target.shape[0] != B or target.shape[1] != 1:
                raise ValueError(
                    "labels should have a channel with length equal to one: with to_onehot_y=True the target must "
                    "be a label map of shape (B, 1, *spatial)"
                )
            labels = target.reshape(B, -1).long()
            t = torch.nn.functional.one_hot(labels, C).permute(0, 2, 1).float().contiguous()
        else:
            if target.shape != input.shape:
                raise ValueError("ground truth has a different shape from input")
            t = target.detach().reshape(B, C, -1).float().contiguous()
        activation = self.activation_multi if C > 1 else self.activation_single
        edges = self.edges.to(input.device)
        count, sum_p, sum_y, _p2, _py, _bad = torch.ops.calibops.binned_stats(
            x, t, edges, self.num_bins, self.scheme, activation, self.target_kind, 0, False, None, self.right
        )
        if drop_background:
            count, sum_p, sum_y = count[:, 1:], sum_p[:, 1:], sum_y[:, 1:]
        sum_y = sum_y.select(-2, 0)
        if self.soft:
            valid = (count >= self.empty_weight) & (count > 0)
            den = torch.where(valid, count, torch.ones_like(count))
            gap = (sum_p / den - sum_y / den).abs() * valid.to(count.dtype)
        else:
            valid = count > 0
            den = count.detach().clamp(min=1.0)
            gap = (sum_p / den - sum_y / den).abs()
        scale = 1.0 / valid.sum(-1).clamp(min=1).to(gap.dtype)
        if self.ignore_empty_classes:
            scale = scale * (sum_y.detach().sum(-1) > 0).to(gap.dtype)
        per_class = gap.sum(-1) * scale.detach()
        if input.dtype == torch.float64:
            per_class = per_class.double()
        w = self.class_weight
        if w is not None:
            used = per_class.shape[1]
            if w.dim() == 1 and w.shape[0] != used:
                raise ValueError("The length of the `weight` sequence should be the same as the number of classes.")
            per_class = per_class * w.to(per_class).expand(used)
        if self.reduction == "mean":
            return per_class.mean()
        if self.reduction == "sum":
            return per_class.sum()
        shape = [per_class.shape[0], per_class.shape[1]]
        for _ in range(input.dim() - 2):
            shape.append(1)
        return per_class.reshape(shape)
