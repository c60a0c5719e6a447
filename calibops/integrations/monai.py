"""MONAI drop-ins: a calibration metric, an Ignite handler and a Dice + CE + mL1-ACE loss.

Replace ``from monai.metrics import CalibrationErrorMetric`` by ``from calibops.integrations.monai import
CalibrationErrorMetric`` (and ``monai.handlers.CalibrationError`` likewise): the constructor's first six
arguments, ``__call__(y_pred, y)`` on batch-first tensors or decollated lists of channel-first tensors,
``aggregate()``, ``get_buffer()``, ``reset()`` and the numbers (where the definitions coincide, see
``docs/integrations.md``) are MONAI's. On top, every call also feeds a :class:`calibops.DatasetCalibration`
(``metric.dataset``): pooled (micro) errors, the dataset reliability histogram and per-image records, in
O(C·M²) memory plus the per-image buffer MONAI keeps anyway; and the statistics run in calibops' fused kernels,
which also accept label maps (``to_onehot_y``), logits (``softmax`` / ``sigmoid``) and ``ignore_index``.

Importing this module imports MONAI (``pip install 'calibops[monai]'``); the handler also needs
``pytorch-ignite``.
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._optional import require
from ._common import Accumulator, plain

_monai_metrics = require("monai.metrics", extra="monai", what="calibops.integrations.monai")
from monai.metrics import CumulativeIterationMetric  # noqa: E402
from monai.metrics.utils import do_metric_reduction  # noqa: E402

from ..losses import MarginalL1ACELoss  # noqa: E402

__all__ = ["CalibrationError", "CalibrationErrorMetric", "DiceCEL1ACELoss"]

_REDUCTIONS = {"expected": 0, "average": 1, "maximum": 2}
_NAMES = ("ece", "ace", "mce")
#: the handler's arguments that configure its CalibrationErrorMetric


def _image_ids(x: Any, batch: int) -> list[Any] | None:
    """File names (without directories) from a MetaTensor's ``filename_or_obj``, when there are ``batch`` of them."""
    meta = getattr(x, "meta", None)
    if not isinstance(meta, dict):
        return None
    f = meta.get("filename_or_obj")
    if isinstance(f, (str, os.PathLike)):
        f = [f]
    if isinstance(f, (list, tuple)) and len(f) == batch and all(isinstance(v, (str, os.PathLike)) for v in f):
        return [os.path.basename(os.fspath(v)) for v in f]
    return None


