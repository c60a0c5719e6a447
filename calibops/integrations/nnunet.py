"""nnU-Net v2 trainers that add the mL1-ACE calibration loss, and log validation calibration next to pseudo-Dice.

Needs ``pip install 'calibops[nnunet]'`` (nnunetv2; importing this module imports it and raises an ``ImportError``
naming the pip line when it is missing). Run them with ``calibops nnunet train`` / ``calibops nnunet predict``
(``docs/integrations.md``): nnU-Net finds trainers only inside its own package, so ``nnUNetv2_train -tr`` does not
see these classes.

- :class:`nnUNetTrainerHardL1ACE`: nnU-Net's loss (Dice + CE, or Dice + BCE for region-based training) plus
  ``ace_weight * mL1-ACE`` with hard binning (the 2024 paper's loss).
- :class:`nnUNetTrainerSoftL1ACE`: the same with soft (triangular-membership) binning (the 2025 paper's).

What the calibration term does, per training step:

- It is :class:`calibops.MarginalL1ACELoss` (``backend="auto"``: the fused C++ kernel on CPU, the CUDA / Triton
  kernels on GPU) on the network's logits and nnU-Net's label maps straight in: ``softmax=True,
  to_onehot_y=True`` for label training, ``sigmoid=True`` on the region one-hot targets for region-based
  training (overlapping regions: one independent probability per region).
- Weight: ``ace_weight = 1.0`` (default). nnU-Net weighs Dice and CE 1 each, so the three terms stand 1 : 1 : 1,
  the papers' equal weighting (the papers divide the sum by 3; nnU-Net's Dice + CE keeps its own scale here so
  that its learning rate and gradient clipping mean what they mean for ``nnUNetTrainer``).
- ``num_bins = 20`` (the papers'), ``include_background = True`` (the library's default: the background's
  probabilities are calibrated too), ``ignore_empty_classes = True``.
- Deep supervision: ``ace_deep_supervision = "full"`` (default) computes the calibration term on the
  full-resolution output only (calibration is a statement about the probabilities that are exported);
  ``"all"`` computes it on every output that nnU-Net's own loss uses, with nnU-Net's deep supervision weights
  (1/2^k, normalised, lowest output weight 0). Without deep supervision there is one output either way.
- Ignore label: voxels with nnU-Net's ignore label are left out of every statistic (``ignore_index``; for
  region-based training the ignore channel nnU-Net appends to the target is the mask).
- 2D and 3D configurations (any number of spatial axes); mixed precision: under nnU-Net's CUDA autocast the
  logits arrive in float16 and the kernels read them as they are, accumulating in float32.

Validation: every validation patch nnU-Net draws in an epoch also feeds a :class:`calibops.DatasetCalibration`
(hard bins, ``num_bins``, foreground classes or regions, ignore label left out); at the end of the epoch its macro
ECE / ACE / MCE (mean over patches, then over classes) are logged as ``val_ece`` / ``val_ace`` / ``val_mce``,
printed in nnU-Net's training log right after the ``Pseudo dice`` line, and drawn in ``progress.png`` in a panel
under the loss / pseudo-Dice panel.

The options are class attributes; :func:`trainer_class` makes a subclass with other values, named after them so
that differently configured runs get different output folders.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from .._optional import require
from ..functional import marginal_l1_ace
from ..losses import MarginalL1ACELoss
from ..metrics import DatasetCalibration

_trainer_mod = require(
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer", extra="nnunet", what="calibops.integrations.nnunet"
)
_logger_mod = require("nnunetv2.training.logging.nnunet_logger", extra="nnunet", what="calibops.integrations.nnunet")
nnUNetTrainer = _trainer_mod.nnUNetTrainer

__all__ = [
    "DEEP_SUPERVISION_MODES",
    "CalibratedLoss",
    "CalibrationLocalLogger",
    "nnUNetTrainerHardL1ACE",
    "nnUNetTrainerL1ACE",
    "nnUNetTrainerSoftL1ACE",
    "trainer_class",
    "trainer_name",
]

#: Where the calibration term is computed under deep supervision.
DEEP_SUPERVISION_MODES = ("full", "all")
_BASE_NAMES = {"hard": "nnUNetTrainerHardL1ACE", "soft": "nnUNetTrainerSoftL1ACE"}
_DEFAULTS = {"ace_weight": 1.0, "num_bins": 20, "ace_deep_supervision": "full"}
CALIBRATION_KEYS = ("val_ece", "val_ace", "val_mce")


def _number_tag(x: float) -> str:
    return f"{x:g}".replace(".", "p").replace("-", "m").replace("+", "")


def _check_options(binning: Any, ace_weight: Any, num_bins: Any, ace_deep_supervision: Any) -> tuple:
    if binning not in _BASE_NAMES:
        raise ValueError(f"binning must be 'hard' or 'soft', got {binning!r}")
    if isinstance(ace_weight, bool) or not isinstance(ace_weight, (int, float)):
        raise TypeError(f"ace_weight must be a number, got {type(ace_weight).__name__}")
    if not (math.isfinite(ace_weight) and ace_weight >= 0):
        raise ValueError(f"ace_weight must be a finite number >= 0, got {ace_weight!r}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
    if ace_deep_supervision not in DEEP_SUPERVISION_MODES:
        raise ValueError(f"ace_deep_supervision must be one of {DEEP_SUPERVISION_MODES}, got {ace_deep_supervision!r}")
    return binning, float(ace_weight), int(num_bins), ace_deep_supervision


def trainer_name(
    binning: str = "hard", ace_weight: float = 1.0, num_bins: int = 20, ace_deep_supervision: str = "full"
) -> str:
    """The trainer class name (and so nnU-Net's output folder name) for these options.

    The defaults give ``nnUNetTrainerHardL1ACE`` / ``nnUNetTrainerSoftL1ACE``; every non-default option adds a
    suffix: ``_w0p5`` (``ace_weight=0.5``), ``_M15`` (``num_bins=15``), ``_dsall`` (``ace_deep_supervision="all"``).
    """
    binning, ace_weight, num_bins, ds = _check_options(binning, ace_weight, num_bins, ace_deep_supervision)
    name = _BASE_NAMES[binning]
    if ace_weight != _DEFAULTS["ace_weight"]:
        name += f"_w{_number_tag(ace_weight)}"
    if num_bins != _DEFAULTS["num_bins"]:
        name += f"_M{num_bins}"
    if ds != _DEFAULTS["ace_deep_supervision"]:
        name += f"_ds{ds}"
    return name


class CalibratedLoss(nn.Module):
    """nnU-Net's loss plus ``ace_weight * mL1-ACE``.

    Args:
        base: nnU-Net's loss as ``nnUNetTrainer._build_loss`` returns it (a ``DeepSupervisionWrapper`` when deep
            supervision is on: it then takes lists of outputs and targets, highest resolution first).
        ace: the calibration loss (:class:`calibops.MarginalL1ACELoss`, ``reduction="mean"``).
        ace_weight: weight of the calibration term (>= 0).
        ds_weights: the deep supervision weight of each output (nnU-Net's), or None without deep supervision.
        deep_supervision: ``"full"`` (the calibration term on the first, full-resolution output only) or
            ``"all"`` (on every output with a non-zero weight in ``ds_weights``, weighted by it).
        regions: region-based training (sigmoid outputs, one-hot bool targets).
        ignore_label: nnU-Net's ignore label, or None. Label training: the label value left out. Region training:
            the target carries one more channel, the ignore mask, which is left out of the statistics.

    After each call ``last_terms`` holds the detached nnU-Net loss (``"nnunet"``) and calibration term (``"ace"``,
    unweighted). ``observer``, when set, is called with the detached full-resolution output and target of every
    call (the trainer uses it to accumulate validation calibration without a second forward pass).
    """

    def __init__(
        self,
        base: nn.Module,
        ace: MarginalL1ACELoss,
        ace_weight: float,
        ds_weights: Any = None,
        deep_supervision: str = "full",
        regions: bool = False,
        ignore_label: int | None = None,
    ) -> None:
        super().__init__()
        if deep_supervision not in DEEP_SUPERVISION_MODES:
            raise ValueError(f"deep_supervision must be one of {DEEP_SUPERVISION_MODES}, got {deep_supervision!r}")
        self.base = base
        self.ace = ace
        self.ace_weight = float(ace_weight)
        self.ds_weights = None if ds_weights is None else tuple(float(w) for w in ds_weights)
        self.deep_supervision = deep_supervision
        self.regions = bool(regions)
        self.ignore_label = ignore_label
        self.observer: Any = None
        self.last_terms: dict[str, torch.Tensor] = {}

    def calibration_term(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mL1-ACE of one output (B, C, *spatial) logits against nnU-Net's target for it."""
        if not self.regions:
            # label maps (B, 1, *spatial), int16 from nnU-Net's loader: straight into the fused kernel
            return self.ace(output, target)
        if self.ignore_label is None:
            # one independent sigmoid probability per (possibly overlapping) region, bool one-hot target
            return self.ace(output, target)
        # region training with an ignore label: target = (B, R + 1, *spatial), the last channel the ignore mask.
        # Each region's statistics are those of the two-class pair (1 - p, p) = softmax(0, logit) with the
        # label map {0, 1}, ignored voxels set to a third value that ignore_index leaves out; the regions of
        # an image become separate rows of one batch, so the mean over (B, R) rows is the sigmoid loss's mean.
        B, R = output.shape[0], output.shape[1]
        spatial = output.shape[2:]
        logits = output.reshape(B * R, 1, *spatial)
        pair = torch.cat([torch.zeros_like(logits), logits], dim=1)
        ignore = target[:, -1:].bool()
        labels = target[:, :R].to(torch.uint8).masked_fill(ignore, 2).reshape(B * R, 1, *spatial)
        return self.ace.pair_loss(pair, labels)

    def forward(self, output: Any, target: Any) -> torch.Tensor:
        """nnU-Net's loss of ``output`` / ``target`` (lists under deep supervision) plus the weighted term."""
        base = self.base(output, target)
        listed = isinstance(output, (list, tuple))
        outs = list(output) if listed else [output]
        tgts = list(target) if listed else [target]
        if self.observer is not None:
            self.observer(outs[0].detach(), tgts[0])
        if self.ace_weight == 0:
            ace = torch.zeros((), device=outs[0].device)
        elif not listed or self.deep_supervision == "full":
            ace = self.calibration_term(outs[0], tgts[0])
        else:
            weights = self.ds_weights or (1.0,) * len(outs)
            ace = sum(w * self.calibration_term(o, t) for w, o, t in zip(weights, outs, tgts) if w != 0)
        self.last_terms = {"nnunet": base.detach(), "ace": ace.detach()}
        return base + self.ace_weight * ace


class _PairL1ACELoss(MarginalL1ACELoss):
    """:class:`MarginalL1ACELoss` that also computes region terms from (1 - p, p) pairs (ignore label, regions)."""

    def pair_loss(self, pair_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean (or sum, per this loss's reduction) over rows of the foreground channel's mL1-ACE of
        ``pair_logits`` (N, 2, *spatial) (softmax) against ``labels`` (N, 1, *spatial) in {0, 1, 2 = left out}."""
        o = self.options
        rows = marginal_l1_ace(
            pair_logits,
            labels,
            num_bins=o.num_bins,
            binning=o.binning,
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            ignore_empty_classes=o.ignore_empty_classes,
            reduction="none",
            empty_weight=o.empty_weight,
            right=o.right,
            ignore_index=2,
            backend=o.backend,
            validate=o.validate,
        )  # (N, 1)
        return rows.mean() if o.reduction == "mean" else rows.sum()


class _ValidationCalibration:
    """Validation-patch calibration of one epoch: DatasetCalibration over the full-resolution outputs."""

    def __init__(self, num_bins: int, regions: bool, ignore_label: int | None) -> None:
        self.num_bins, self.regions, self.ignore_label = num_bins, regions, ignore_label
        self.metrics: list[DatasetCalibration] | None = None

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        C = output.shape[1]
        if not self.regions:
            if self.metrics is None:
                self.metrics = [
                    DatasetCalibration(
                        C,
                        self.num_bins,
                        include_background=False,  # foreground classes, as nnU-Net's pseudo-Dice
                        to_onehot_y=True,
                        softmax=True,
                        ignore_index=self.ignore_label,
                    ).to(output.device)
                ]
            self.metrics[0].update(output, target)
        elif self.ignore_label is None:
            if self.metrics is None:
                self.metrics = [
                    DatasetCalibration(C, self.num_bins, include_background=True, sigmoid=True).to(output.device)
                ]
            self.metrics[0].update(output, target)
        else:  # one accumulator per region: (1 - p, p) against {0, 1}, ignored voxels = 2
            if self.metrics is None:
                self.metrics = [
                    DatasetCalibration(2, self.num_bins, include_background=False, to_onehot_y=True, ignore_index=2).to(
                        output.device
                    )
                    for _ in range(C)
                ]
            ignore = target[:, -1:].bool()
            for r, metric in enumerate(self.metrics):
                p = torch.sigmoid(output[:, r : r + 1].float())
                labels = target[:, r : r + 1].to(torch.uint8).masked_fill(ignore, 2)
                metric.update(torch.cat([1 - p, p], dim=1), labels)

    def compute(self) -> tuple[float, float, float]:
        """Macro ECE, ACE, MCE (mean over patches per class, then the mean over classes); NaN without data."""
        if self.metrics is None:
            return (math.nan, math.nan, math.nan)
        per_class = [m.compute().macro for m in self.metrics]
        out = []
        for field in ("ece", "ace", "mce"):
            v = torch.cat([getattr(r, field).reshape(-1).float().cpu() for r in per_class])
            v = v[~torch.isnan(v)]
            out.append(float(v.mean()) if v.numel() else math.nan)
        return tuple(out)  # type: ignore[return-value]


class CalibrationLocalLogger(_logger_mod.LocalLogger):
    """nnU-Net's ``LocalLogger`` with the validation calibration (``val_ece``/``val_ace``/``val_mce``) per epoch,
    drawn in ``progress.png`` in a panel under nnU-Net's loss / pseudo-Dice panel."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__(verbose)
        for key in CALIBRATION_KEYS:
            self.my_fantastic_logging[key] = []

    def load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the logged values; a checkpoint without calibration values gets NaN for its epochs."""
        epochs = len(checkpoint.get("train_losses", []))
        for key in CALIBRATION_KEYS:
            checkpoint.setdefault(key, [math.nan] * epochs)
        super().load_checkpoint(checkpoint)

    def plot_progress_png(self, output_folder: str) -> None:
        """nnU-Net's three panels (loss and pseudo-Dice, epoch time, learning rate) plus validation calibration."""
        import matplotlib

        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        log = self.my_fantastic_logging
        epochs = min(len(v) for v in log.values())
        x = list(range(epochs))
        fig, axes = plt.subplots(4, 1, figsize=(15, 24))
        ax = axes[0]
        ax.plot(x, log["train_losses"][:epochs], color="b", label="loss_tr", linewidth=2)
        ax.plot(x, log["val_losses"][:epochs], color="r", label="loss_val", linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(loc="upper left")
        ax2 = ax.twinx()
        ax2.plot(x, log["mean_fg_dice"][:epochs], color="g", ls="dotted", label="pseudo dice", linewidth=2)
        ax2.plot(x, log["ema_fg_dice"][:epochs], color="g", label="pseudo dice (mov. avg.)", linewidth=2)
        ax2.set_ylabel("pseudo dice")
        ax2.legend(loc="upper right")

        ax = axes[1]
        for key, colour in zip(CALIBRATION_KEYS, ("tab:purple", "tab:orange", "tab:brown")):
            ax.plot(x, log[key][:epochs], color=colour, label=f"val {key[4:].upper()}", linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("calibration error (validation patches, macro)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left")
        ax2 = ax.twinx()
        ax2.plot(x, log["mean_fg_dice"][:epochs], color="g", ls="dotted", label="pseudo dice", linewidth=2)
        ax2.set_ylabel("pseudo dice")
        ax2.legend(loc="upper right")

        ax = axes[2]
        times = [e - s for e, s in zip(log["epoch_end_timestamps"][:epochs], log["epoch_start_timestamps"][:epochs])]
        ax.plot(x, times, color="b", label="epoch duration", linewidth=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc="upper left")

        ax = axes[3]
        ax.plot(x, log["lrs"][:epochs], color="b", label="learning rate", linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress.png"))
        plt.close(fig)


class nnUNetTrainerL1ACE(nnUNetTrainer):
    """``nnUNetTrainer`` whose loss adds ``ace_weight * mL1-ACE`` (see the module docstring for every rule).

    Class attributes (subclass, or :func:`trainer_class`, to change them): ``binning`` (``"hard"``/``"soft"``),
    ``ace_weight`` (1.0), ``num_bins`` (20), ``ace_deep_supervision`` (``"full"``/``"all"``),
    ``ace_include_background`` (True). Use :class:`nnUNetTrainerHardL1ACE` or :class:`nnUNetTrainerSoftL1ACE`.
    The constructor is ``nnUNetTrainer``'s; the network architecture is nnU-Net's (so ``calibops nnunet
    predict`` rebuilds it from the plans).
    """

    binning = "hard"
    ace_weight = 1.0
    num_bins = 20
    ace_deep_supervision = "full"
    ace_include_background = True

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnUNetTrainer's signature
    ) -> None:
        # nnU-Net records the constructor's arguments by the names of this signature: keep nnUNetTrainer's
        super().__init__(plans, configuration, fold, dataset_json, device)
        _check_options(self.binning, self.ace_weight, self.num_bins, self.ace_deep_supervision)
        local = CalibrationLocalLogger(self.logger.local_logger.verbose)
        self.logger.local_logger = local
        self._val_calibration: _ValidationCalibration | None = None
        self._calibration_line: str | None = None

    # ------------------------------------------------------------------ loss
    def _build_loss(self) -> nn.Module:
        base = super()._build_loss()
        lm = self.label_manager
        ds_weights = getattr(base, "weight_factors", None) if self.enable_deep_supervision else None
        ace = _PairL1ACELoss(
            include_background=self.ace_include_background,
            to_onehot_y=not lm.has_regions,
            softmax=not lm.has_regions,
            sigmoid=lm.has_regions,
            num_bins=self.num_bins,
            binning=self.binning,
            ignore_index=lm.ignore_label if not lm.has_regions else None,
            backend="auto",
        )
        return CalibratedLoss(
            base,
            ace,
            self.ace_weight,
            ds_weights=ds_weights,
            deep_supervision=self.ace_deep_supervision,
            regions=lm.has_regions,
            ignore_label=lm.ignore_label,
        )

    def on_train_start(self) -> None:
        """nnU-Net's start of training, then the calibration options written next to its debug.json."""
        super().on_train_start()
        self.print_to_log_file(f"calibops: {self.calibration_description()}")
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder, "calibops_trainer.json"), "w") as f:
                json.dump(self.calibration_options(), f, indent=1)

    def calibration_options(self) -> dict[str, Any]:
        """The options of the calibration term (written to ``calibops_trainer.json`` in the fold folder)."""
        import calibops

        return {
            "trainer": type(self).__name__,
            "binning": self.binning,
            "ace_weight": self.ace_weight,
            "num_bins": self.num_bins,
            "ace_deep_supervision": self.ace_deep_supervision,
            "ace_include_background": self.ace_include_background,
            "region_based": bool(self.label_manager.has_regions),
            "ignore_label": self.label_manager.ignore_label,
            "backend": calibops.backend_for(torch.empty(0, device=self.device)),
            "calibops_version": calibops.__version__,
        }

    def calibration_description(self) -> str:
        """One line saying what the loss is."""
        o = self.calibration_options()
        where = (
            "full-resolution output only"
            if o["ace_deep_supervision"] == "full" or not self.enable_deep_supervision
            else "every deep supervision output, nnU-Net's weights"
        )
        act = "sigmoid regions" if o["region_based"] else "softmax"
        return (
            f"loss = nnU-Net's Dice + {'BCE' if o['region_based'] else 'CE'} + {o['ace_weight']:g} * mL1-ACE "
            f"({o['binning']} binning, {o['num_bins']} bins, {act}, {where}, backend {o['backend']})"
        )

    # ------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        """Start a fresh validation calibration accumulator and let the loss feed it."""
        super().on_validation_epoch_start()
        lm = self.label_manager
        self._val_calibration = _ValidationCalibration(self.num_bins, lm.has_regions, lm.ignore_label)
        self.loss.observer = self._val_calibration.update

    def on_validation_epoch_end(self, val_outputs: list) -> None:
        """nnU-Net's pseudo-Dice, then the validation ECE/ACE/MCE logged for this epoch."""
        self.loss.observer = None
        super().on_validation_epoch_end(val_outputs)
        vc = self._val_calibration
        ece, ace, mce = vc.compute() if vc is not None else (math.nan,) * 3
        for key, value in zip(CALIBRATION_KEYS, (ece, ace, mce)):
            self.logger.log(key, value, self.current_epoch)
        self._calibration_line = (
            f"Calibration (validation patches, macro, {self.num_bins} bins): "
            f"ECE {np.round(ece, 4)}  ACE {np.round(ace, 4)}  MCE {np.round(mce, 4)}"
        )
        self._val_calibration = None

    def print_to_log_file(self, *args: Any, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        """nnU-Net's log printer; the epoch's calibration line follows its ``Pseudo dice`` line."""
        super().print_to_log_file(*args, also_print_to_console=also_print_to_console, add_timestamp=add_timestamp)
        if args and args[0] == "Pseudo dice" and self._calibration_line is not None:
            line, self._calibration_line = self._calibration_line, None
            super().print_to_log_file(line, also_print_to_console=also_print_to_console, add_timestamp=add_timestamp)


class nnUNetTrainerHardL1ACE(nnUNetTrainerL1ACE):
    """nnU-Net's Dice + CE plus hard-binned mL1-ACE (weight 1, 20 bins, full resolution): the 2024 paper's loss."""

    binning = "hard"


class nnUNetTrainerSoftL1ACE(nnUNetTrainerL1ACE):
    """nnU-Net's Dice + CE plus soft-binned mL1-ACE (weight 1, 20 bins, full resolution): the 2025 paper's loss."""

    binning = "soft"


def trainer_class(
    binning: str = "hard", ace_weight: float = 1.0, num_bins: int = 20, ace_deep_supervision: str = "full"
) -> type:
    """The trainer class for these options: :class:`nnUNetTrainerHardL1ACE` / :class:`nnUNetTrainerSoftL1ACE` for
    the defaults, else a subclass named by :func:`trainer_name` (so its runs get their own output folder)."""
    binning, ace_weight, num_bins, ds = _check_options(binning, ace_weight, num_bins, ace_deep_supervision)
    base = nnUNetTrainerHardL1ACE if binning == "hard" else nnUNetTrainerSoftL1ACE
    name = trainer_name(binning, ace_weight, num_bins, ds)
    if name == base.__name__:
        return base
    attrs = {
        "ace_weight": ace_weight,
        "num_bins": num_bins,
        "ace_deep_supervision": ds,
        "__module__": __name__,
        "__doc__": f"{base.__name__} with ace_weight={ace_weight:g}, num_bins={num_bins}, ace_deep_supervision={ds!r}",
    }
    return type(name, (base,), attrs)
