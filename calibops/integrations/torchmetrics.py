"""A ``torchmetrics.Metric`` for dataset calibration of segmentations (Lightning, ``MetricCollection``).

:class:`DatasetCalibrationMetric` keeps exactly the sums of :class:`calibops.DatasetCalibration` as
torchmetrics states with ``dist_reduce_fx="sum"``: pooled per-(class, bin) ``count, sum_p, sum_y`` and the
reliability histogram (C', M, M), sums of the per-image errors, image counters. Synchronising across
processes therefore moves O(C'·M²) numbers per rank, whatever the number of images or voxels (torchmetrics
gathers each state and sums), and ``compute()`` on every rank equals one process seeing all the data.

Importing this module imports torchmetrics (``pip install 'calibops[torchmetrics]'``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .._optional import require
from ._common import Accumulator, plain

require("torchmetrics", extra="torchmetrics", what="calibops.integrations.torchmetrics")
from torchmetrics import Metric  # noqa: E402

from ..metrics.config import OPTIONS, MetricConfig  # noqa: E402
from ..results import BinnedStats, calibration_errors_from_stats  # noqa: E402

__all__ = ["DatasetCalibrationMetric"]

_NAMES = ("ece", "ace", "mce")


def _class_mean(v: torch.Tensor) -> torch.Tensor:
    ok = ~torch.isnan(v)
    return v[ok].mean() if bool(ok.any()) else torch.tensor(float("nan"), device=v.device)


class DatasetCalibrationMetric(Metric):
    """Macro and micro ECE / ACE / MCE of a segmentation model over a data set, as a torchmetrics ``Metric``.

    Args:
        num_classes: C, the channels of the predictions.
        num_bins, include_background, to_onehot_y, softmax, sigmoid, ignore_index, right, backend, validate:
            as in :class:`calibops.DatasetCalibration` (``include_background`` defaults to True there and
            here, as in MONAI). One channel with ``to_onehot_y=True`` follows MONAI's rule (the label map {0, 1} is the
            channel's target, with a warning).
        class_names: names of the C classes for :meth:`plot` (optional).
        **kwargs: torchmetrics ``Metric`` options (``dist_sync_on_step``, ``process_group``, ...).

    ``update(preds, target)``; ``compute()`` returns a dict of scalar tensors, the mean over classes of the
    macro (``"ece"``, ``"ace"``, ``"mce"``: per-image values averaged over images) and micro (``"micro_ece"``,
    ...: pooled sums) errors, so ``MetricCollection`` and Lightning's ``log_dict`` log six numbers;
    :meth:`compute_per_class` gives (C',) tensors, :meth:`histogram` the dataset reliability histogram and
    :meth:`plot` draws it (``(fig, ax)``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 20,
        include_background: bool = True,
        to_onehot_y: bool = False,
        softmax: bool = False,
        sigmoid: bool = False,
        ignore_index: int | None = None,
        right: bool = False,
        backend: str = "auto",
        validate: bool = True,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        options = {k: v for k, v in locals().items() if k in OPTIONS}
        cfg = MetricConfig.build(num_classes, **options)  # every option checked here, once
        self.num_classes = cfg.num_classes
        self.num_bins = cfg.options.num_bins
        self.classes = cfg.classes
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for num_classes={self.num_classes}")
        self._acc = Accumulator("DatasetCalibrationMetric", cfg)
        for k, (shape, dtype) in cfg.spec().items():
            self.add_state(k, default=torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds`` (B, C, *spatial) probabilities (or logits with softmax/sigmoid), ``target``
        one-hot / dense of the same shape, or a label map with ``to_onehot_y``. Atomic: the batch's whole
        contribution is computed first, then every state is added in one step (a batch that raises adds nothing)."""
        preds, target = plain(preds, "preds"), plain(target, "target")
        if preds.dim() >= 2 and preds.shape[1] != self.num_classes:
            raise ValueError(
                f"preds must have shape (B, {self.num_classes}, *spatial) for num_classes={self.num_classes}, "
                f"got {tuple(preds.shape)}"
            )
        part, cfg, single = self._acc.contribution(preds.detach(), target.detach(), seen=self.num_images)
        new = {k: getattr(self, k) + v.to(getattr(self, k).device) for k, v in part.sums.items()}
        for k, v in new.items():  # nothing left to fail: plain attribute assignments
            setattr(self, k, v)
        self._acc.committed(cfg, single)
        if part.warning is not None:
            warnings.warn(part.warning, RuntimeWarning, stacklevel=2)

    def compute_per_class(self) -> dict[str, torch.Tensor]:
        """Macro (``"ece"``, ...) and micro (``"micro_ece"``, ...) errors per class, (C',) float32 each."""
        n = self.macro_n
        macro = torch.where(n > 0, self.macro_sum / n.clamp(min=1), torch.full_like(self.macro_sum, float("nan")))
        micro = calibration_errors_from_stats(BinnedStats(self.count, self.sum_p, self.sum_y))
        out = {k: macro[i].float() for i, k in enumerate(_NAMES)}
        out.update({f"micro_{k}": v.float() for k, v in zip(_NAMES, micro, strict=True)})
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        """The mean over classes (NaN classes skipped) of each per-class value of :meth:`compute_per_class`."""
        return {k: _class_mean(v) for k, v in self.compute_per_class().items()}

    def histogram(self) -> torch.Tensor:
        """The dataset reliability histogram ``H[c, a, j]`` (C', M, M) int64 of the (synced) states."""
        return self.hist.clone()

    def plot(self, val: Any = None, ax: Any = None, class_index: int | None = None) -> tuple[Any, Any]:
        """Draw the dataset reliability histogram into ``ax`` (a new figure when None); returns ``(fig, ax)``.

        ``class_index`` picks one evaluated class (default: all classes summed). With ``val`` (values from
        :meth:`compute`), torchmetrics' own value plot is drawn instead.
        """
        if val is not None:
            return self._plot(val, ax)
        from ..plot import SINGLE_COLUMN, _import_matplotlib, _new_figure, dataset_reliability_histogram

        _import_matplotlib()
        if ax is None:
            fig = _new_figure(SINGLE_COLUMN, 0.83 * SINGLE_COLUMN)  # single column, calibops' figure style
            ax = fig.add_subplot(1, 1, 1)
        names = [self.class_names[c] for c in self.classes] if self.class_names else None
        ctx = contextlib.nullcontext() if self._is_synced else self.sync_context()  # all ranks' sums
        with ctx:
            fig = dataset_reliability_histogram(self.hist, class_names=names, ax=ax, class_index=class_index)
        return fig, ax