class CalibrationErrorMetric(CumulativeIterationMetric):
    """Calibration error of segmentation probabilities, MONAI-compatible (``monai.metrics.CalibrationErrorMetric``).

    Args:
        num_bins, include_background, calibration_reduction, metric_reduction, get_not_nans, right: MONAI's
            arguments, same order and defaults (``calibration_reduction``: ``"expected"`` ECE, ``"average"``
            ACE, ``"maximum"`` MCE; ``metric_reduction``: MONAI's ``"mean"``, ``"sum"``, ``"mean_batch"``, ...).
        to_onehot_y: ``y`` is an integer label map (B, 1, *spatial) / (B, *spatial) instead of one-hot.
        softmax / sigmoid: ``y_pred`` holds logits.
        ignore_index: label value left out of every statistic (needs ``to_onehot_y``).
        backend, validate, nonfinite: as in :class:`calibops.DatasetCalibration`.

    ``__call__`` returns (B, C') per-image values of the chosen reduction (NaN where an image has no voxel);
    ``get_buffer()`` returns them for every image seen, ``get_buffers()`` all three (``"ece"``, ``"ace"``,
    ``"mce"``), ``aggregate()`` reduces the chosen one with MONAI's ``do_metric_reduction`` and
    ``aggregate_all()`` all three. ``dataset`` is the :class:`calibops.DatasetCalibration` fed by every call
    (None before the first); ``reset()`` clears both.
    """

    def __init__(
        self,
        num_bins: int = 20,
        include_background: bool = True,
        calibration_reduction: str = "expected",
        metric_reduction: str = "mean",
        get_not_nans: bool = False,
        right: bool = False,
        *,
        to_onehot_y: bool = False,
        softmax: bool = False,
        sigmoid: bool = False,
        ignore_index: int | None = None,
        backend: str = "auto",
        validate: bool = True,
        nonfinite: str = "raise",
    ) -> None:
        red = str(getattr(calibration_reduction, "value", calibration_reduction))
        if red not in _REDUCTIONS:
            raise ValueError(
                f"calibration_reduction must be one of {tuple(_REDUCTIONS)}, got {calibration_reduction!r}"
            )
        # checks every option now, once (a wrong one raises here, not at the first batch); C is set at the first batch
        from ..metrics.config import OPTIONS, MetricConfig

        given = {k: v for k, v in locals().items() if k in OPTIONS or k == "nonfinite"}
        base = MetricConfig.build(1, keep_records=True, **given)
        self._acc = Accumulator("CalibrationErrorMetric", base)
        self._dataset = None
        super().__init__()
        self.num_bins = num_bins
        self.include_background = include_background
        self.calibration_reduction = red
        self.metric_reduction = metric_reduction
        self.get_not_nans = get_not_nans
        self.right = right

    @property
    def dataset(self):
        """The :class:`calibops.DatasetCalibration` fed by every call (None before the first call)."""
        return self._dataset

    def reset(self) -> None:
        """Clear the per-image buffers and the dataset statistics."""
        super().reset()
        if getattr(self, "_dataset", None) is not None:
            self._dataset.reset()

    def __call__(self, y_pred: Any, y: Any = None, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Add a batch (tensor, batch first) or a list of channel-first tensors; returns (B, C') values.

        Atomic, lists included: every item's contribution is computed first, then all are committed to
        :attr:`dataset` and the per-image buffer together, so a call that raises changes neither."""
        if y is None:
            raise ValueError("CalibrationErrorMetric needs the ground truth: call metric(y_pred=..., y=...)")
        ret = super(CumulativeIterationMetric, self).__call__(y_pred=y_pred, y=y, **kwargs)
        self.extend(*ret)
        return ret[_REDUCTIONS[self.calibration_reduction]]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any):  # type: ignore[override]
        return self._add([(y_pred, y)])

    def _compute_list(self, y_pred: Any, y: Any = None, **kwargs: Any):  # type: ignore[override]
        if not isinstance(y_pred, (list, tuple)) or not isinstance(y, (list, tuple)) or len(y_pred) != len(y):
            raise ValueError(
                "CalibrationErrorMetric: y_pred and y must both be lists (or tuples) of channel-first tensors of "
                f"the same length, got {type(y_pred).__name__} and {type(y).__name__}"
            )
        if not y_pred:
            raise ValueError("CalibrationErrorMetric: y_pred is an empty list")
        items = [
            (plain(p, f"y_pred[{k}]").detach().unsqueeze(0), plain(t, f"y[{k}]").detach().unsqueeze(0))
            for k, (p, t) in enumerate(zip(y_pred, y, strict=True))
        ]
        return self._add(items, meta=y_pred)

    def _add(self, items: list[tuple[Any, Any]], meta: Any = None) -> list[torch.Tensor]:
        """Every item's contribution first, then one commit; returns the per-image ECE / ACE / MCE (B, C')."""
        ds = self._dataset
        seen = int(ds.state_tensors()["num_images"]) if ds is not None else 0
        parts, cfg, single = [], None, False
        for k, (p, t) in enumerate(items):
            x, tt = plain(p, "y_pred"), plain(t, "y")
            ids = _image_ids(p if meta is None else meta[k], x.shape[0]) if x.dim() >= 1 else None
            try:
                fixed = (cfg, single) if cfg is not None else None
                part, cfg, single = self._acc.contribution(x, tt, image_ids=ids, seen=seen, fixed=fixed)
            except (ValueError, TypeError) as exc:
                if meta is None:
                    raise
                raise type(exc)(f"item {k} of the list: {exc}") from None
            parts.append(part)
            seen += part.num_images
        if ds is None:
            from ..metrics import DatasetCalibration

            ds = DatasetCalibration.from_config(cfg)
        ds.commit(parts)
        self._dataset = ds
        self._acc.committed(cfg, single)
        vals = torch.cat([torch.stack(list(part.errors), -1).float() for part in parts])  # (B, C', 3)
        return [vals[..., 0], vals[..., 1], vals[..., 2]]

    def get_buffers(self) -> dict[str, torch.Tensor] | None:
        """Per-image ECE, ACE and MCE, each (images, C'), gathered over ranks when distributed (a collective: call
        it on every rank). A rank that saw no batch takes part with an empty buffer and gets every other rank's
        images, where MONAI's own gather returns early on that rank and leaves the others waiting for it."""
        from ..metrics.state import dist_ready

        if not dist_ready(None):
            bufs = super().get_buffer()
            return None if bufs is None else dict(zip(_NAMES, bufs, strict=True))
        import torch.distributed as dist

        local = None
        if self._buffers is not None and all(len(b) for b in self._buffers):
            local = [torch.stack(b, 0).detach() for b in self._buffers]
        parts: list[Any] = [None] * dist.get_world_size()
        # every rank, empty or not, sends its buffers (CPU copies; images x C' values, rank order kept)
        dist.all_gather_object(parts, None if local is None else [t.cpu() for t in local])
        got = [p for p in parts if p is not None]
        if not got:
            return None
        device = local[0].device if local is not None else torch.device("cpu")
        return {name: torch.cat([p[i] for p in got]).to(device) for i, name in enumerate(_NAMES)}

    def get_buffer(self) -> torch.Tensor | None:  # type: ignore[override]
        """Per-image values of ``calibration_reduction``, (images, C') (what MONAI's handlers save)."""
        bufs = self.get_buffers()
        return None if bufs is None else bufs[_NAMES[_REDUCTIONS[self.calibration_reduction]]]

    def aggregate(self, reduction: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """MONAI's reduction of the per-image values (NaN entries skipped); ``(value, not_nans)`` with get_not_nans."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("CalibrationErrorMetric: nothing to aggregate; call the metric on a batch first")
        f, not_nans = do_metric_reduction(data, reduction or self.metric_reduction)
        return (f, not_nans) if self.get_not_nans else f

    def aggregate_all(self, reduction: str | None = None) -> dict[str, torch.Tensor]:
        """:meth:`aggregate` of ECE, ACE and MCE at once: ``{"ece": ..., "ace": ..., "mce": ...}``."""
        bufs = self.get_buffers()
        if bufs is None:
            raise ValueError("CalibrationErrorMetric: nothing to aggregate; call the metric on a batch first")
        return {k: do_metric_reduction(v, reduction or self.metric_reduction)[0] for k, v in bufs.items()}


def _ignite_base():
    require(
        "ignite",
        extra="monai",
        what="calibops.integrations.monai.CalibrationError (an Ignite handler)",
        package="pytorch-ignite",
    )
    from monai.handlers.ignite_metric import IgniteMetricHandler

    return IgniteMetricHandler


class CalibrationError(_ignite_base()):  # type: ignore[misc]
    """Ignite handler (``monai.handlers.CalibrationError`` drop-in) over :class:`CalibrationErrorMetric`.

    After each run (epoch) of the engine it is attached to, ``engine.state.metrics[name]`` holds the chosen
    reduction (as MONAI's handler), and ``{name}_ece``, ``{name}_ace``, ``{name}_mce`` (per-image values
    reduced as ``metric_reduction``, default mean) and ``{name}_micro_ece`` / ``_micro_ace`` / ``_micro_mce``
    (pooled over the data set, mean over classes) hold all three; one log line gives them. With
    ``output_dir`` it writes, every epoch (``engine.state.epoch``), ``{name}_epoch{E:04d}_per_image.csv``
    (image, class, ece, ace, mce, voxels; image = the file name from the MetaTensor when known),
    ``{name}_epoch{E:04d}_histogram.npz`` (histogram (C', M, M), pooled counts (C', M), classes) and, with
    ``figures=True`` (needs matplotlib, checked here), ``{name}_epoch{E:04d}_histogram.pdf`` and ``.png`` (300 dpi).
    Under
    ``torch.distributed`` every rank computes the same numbers and rank 0 writes the files.

    The first six arguments are MONAI's (``num_bins, include_background, calibration_reduction,
    metric_reduction, output_transform, save_details``); the others are keyword-only.
    """

    def __init__(
        self,
        num_bins: int = 20,
        include_background: bool = True,
        calibration_reduction: str = "expected",
        metric_reduction: str = "mean",
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        *,
        to_onehot_y: bool = False,
        softmax: bool = False,
        sigmoid: bool = False,
        ignore_index: int | None = None,
        right: bool = False,
        backend: str = "auto",
        validate: bool = True,
        nonfinite: str = "raise",
        output_dir: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        figures: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        # the metric's own arguments (every option it takes, checked there once)
        metric_args = inspect.signature(CalibrationErrorMetric).parameters
        metric_fn = CalibrationErrorMetric(**{k: v for k, v in locals().items() if k in metric_args})
        if output_dir is not None and figures:
            from ..plot import _import_matplotlib

            _import_matplotlib()  # a missing matplotlib fails now, not after the first epoch
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.figures = figures
        self.logger = logger or logging.getLogger("calibops")
        self.written: list[Path] = []
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    def compute(self) -> Any:
        """The chosen reduction (MONAI's value); also fills the extra metrics and writes the files."""
        result = super().compute()
        m: CalibrationErrorMetric = self.metric_fn  # type: ignore[assignment]
        ds = m.dataset
        engine, name = self._engine, self._name or "calibration"
        values = {k: float(v.reshape(-1).float().nanmean()) for k, v in m.aggregate_all().items()}
        res = ds.compute()
        for k, v in zip(_NAMES, res.micro, strict=True):
            ok = ~torch.isnan(v)
            values[f"micro_{k}"] = float(v[ok].mean()) if bool(ok.any()) else math.nan
        if engine is not None:
            for k, v in values.items():
                engine.state.metrics[f"{name}_{k}"] = v
        epoch = int(getattr(getattr(engine, "state", None), "epoch", 0) or 0)
        self.logger.info(
            "epoch %d %s: %s",
            epoch,
            name,
            ", ".join(f"{k.upper().replace('MICRO_', 'micro ')} {v:.4f}" for k, v in values.items()),
        )
        if self.output_dir is not None:
            self._write(ds, name, epoch)
        return result

    def _write(self, ds: Any, name: str, epoch: int) -> None:
        import torch.distributed as dist

        records = ds.records(gather=True)  # collectives first, on every rank
        hist, counts = ds.histogram(), ds.pooled_counts()
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{name}_epoch{epoch:04d}"
        names = self.class_names
        if names is not None and len(names) == ds.num_classes:
            names = [names[c] for c in ds.classes]
        if names is not None and len(names) != ds.num_used_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names; give one per class ({ds.num_classes}) "
                f"or per evaluated class ({ds.num_used_classes})"
            )
        names = names or [f"class {c}" for c in ds.classes]
        fields = ["image", "class", *_NAMES, "voxels"]
        with open(f"{stem}_per_image.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(records)
        np.savez(
            f"{stem}_histogram.npz",
            histogram=hist.cpu().numpy(),
            counts=counts.cpu().numpy(),
            classes=np.asarray(ds.classes),
            class_names=np.asarray(names),
        )
        written = [Path(f"{stem}_per_image.csv"), Path(f"{stem}_histogram.npz")]
        if self.figures:
            from ..plot import dataset_reliability_histogram, save_figure

            fig = dataset_reliability_histogram(hist, counts=counts, class_names=names, title=f"{name}, epoch {epoch}")
            written += save_figure(fig, f"{stem}_histogram")  # .pdf and a 300-dpi .png
        self.written += written


class DiceCEL1ACELoss(nn.Module):
    """``lambda_dice * Dice + lambda_ce * CE + lambda_ace * mL1-ACE``: MONAI's ``DiceCELoss`` plus the calibration term.

    The arguments up to ``label_smoothing`` are ``monai.losses.DiceCELoss``'s (same order, same meaning: the
    activation flags and ``other_act`` apply to Dice and to mL1-ACE, CE takes the logits); then, keyword-only,
    ``lambda_ace`` (>= 0; the 2025 paper's equal weighting is ``lambda_dice = lambda_ce = lambda_ace = 1/3``),
    ``num_bins``, ``binning`` (``"hard"``/``"soft"``) and ``ace_options`` (more keyword arguments of
    :class:`calibops.MarginalL1ACELoss`, e.g. ``{"empty_weight": 0.01}``). ``weight`` (C class weights) goes
    to CE as in MONAI, and to Dice and mL1-ACE without the background entry when ``include_background=False``.
    After each call ``last_terms`` holds the three unweighted terms (detached), for logging.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        *,
        lambda_ace: float = 1.0,
        num_bins: int = 20,
        binning: str = "hard",
        ace_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum' (as MONAI's DiceCELoss), got {reduction!r}")
        if not (isinstance(lambda_ace, (int, float)) and math.isfinite(lambda_ace) and lambda_ace >= 0):
            raise ValueError(f"lambda_ace must be a finite number >= 0, got {lambda_ace!r}")
        self.dice_ce = DiceCELoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            weight=weight,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            label_smoothing=label_smoothing,
        )
        ace_weight = None
        if weight is not None:
            w = torch.as_tensor(weight, dtype=torch.float32)
            ace_weight = w[1:] if (not include_background and w.dim() == 1 and w.numel() > 1) else w
        self.ace = MarginalL1ACELoss(
            include_background,
            to_onehot_y,
            sigmoid,
            softmax,
            other_act,
            num_bins=num_bins,
            binning=binning,
            weight=ace_weight,
            reduction=reduction,
            **(ace_options or {}),
        )
        self.lambda_dice, self.lambda_ce, self.lambda_ace = float(lambda_dice), float(lambda_ce), float(lambda_ace)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the three terms; ``input`` (B, C, *spatial) logits, ``target`` as in DiceCELoss."""
        dice = self.dice_ce.dice(input, target)
        ce = self.dice_ce.ce(input, target) if input.shape[1] != 1 else self.dice_ce.bce(input, target)
        ace = self.ace(input, target)
        self.last_terms = {"dice": dice.detach(), "ce": ce.detach(), "ace": ace.detach()}
        return self.lambda_dice * dice + self.lambda_ce * ce + self.lambda_ace * ace
