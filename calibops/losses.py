"""``nn.Module`` losses over :func:`calibops.functional.marginal_l1_ace`, with MONAI's argument conventions.

The constructors take MONAI's first five arguments in MONAI's order (``include_background, to_onehot_y,
sigmoid, softmax, other_act``, as in ``monai.losses.DiceLoss``), everything else keyword-only, and follow
MONAI's rules:

- ``sigmoid`` / ``softmax`` / ``other_act``: at most one; ``other_act`` is any callable applied to the input
  (in PyTorch, differentiated by autograd) whose output must be probabilities in [0, 1].
- One channel (C = 1): ``softmax=True`` and ``to_onehot_y=True`` are ignored with MONAI's warnings
  (``"single channel prediction, `softmax=True` ignored."``); the label map (B, 1, *spatial) or (B, *spatial)
  with values {0, 1} is the target of the single channel (foreground = 1), with or without ``ignore_index``.
  ``include_background=False`` is ignored with a warning as well (there is only one channel to keep).
- ``reduction="none"`` returns (B, C') by default; ``none_shape="broadcast"`` returns MONAI's broadcastable
  (B, C', 1, ..., 1) instead.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._options import as_bool, check_options, check_weight_values
from .functional import marginal_l1_ace

__all__ = ["HardL1ACELoss", "MarginalL1ACELoss", "SoftL1ACELoss"]

_NONE_SHAPES = ("compact", "broadcast")


def _functional_takes(name: str) -> bool:
    return name in inspect.signature(marginal_l1_ace).parameters


class MarginalL1ACELoss(nn.Module):
    """Marginal L1 Average Calibration Error loss (mL1-ACE), an auxiliary loss for segmentation.

    Add it to Dice + CE: ``loss = dice_ce(logits, labels) + MarginalL1ACELoss(to_onehot_y=True,
    softmax=True)(logits, labels)``. See the module docstring for the MONAI conventions,
    :func:`calibops.functional.marginal_l1_ace` for the other options and ``docs/usage.md`` for the option table.

    Args:
        include_background, to_onehot_y, sigmoid, softmax, other_act: as in ``monai.losses.DiceLoss`` (same
            order; the rest is keyword-only).
        num_bins: confidence bins M.
        binning: ``"hard"`` or ``"soft"``.
        ignore_empty_classes, weight, reduction, empty_weight, right, ignore_index, backend, validate: see
            :func:`calibops.functional.marginal_l1_ace`. ``weight`` is stored as a buffer (follows ``.to``).
        none_shape: with ``reduction="none"``: ``"compact"`` (B, C') or ``"broadcast"`` (B, C', 1, ..., 1)
            as MONAI's losses return.
        multi_rater: the target holds several raters' label maps (passed to the functional; see there).
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
        weight: torch.Tensor | list[float] | tuple[float, ...] | None = None,
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
        o = check_options(
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
        )
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be callable (e.g. torch.tanh) or None, got {type(other_act).__name__}")
        if other_act is not None and (o.softmax or o.sigmoid):
            raise ValueError(
                "other_act cannot be combined with softmax=True or sigmoid=True (as in MONAI): pick one activation"
            )
        if not isinstance(none_shape, str) or none_shape not in _NONE_SHAPES:
            raise ValueError(f"none_shape must be one of {_NONE_SHAPES}, got {none_shape!r}")
        self.multi_rater = as_bool("multi_rater", multi_rater)
        if self.multi_rater and not _functional_takes("multi_rater"):  # pragma: no cover - older functional
            raise TypeError("multi_rater=True needs calibops.functional.marginal_l1_ace with multi_rater support")
        self.num_bins = o.num_bins
        self.binning = o.binning
        self.include_background = o.include_background
        self.to_onehot_y = o.to_onehot_y
        self.softmax = o.softmax
        self.sigmoid = o.sigmoid
        self.other_act = other_act
        self.ignore_empty_classes = o.ignore_empty_classes
        self.reduction = o.reduction
        self.none_shape = none_shape
        self.empty_weight = o.empty_weight
        self.right = o.right
        self.ignore_index = o.ignore_index
        self.backend = o.backend
        self.validate = o.validate
        w = check_weight_values(weight)  # types, and the values of lists / NumPy arrays
        if w is not None:
            if w.dim() > 1:
                raise ValueError(f"weight must be a 1-D sequence of per-class weights, got shape {tuple(w.shape)}")
            if w.device.type != "meta" and not bool((torch.isfinite(w) & (w >= 0)).all()):
                raise ValueError(f"weight must be finite and >= 0, got {w.tolist()}")
            self.register_buffer("weight", w)
        else:
            self.weight = None

    def _call(self, x: torch.Tensor, target: torch.Tensor, **changes: Any) -> torch.Tensor:
        kw: dict[str, Any] = {
            "num_bins": self.num_bins,
            "binning": self.binning,
            "include_background": self.include_background,
            "to_onehot_y": self.to_onehot_y,
            "softmax": self.softmax,
            "sigmoid": self.sigmoid,
            "ignore_empty_classes": self.ignore_empty_classes,
            "weight": self.weight,
            "reduction": self.reduction,
            "empty_weight": self.empty_weight,
            "right": self.right,
            "ignore_index": self.ignore_index,
            "backend": self.backend,
            "validate": self.validate,
        }
        kw.update(changes)
        if self.multi_rater:
            kw["multi_rater"] = True
        return marginal_l1_ace(x, target, **kw)

    def _single_channel(self, x: torch.Tensor, target: torch.Tensor, sigmoid: bool) -> torch.Tensor:
        """C = 1 with a label map: the labels {0, 1} are the target of the one channel (MONAI's rule)."""
        spatial = tuple(x.shape[2:])
        if tuple(target.shape) == (x.shape[0], *spatial):
            target = target.unsqueeze(1)
        if self.ignore_index is None and not target.is_floating_point():
            target = target.to(torch.uint8) if target.dtype == torch.bool else target.to(x.dtype)
        note = (
            " (single-channel input: to_onehot_y is ignored as in MONAI and the label map is the target of the one "
            "channel, so labels must be 0 or 1"
            + (f" or ignore_index={self.ignore_index})" if self.ignore_index is not None else ")")
        )
        try:
            if self.ignore_index is None:
                return self._call(x, target, to_onehot_y=False, softmax=False, sigmoid=sigmoid)
            # leaving voxels out needs a label map: the probabilities of {background, foreground} as two
            # channels, the foreground's statistics are exactly those of the one channel
            p = torch.sigmoid(x) if sigmoid else x
            two = torch.cat([1 - p, p], dim=1)
            return self._call(two, target, to_onehot_y=True, softmax=False, sigmoid=False, include_background=False)
        except ValueError as exc:
            raise ValueError(f"{exc}{note}") from None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mL1-ACE of ``input`` (B, C, *spatial) against ``target``; a scalar, or for reduction="none" (B, C')
        (``none_shape="broadcast"``: (B, C', 1, ..., 1))."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        x = input
        single = x.dim() >= 2 and x.shape[1] == 1
        sigmoid = self.sigmoid
        if single and self.softmax:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=2)
        if self.other_act is not None:
            x = self.other_act(x)
            if not isinstance(x, torch.Tensor) or x.shape != input.shape:
                raise ValueError(
                    f"other_act must return a tensor of the input's shape {tuple(input.shape)}, got "
                    f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                )
        if single and self.to_onehot_y:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=2)
            if not self.include_background:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=2)
            out = self._single_channel(x, target, sigmoid)
        elif single and self.softmax:
            out = self._call(x, target, softmax=False)
        else:
            out = self._call(x, target)
        if self.reduction == "none" and self.none_shape == "broadcast":
            out = out.reshape(*out.shape, *([1] * (input.dim() - 2)))
        return out

    def extra_repr(self) -> str:
        act = f", other_act={self.other_act!r}" if self.other_act is not None else ""
        return (
            f"include_background={self.include_background}, to_onehot_y={self.to_onehot_y}, "
            f"sigmoid={self.sigmoid}, softmax={self.softmax}{act}, num_bins={self.num_bins}, "
            f"binning={self.binning!r}, reduction={self.reduction!r}, backend={self.backend!r}"
        )


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
