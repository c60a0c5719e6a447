"""Dataset-level calibration: a constant-memory accumulator of per-image and pooled statistics.

:class:`DatasetCalibration` consumes batches of predictions and labels, runs the fused statistics kernel
(``calibops.engine``, hard bins, no gradient) and keeps only sums. It is split by job:

- :mod:`calibops.metrics.config` (:class:`~calibops.metrics.config.MetricConfig`): every option, checked once at
  construction, and the state layout that follows from them;
- :mod:`calibops.metrics.contribution`: a pure function from one batch to its complete contribution (every sum
  and the new records); :meth:`DatasetCalibration.update` computes it, then commits it in one step, so a batch
  that raises leaves the state bit-identical;
- :mod:`calibops.metrics.state` (:class:`~calibops.metrics.state.SumState`): the named sum tensors, their device,
  the one-step commit, the **one** all-reduce that sums them over ``torch.distributed`` ranks (gloo and nccl)
  and the checks of a loaded state;
- :mod:`calibops.metrics.checkpoint`: ``state_dict`` / ``load_state_dict`` and the consistency checks;
- :mod:`calibops.metrics.formulas`: the dataset formulas on the summed state (macro / micro errors, groups and
  gaps, bootstrap, Brier, adaptive bins), built on the per-bin formulas of :mod:`calibops.reference` and
  :mod:`calibops.evaluation` — never repeated here;
- :mod:`calibops.metrics.records`: the optional per-(image, class) records (CSV, gathering, Dice);
- :mod:`calibops.metrics.report` / :mod:`calibops.plot`: figures.

The sums (all O(C'·M²) whatever the number of images or voxels):

- pooled (micro) statistics ``count, sum_p, sum_y`` per (class, bin), float64: (C', M) each;
- sums of the per-image ECE/ACE/MCE (``macro_sum``, (3, C')) and L2 (``macro_l2``, (C',)) and the number of
  images where each is defined (``macro_n``, (3, C'));
- the dataset reliability histogram ``H[c, a, j]`` (README, "Evaluating calibration over a test set"), int64:
  (C', M, M);
- per class, the number of images whose target holds the class, (C',);
- the number of images and of non-finite probability entries left out (``nonfinite="skip"`` or
  ``validate=False``);
- with ``groups``: the same pooled statistics, macro sums and histogram per group, (G, ...);
- with ``adaptive_bins``: pooled statistics over ``fine_bins`` fine bins, (C', F), for equal-mass binning.

Optionally (``keep_records=True``) one record per (image, class) with ECE/ACE/MCE/L2 (and Dice with
``dice=True``, the group with ``groups``) is kept for a per-image CSV and bootstrap intervals; that list grows
with the data set and is the one exception.

*Micro* pools the sums: per (class, bin), ``count``, ``sum_p`` and ``sum_y`` are added over all images and the
gap is ``|Σ sum_p / Σ count - Σ sum_y / Σ count|``, so every voxel weighs the same. (The 2025 paper's code
instead averages each bin's per-image confidences and accuracies unweighted over images; see the README.)
"ACE" is the *average* calibration error (mean gap over non-empty bins), not the *adaptive* one (that one is
:meth:`DatasetCalibration.adaptive_errors`).

Classification (``classification=True``): every update is a batch of samples, input (B, C) with (B,) labels
(``to_onehot_y=True``) or (B, C) one-hot targets; all samples form one pooled population
(``compute().micro``); per-image (macro) values and the per-image histogram do not exist there.

Non-finite probabilities (NaN/inf logits) are left out of every statistic by the kernels and counted. With
``validate=True`` and ``nonfinite="raise"`` (the defaults) an update holding any raises a ``ValueError`` that
names the image, and adds nothing (everything accumulated before is kept); ``nonfinite="skip"`` leaves them out
with a warning naming the images; either way :meth:`DatasetCalibration.compute` reports how many were left
out (``nonfinite``), so no metric goes NaN, silently or otherwise.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..evaluation import BrierDecomposition
from ..results import BinnedStats, CalibrationErrors
from . import checkpoint, report
from . import formulas as R
from .config import MetricConfig
from .contribution import Contribution, contribution, merge_sums
from .formulas import DatasetCalibrationResult, GroupGap, GroupResult
from .records import ImageRecords
from .state import SumState

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["DatasetCalibration"]


class DatasetCalibration:
    """Calibration of a segmentation (or classification) model over a whole data set, in O(C'·M²) memory.

    Args:
        num_classes: C, the number of channels of the predictions.
        num_bins: M, hard confidence bins (the edges of README "Semantics"), also used for the accuracy axis
            of the histogram.
        include_background: keep class 0 (default True, as everywhere in calibops and in MONAI; the papers'
            evaluation passes False). C' = C - 1 without it (C' = C = 1 for a single-channel prediction).
        to_onehot_y: targets are integer label maps (B, 1, *spatial) or (B, *spatial).
        softmax / sigmoid: the predictions are logits; apply this activation first.
        ignore_index: label value left out of every statistic (needs ``to_onehot_y``).
        right: bin edge rule (README "Semantics").
        backend: statistics backend (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``); an
            unknown name raises here, an unavailable one at the first update.
        validate: value checks of :func:`calibops.functional.binned_stats` (probabilities in [0, 1], labels in
            range, finite probabilities); keep them on for evaluation.
        nonfinite: what a NaN/inf probability does when validating: ``"raise"`` (default) a ``ValueError``
            naming the image, nothing of that batch added; ``"skip"`` leave it out of every statistic, count
            it (``compute().nonfinite``) and warn with the images. With ``validate=False`` they are left out
            and counted without a check (no host synchronisation).
        keep_records: keep one record per (image, class) with ECE/ACE/MCE/L2 (O(images·C') memory); needed by
            :meth:`bootstrap`.
        dice: add the Dice score of the hard prediction (argmax, or ``p > 0.5`` for sigmoid / one channel)
            to the records (needs ``keep_records``).
        process_group: the ``torch.distributed`` group to reduce over (default: the world).
        mode: ``"marginal"`` (default; per class, C' rows) or ``"top_label"`` (per voxel the confidence
            ``max_c p`` and whether its argmax class is the label, as torchmetrics' ``MulticlassCalibrationError``
            and the CURVAS challenge; one row). Top-label results drop the class axis: ``compute()`` errors are
            0-d, ``histogram()`` is (M, M), records have ``class="top_label"``; ``include_background`` does not
            apply (the argmax runs over every class) and ``dice`` is not available.
        classification: every update is a batch of samples, input (B, C) with target (B,) class indices (with
            ``to_onehot_y=True``) or (B, C) one-hot; all samples are pooled (``compute().micro``; macro is NaN).
            ``include_background`` should then be True (class 0 is an ordinary class); records, Dice and
            ``histogram()`` do not apply (use :meth:`plot`, a reliability diagram of the pooled samples).
        groups: names of the subgroups (e.g. ``("site A", "site B")``); every update then takes ``groups=``, one
            name per image, and :meth:`compute_groups`, :meth:`group_gaps`, :meth:`bootstrap` and
            :meth:`plot_groups` report per group.
        adaptive_bins: also keep pooled statistics over ``fine_bins`` fine uniform bins (one more statistics
            pass per update) for :meth:`adaptive_errors`, the equal-mass ("adaptive") calibration error with
            this many bins.
        fine_bins: resolution of the fine histogram behind ``adaptive_bins`` (default 1000).
        brier: also accumulate the Brier score (per image, macro, and pooled, micro) and the second moments for
            :meth:`brier_decomposition` (needs ``to_onehot_y``: binary targets, ``y² = y``). See :meth:`brier`.
        multi_rater: targets are R rater label maps (B, R, *spatial) (needs ``to_onehot_y``; R may change between
            updates). Macro values are the mean over images of the *mean over raters* of the per-rater errors (the
            CURVAS protocol); the pooled statistics, micro values and histogram use the rater-mean soft label
            ``ȳ = mean_r [label_r = c]``. Records (marginal mode) add ``volume_crps`` (closed form, against the
            raters' volumes; voxel size from ``update(..., spacing=...)``) and ``consensus_dice``.

    Example::

        metric = DatasetCalibration(num_classes=4, to_onehot_y=True, softmax=True)
        for logits, labels in loader:
            metric.update(model(images), labels)
        res = metric.compute()          # res.macro.ece, res.micro.ace, res.micro.l2 ... each (C',)
        H = metric.histogram()          # (C', M, M) int64
        metric.plot(class_names=["liver", "kidney", "spleen"]).savefig("hist.pdf")
    """

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
        keep_records: bool = False,
        dice: bool = False,
        process_group: Any = None,
        nonfinite: str = "raise",
        *,
        mode: str = "marginal",
        classification: bool = False,
        groups: Sequence[Hashable] | None = None,
        adaptive_bins: int | None = None,
        fine_bins: int = 1000,
        multi_rater: bool = False,
        brier: bool = False,
        histogram_memory_limit: int | None = None,
    ) -> None:
        # every argument but the process group is an option, checked once by MetricConfig.build
        options = {k: v for k, v in locals().items() if k not in ("self", "process_group")}
        cfg = MetricConfig.build(**options)
        self._init(cfg, process_group)

    @classmethod
    def from_config(cls, config: MetricConfig, process_group: Any = None) -> DatasetCalibration:
        """An accumulator for an already checked :class:`~calibops.metrics.config.MetricConfig` (adapters)."""
        self = cls.__new__(cls)
        self._init(config, process_group)
        return self

    def _init(self, cfg: MetricConfig, process_group: Any) -> None:
        cfg.check_memory()  # before the histograms are allocated (from_config does not go through build)
        o = cfg.options
        self.config = cfg
        self.process_group = process_group
        # the options as attributes, as before the configuration had its own module
        self.num_classes, self.num_bins, self.mode = cfg.num_classes, o.num_bins, o.mode
        self.include_background, self.to_onehot_y, self.right = o.include_background, o.to_onehot_y, o.right
        self.softmax, self.sigmoid, self.ignore_index = o.softmax, o.sigmoid, o.ignore_index
        self.backend, self.validate, self.multi_rater = o.backend, o.validate, o.multi_rater
        self.keep_records, self.dice, self.nonfinite = cfg.keep_records, cfg.dice, cfg.nonfinite
        self.classification, self.groups, self.brier_score = cfg.classification, cfg.groups, cfg.brier
        self.adaptive_bins, self.fine_bins = cfg.adaptive_bins, cfg.fine_bins
        #: the class index of each statistic row (marginal), or () for top-label (one row, no class axis)
        self.classes: tuple[int, ...] = cfg.classes
        self._state = SumState(cfg.spec(), nan_ok=cfg.nan_ok)
        self._records = ImageRecords()

    # ------------------------------------------------------------------ state
    @property
    def num_used_classes(self) -> int:
        """C': the number of classes the statistics cover (marginal), or 1 (top-label: one row)."""
        return self.config.num_used_classes

    def __getattr__(self, name: str) -> Any:
        # the sums by name (metric.count, metric.hist, ...), as attributes like before the state was split out
        state = self.__dict__.get("_state")
        if state is not None and name in state.tensors:
            return state.tensors[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def reset(self) -> None:
        """Forget everything seen so far (state back to zeros, records emptied)."""
        self._state.reset()
        self._records.clear()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The accumulated sums (local to this process), by name; their total size is O(C'·M²)."""
        return dict(self._state.tensors)

    def to(self, device: torch.device | str) -> DatasetCalibration:
        """Move the state to ``device`` (``update`` does this by itself to follow its inputs)."""
        self._state.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The configuration and accumulated sums (and records, if kept), for checkpoints and resumption."""
        return checkpoint.state_dict(self.config, self._state, self._records)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the configuration must match this object's.

        Everything is checked before anything is replaced (a bad state dict leaves this object as it was), against
        every invariant a real accumulation satisfies: every key present with its shape, real values, finite and
        >= 0, whole numbers for the counters; ``sum_p``, ``sum_y`` within ``[0, count]`` and ``sum_p`` within
        ``count`` times the edges of each confidence bin (so a scaled ``count`` is caught); the same voxels in
        every class row (when no non-finite value was left out) and in the fine bins; the histogram non-empty
        exactly where ``count`` is, with at most ``count`` images per bin and one to M bins per image with
        voxels; per-image counters within ``num_images``; macro sums within their image counts (every error in
        [0, 1]); the per-group entries adding up to the global ones (every image has one group); ``brier_sum``
        within the images with voxels (each Brier score in [0, 1]); ``sum_p2 <= sum_p`` and ``sum_py <=
        min(sum_p, sum_y)``; and the records: ``num_images`` x C' of them, in blocks of one per class in order
        (one image and group per block), exactly the record fields, values in range, known groups, and per class
        the defined ECE values, their sum and the voxels matching the sums. A violation is one ``ValueError``
        naming the key.
        Versions: checkpoints of calibops 0.2 and later load; a development state written before the L2 error
        existed (no ``macro_l2``) loads with the macro L2 unknown (NaN), everything else restored. Checkpoints of
        calibops 0.1 are refused with a ``ValueError`` saying so: 0.1 did not count the images holding each class
        (``compute().images_with_class``), which cannot be recovered from its sums.
        """
        checkpoint.load_state_dict(self.config, self._state, self._records, state_dict)

    # ----------------------------------------------------------------- update
    def update(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        image_ids: Sequence[Any] | None = None,
        groups: Sequence[Hashable] | None = None,
        spacing: Any = None,
    ) -> None:
        """Add one batch: ``input`` (B, C, *spatial) probabilities (or logits with softmax/sigmoid) and
        ``target`` as in :func:`calibops.functional.binned_stats`. Spatial sizes may change between calls.

        ``image_ids`` (B names/numbers) label the per-image records and error messages; default: a running
        index. ``groups``: one group name per image (metrics built with ``groups=``). Atomic: the batch's whole
        contribution (every sum and record, :func:`calibops.metrics.contribution.contribution`) is computed
        first and committed in one step, so a batch that raises adds nothing and leaves the state
        bit-identical. With ``classification=True``: ``input`` (B, C) and ``target`` (B,) class indices (with
        ``to_onehot_y=True``) or (B, C) one-hot; ``groups`` one name per sample. ``spacing`` (``multi_rater``
        records only): voxel size per spatial axis, or (B, D) per image, for ``volume_crps``.
        """
        part = contribution(self.config, input, target, image_ids, groups, spacing, seen=self._state["num_images"])
        self.commit([part])

    def commit(self, parts: Sequence[Contribution]) -> None:
        """Add contributions computed beforehand (:func:`calibops.metrics.contribution.contribution` under this
        metric's :attr:`config`) in one step: the adapters compute every item of a list first, then commit them
        all. :meth:`update` is ``commit([contribution(...)])``."""
        if not parts:
            return
        sums, device = merge_sums(parts)
        self._state.commit(sums, device)
        self._records.extend([r for part in parts for r in part.records])
        for part in parts:
            if part.warning is not None:
                warnings.warn(part.warning, RuntimeWarning, stacklevel=3)

    # ---------------------------------------------------------------- results
    def _synced(self) -> dict[str, torch.Tensor]:
        """State summed over all ranks when distributed, in one all-reduce (the local state is left untouched)."""
        return self._state.synced(self.process_group)

    def compute(self) -> DatasetCalibrationResult:
        """Macro and micro ECE/ACE/MCE (and L2, the ``l2`` attribute) per class, (C',) float32 each.

        When ``torch.distributed`` is initialised this is a collective: call it on every rank.
        """
        return R.overall(self._synced(), self.mode, self.classes)

    def _need_groups(self) -> tuple[Hashable, ...]:
        if self.groups is None:
            raise RuntimeError("per-group results need DatasetCalibration(..., groups=(names...))")
        return self.groups

    def compute_groups(self) -> dict[Hashable, GroupResult]:
        """:class:`GroupResult` per group name (macro / micro errors of the group's images). A collective when
        distributed. Classification: micro only (macro NaN)."""
        return R.per_group(self._synced(), self._need_groups(), self.mode)

    def group_gaps(self, kind: str = "macro") -> dict[str, GroupGap]:
        """The largest between-group difference of every metric (``"ece"``, ``"ace"``, ``"mce"``, ``"l2"``), of the
        ``kind="macro"`` (mean over images) or ``"micro"`` (pooled) values. A collective when distributed."""
        if kind not in ("macro", "micro"):
            raise ValueError(f"kind must be 'macro' or 'micro', got {kind!r}")
        return R.group_gaps(self.compute_groups(), kind)

    def bootstrap(
        self,
        metric: str = "ece",
        *,
        num_samples: int = 1000,
        level: float = 0.95,
        seed: int = 0,
        gather: bool = True,
    ) -> dict[str, Any]:
        """Seeded percentile bootstrap intervals of the macro ``metric`` (mean over images) per class.

        Needs ``keep_records=True``. Images are resampled with replacement (within each group when the metric has
        groups: a stratified bootstrap). Returns ``{"all": ConfidenceInterval}`` and, with groups,
        ``{"groups": {name: ConfidenceInterval}, "gap": ConfidenceInterval}`` where the gap is the largest
        between-group difference recomputed on every resample. ``gather=True`` uses every rank's records (a
        collective). Same ``seed``, same intervals, on any machine.
        """
        if not self.keep_records:
            raise RuntimeError(
                "bootstrap resamples per-image records: build DatasetCalibration(..., keep_records=True)"
            )
        recs = self.records(gather=gather)
        return R.bootstrap(recs, self.config.row_names, self.groups, self.mode, metric, num_samples, level, seed)

    def brier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(macro, micro)`` Brier score per class, (C',) float64 (0-d top-label): the mean over images of the
        per-image scores (images without voxels skipped), and the score of the pooled voxels. Several raters: the
        mean over raters. Needs ``brier=True``; a collective when distributed."""
        if not self.brier_score:
            raise RuntimeError("the Brier score needs DatasetCalibration(..., brier=True)")
        return R.brier(self._synced(), self.mode)

    def brier_decomposition(self) -> BrierDecomposition:
        """Murphy decomposition of the pooled Brier score (:func:`calibops.evaluation.brier_decomposition`), each
        (C',) float64 (0-d top-label). Several raters: on the rater-mean soft label (its uncertainty term includes
        the raters' disagreement). Needs ``brier=True``; a collective when distributed."""
        if not self.brier_score:
            raise RuntimeError("the Brier decomposition needs DatasetCalibration(..., brier=True)")
        d = R.pooled_decomposition(self._synced())
        return BrierDecomposition(*(t[0] for t in d)) if self.mode == "top_label" else d

    def adaptive_errors(self) -> CalibrationErrors:
        """Pooled (micro) ECE / ACE / MCE / L2 over ``adaptive_bins`` equal-mass bins built from the fine pooled
        histogram (:func:`calibops.evaluation.adaptive_calibration_errors`). A collective when distributed."""
        if self.adaptive_bins is None:
            raise RuntimeError("adaptive errors need DatasetCalibration(..., adaptive_bins=M)")
        return R.adaptive(self._synced(), self.adaptive_bins, self.mode)

    def histogram(self) -> torch.Tensor:
        """The dataset reliability histogram ``H[c, a, j]``, int64 (C', M, M): class, accuracy bin (0 =
        lowest), confidence bin. A collective when distributed: call it on every rank."""
        if self.classification:
            raise RuntimeError(
                "classification pools the samples: there is no per-image histogram; plot() draws the reliability "
                "diagram of the pooled samples"
            )
        hist = self._synced()["hist"].clone()
        return hist[0] if self.mode == "top_label" else hist

    def pooled_counts(self) -> torch.Tensor:
        """Voxels per (class, confidence bin) over the data set, (C', M) float64 (summed over ranks)."""
        return self._synced()["count"].clone()

    def pooled_stats(self) -> BinnedStats:
        """The pooled statistics ``(count, sum_p, sum_y)``, (C', M) float64 each (summed over ranks)."""
        s = self._synced()
        return BinnedStats(s["count"].clone(), s["sum_p"].clone(), s["sum_y"].clone())

    def records(self, gather: bool = False) -> list[dict[str, Any]]:
        """Per-(image, class) records (``keep_records=True``): image, class, ece, ace, mce, l2, voxels[, dice]
        [, group].

        ``gather=True`` collects every rank's records (a collective) and adds each record's ``rank``.
        """
        if not self.keep_records:
            raise RuntimeError("records are kept only with DatasetCalibration(..., keep_records=True)")
        return self._records.get(gather, self.process_group)

    def write_records_csv(self, path: str | os.PathLike, gather: bool = False) -> None:
        """Write :meth:`records` to a CSV file (one row per image and class; columns image, class, ece, ace,
        mce, voxels[, dice], l2[, group])."""
        ImageRecords.write_csv(path, self.records(gather=gather), self.config.record_fields())

    def group_rows(self) -> list[dict[str, Any]]:
        """One row per (group, class) — group, class, images, macro_* and micro_* of ECE / ACE / MCE / L2 — then one
        ``group="gap"`` row per class with the largest between-group differences (:meth:`group_gaps`). For CSV / JSON
        reports (:meth:`write_groups_csv`). A collective when distributed."""
        return R.group_rows(self.compute_groups(), self.config.row_names)

    def write_groups_csv(self, path: str | os.PathLike) -> None:
        """Write :meth:`group_rows` to a CSV file. A collective when distributed."""
        rows = self.group_rows()
        fields = ["group", "class", "images"] + [f"{k}_{m}" for k in ("macro", "micro") for m in R.METRICS]
        ImageRecords.write_csv(path, rows, fields)

    def plot_groups(self, class_index: int = 0, *, title: str | None = None) -> Figure:
        """The groups' pooled reliability diagrams side by side (one panel per group) for one used class
        (``class_index`` into :attr:`classes`; ignored for top-label). A collective when distributed."""
        names = self._need_groups()
        return report.group_panels(self.config, self._synced(), names, class_index, title)

    def plot(
        self,
        class_names: Sequence[str] | None = None,
        *,
        show_counts: bool = True,
        all_classes: bool = True,
        gamma: float = 0.5,
        cmap: str = "viridis",
        **kwargs: Any,
    ) -> Figure:
        """The dataset reliability histogram figure (:func:`calibops.plot.dataset_reliability_histogram`);
        the bars below show pooled voxels per confidence bin. ``class_names``: one name per used class
        (C'), or per input class (C, the background name is then dropped). A collective when distributed.
        Classification: the reliability diagram of the pooled samples, one panel per class (or one, top-label)."""
        s = self._synced()
        if self.classification:
            return report.pooled_panels(self.config, s, class_names)
        return report.dataset_histogram(
            self.config,
            s,
            class_names,
            show_counts=show_counts,
            all_classes=all_classes,
            gamma=gamma,
            cmap=cmap,
            **kwargs,
        )

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.as_dict().items())
        return f"DatasetCalibration({cfg}, nonfinite={self.nonfinite!r}, images={int(self._state['num_images'])})"
