"""Thin ``nn.Module`` wrappers over :func:`calibops.functional.marginal_l1_ace`."""

from __future__ import annotations

import torch
from torch import nn

from ._options import check_options, check_weight_values
from .functional import marginal_l1_ace

__all__ = ["HardL1ACELoss", "MarginalL1ACELoss", "SoftL1ACELoss"]


class MarginalL1ACELoss(nn.Module):
    """Marginal L1 Average Calibration Error loss (mL1-ACE), an auxiliary loss for segmentation.

    Add it to Dice + CE: ``loss = dice_ce(logits, labels) + MarginalL1ACELoss(to_onehot_y=True,
    softmax=True)(logits, labels)``. Arguments follow MONAI's conventions; see
    :func:`calibops.functional.marginal_l1_ace` for their meaning and ``README.md`` for the option table.
    ``weight`` (one value per class used) is stored as a buffer so it follows ``.to(device)``.
    """

    def __init__(
        self,
        num_bins: int = 20,
        binning: str = "hard",
        include_background: bool = True,
        to_onehot_y: bool = False,
        softmax: bool = False,
        sigmoid: bool = False,
        ignore_empty_classes: bool = True,
        weight: torch.Tensor | list[float] | tuple[float, ...] | None = None,
        reduction: str = "mean",
        empty_weight: float = 0.01,
        right: bool = False,
        ignore_index: int | None = None,
        backend: str = "auto",
        validate: bool = True,
    ) -> None:
        super().__init__()
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
        self.num_bins = o.num_bins
        self.binning = o.binning
        self.include_background = o.include_background
        self.to_onehot_y = o.to_onehot_y
        self.softmax = o.softmax
        self.sigmoid = o.sigmoid
        self.ignore_empty_classes = o.ignore_empty_classes
        self.reduction = o.reduction
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

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mL1-ACE of ``input`` (B, C, *spatial) against ``target``; scalar, or (B, C') for reduction="none"."""
        return marginal_l1_ace(
            input,
            target,
            num_bins=self.num_bins,
            binning=self.binning,
            include_background=self.include_background,
            to_onehot_y=self.to_onehot_y,
            softmax=self.softmax,
            sigmoid=self.sigmoid,
            ignore_empty_classes=self.ignore_empty_classes,
            weight=self.weight,
            reduction=self.reduction,
            empty_weight=self.empty_weight,
            right=self.right,
            ignore_index=self.ignore_index,
            backend=self.backend,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return (
            f"num_bins={self.num_bins}, binning={self.binning!r}, include_background={self.include_background}, "
            f"to_onehot_y={self.to_onehot_y}, softmax={self.softmax}, sigmoid={self.sigmoid}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


class HardL1ACELoss(MarginalL1ACELoss):
    """:class:`MarginalL1ACELoss` with hard binning (the 2024 paper's mL1-ACE)."""

    def __init__(self, num_bins: int = 20, **kwargs) -> None:
        if "binning" in kwargs:
            raise TypeError("HardL1ACELoss fixes binning='hard'; use MarginalL1ACELoss to choose")
        super().__init__(num_bins, binning="hard", **kwargs)


class SoftL1ACELoss(MarginalL1ACELoss):
    """:class:`MarginalL1ACELoss` with soft (triangular-membership) binning (the 2025 paper's soft mL1-ACE)."""

    def __init__(self, num_bins: int = 20, **kwargs) -> None:
        if "binning" in kwargs:
            raise TypeError("SoftL1ACELoss fixes binning='soft'; use MarginalL1ACELoss to choose")
        super().__init__(num_bins, binning="soft", **kwargs)
