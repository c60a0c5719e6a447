"""What the MONAI and torchmetrics adapters share: tensor unwrapping, the single-channel (C = 1) rule and the
batch contributions they commit (the pure pieces of :mod:`calibops.metrics`)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..metrics import Contribution, MetricConfig, contribution


def plain(x: Any, name: str) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of ``x`` (MONAI ``MetaTensor`` and other subclasses unwrapped)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or a list of them), got {type(x).__name__}")
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


class Accumulator:
    """The adapters' side of a dataset metric: the checked configuration, completed with C at the first batch
    (MONAI's C = 1 rule), and the pure batch contributions of :mod:`calibops.metrics.contribution`.

    ``base`` is checked once, at the adapter's construction (:meth:`MetricConfig.build`, with any C). With one
    channel and ``to_onehot_y=True``, MONAI ignores ``to_onehot_y`` (and ``softmax``) with a warning and uses the
    label map {0, 1} as the target of the channel; this does the same (the statistics then use the label map as a
    dense target). ``ignore_index`` with one channel is refused (leaving voxels out needs a label map over two or
    more channels). Nothing here holds sums: the adapter commits the contributions into its own state, after
    every item of a call has been computed.
    """

    def __init__(self, owner: str, base: MetricConfig) -> None:
        self.owner = owner
        self.base = base
        self.config: MetricConfig | None = None  # set when the first contribution is committed
        self.single = False

    def config_for(self, C: int) -> tuple[MetricConfig, bool]:
        """(the configuration for a C-channel prediction, whether MONAI's single-channel rule applies); the first
        batch's C fixes it (kept by :meth:`committed`)."""
        if self.config is not None:
            return self.config, self.single
        o, single = self.base.options, False
        if C == 1:
            if o.softmax:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=5)
                o = o.replace(softmax=False)
            if o.to_onehot_y:
                warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=5)
                if o.ignore_index is not None:
                    raise ValueError(
                        f"{self.owner}: ignore_index needs two or more channels (a single-channel prediction's "
                        "label map is its dense target); predict background and foreground, or mask the voxels"
                    )
                o = o.replace(to_onehot_y=False)
                single = True
        return self.base.replace(num_classes=C, options=o), single

    def committed(self, config: MetricConfig, single: bool) -> None:
        """Keep the configuration of a committed batch (the first one fixes C)."""
        self.config, self.single = config, single

    def contribution(
        self,
        y_pred: torch.Tensor,
        y: torch.Tensor,
        image_ids: list[Any] | None = None,
        seen: Any = 0,
        fixed: tuple[MetricConfig, bool] | None = None,
    ) -> tuple[Contribution, MetricConfig, bool]:
        """The batch's contribution under this adapter's rules (nothing is changed). ``fixed``: the configuration
        an earlier item of the same call used (so that every item of a first call has the first item's C)."""
        if y_pred.dim() < 2:
            raise ValueError(f"{self.owner}: y_pred must be (B, C, *spatial), got shape {tuple(y_pred.shape)}")
        cfg, single = fixed if fixed is not None else self.config_for(y_pred.shape[1])
        if single and y.dim() == y_pred.dim() - 1:
            y = y.unsqueeze(1)
        if single and not y.is_floating_point():
            y = y.to(torch.uint8) if y.dtype == torch.bool else y.float()
        try:
            return contribution(cfg, y_pred, y, image_ids, seen=seen), cfg, single
        except ValueError as exc:
            if single:
                raise ValueError(
                    f"{exc} (single-channel prediction: the label map is the target of the one channel, "
                    "labels must be 0 or 1)"
                ) from None
            raise
