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

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import engine
from .options import DEFAULTS, Options, check_weight_values

__all__ = ["HardL1ACELoss", "MarginalL1ACELoss", "SoftL1ACELoss"]

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
        self.options = Options(
            num_bins=num_bins,
            binning=binning,
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            softmax=softmax,
            sigmoid=sigmoid,
            ignore_empty_classes=ignore_empty_classes,
            reduction=reduction,
            empty_weight=empty_weight,
            right=right,
            ignore_index=ignore_index,
            backend=backend,
            validate=validate,
            multi_rater=multi_rater,
        )
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
        x = input
        if self.other_act is not None:
            x = self.other_act(x)
            if not isinstance(x, torch.Tensor) or x.shape != input.shape:
                raise ValueError(
                    f"other_act must return a tensor of the input's shape {tuple(input.shape)}, got "
                    f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                )
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


def _option_property(name: str) -> property:
    doc = f"The ``{name}`` option (read-only: see ``options``)."
    return property(lambda self: getattr(self.options, name), doc=doc)


for _name in DEFAULTS:  # loss.num_bins, loss.binning, ...: read-only views of the one Options
    setattr(MarginalL1ACELoss, _name, _option_property(_name))


class HardL1ACELoss(MarginalL1ACELoss):
    """:class:`MarginalL1ACELoss` with hard binning (the 2024 paper's mL1-ACE)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "binning" in kwargs:
            raise TypeError("HardL1ACELoss fixes binning='hard'; use MarginalL1ACELoss to choose")
        super().__init__(*args, binning="hard", **kwargs)


class SoftL1ACELoss(MarginalL1ACELoss):
    """:class:`MarginalL1ACELoss` with soft (triangular-membership) binning (the 2025 paper's soft mL1-ACE)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "binning" in kwargs:
            raise TypeError("SoftL1ACELoss fixes binning='soft'; use MarginalL1ACELoss to choose")
        super().__init__(*args, binning="soft", **kwargs)
