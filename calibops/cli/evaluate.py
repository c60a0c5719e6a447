"""``calibops evaluate``: calibration metrics and the dataset reliability histogram of saved predictions.

    calibops evaluate --pred DIR --label DIR [--label DIR2 ...] [--out DIR] [--num-bins 20] [--mode top_label]
                      [--groups groups.csv] [--include-background] ...
    python -m calibops evaluate ...

Reads probability maps and integer label maps (NIfTI ``.nii``/``.nii.gz`` through nibabel, MetaImage / NRRD
``.mha``/``.nrrd`` through SimpleITK, or NumPy ``.npy``/``.npz``) paired by file name (nnU-Net output folders:
the ``.npz`` probabilities, with the ``.nii.gz`` next to them giving their geometry; MONAI SaveImage folders:
``--pred-suffix _seg``), accumulates them with :class:`calibops.metrics.DatasetCalibration`
one case at a time (memory: one case, the ``--prefetch`` cases read ahead, and O(C·M²)), and writes into ``--out``:

- ``per_image.csv``: one row per case and class (one ``top_label`` row per case with ``--mode top_label``): ECE,
  ACE, MCE, L2, voxels (and Dice with ``--dice``; the group with ``--groups``; with several ``--label`` folders the
  case's volume CRPS and consensus Dice, marginal mode);
- ``summary.csv`` and ``summary.json`` (the same rows): per class macro (mean over cases) and micro (pooled)
  ECE/ACE/MCE/L2, the spread of the per-case values (std, median, quartiles, IQR), and their class mean;
- with ``--groups``: ``groups.csv`` (per group and class the macro / micro errors, the "all" row and the largest
  between-group "gap", each macro value with its seeded bootstrap interval) and ``groups_reliability_<class>.pdf``
  / ``.png`` (the groups' pooled reliability diagrams side by side; not with ``--no-figures``);
- ``dataset_histogram.pdf`` / ``.png``: the dataset reliability histogram figure (not with ``--no-figures``);
- ``reliability_<class>.pdf`` / ``.png`` and ``reliability_all_classes``: the pooled reliability diagram with its
  confidence histogram beside the dataset reliability histogram (not with ``--no-figures``); every figure is a
  vector PDF and a 300-dpi PNG, ``<class>`` the class name (``--class-names``) made file-name safe;
- ``dataset_histogram.npz``: the histogram (C', M, M), pooled voxel counts (C', M), the pooled ``sum_p`` and ``sum_y``
  (C', M), class indices and names (what ``calibops compare`` reads).

Several ``--label`` folders are raters of the same cases (the CURVAS protocol): the macro values are the mean over
cases of the mean over raters of the per-rater errors (the headline), the micro values and the histogram use the
rater-mean soft label, and the voxel spacing for the volume CRPS comes from the label's (or, for NumPy labels,
the prediction's sibling image's) NIfTI / SimpleITK header (1 per axis, voxel counts, without one). Everything
is computed by :class:`calibops.metrics.DatasetCalibration` (``multi_rater=``, ``mode=``, ``groups=``).

Under ``torchrun`` (``torchrun --nproc-per-node N -m calibops evaluate ...``; :mod:`calibops.cli.distributed`)
each rank reads and evaluates its share of the cases (split by file size), the sums are all-reduced and the
per-image records gathered in case order, and rank 0 alone shows progress and writes: the same outputs as one
process, plus ``world_size``, the cases of each rank and the wall time in ``summary.json``. A failure on any
rank ends every rank with the same one line (naming the file and the rank) and writes nothing.

``--out`` is checked before any case is read (:func:`calibops.cli.outputs.check_output_dir`: not inside or
holding an input folder, nothing in it that calibops did not write, writable) and replaced as a whole at the end
(:func:`calibops.cli.outputs.replace_output_dir`: written into a temporary directory next to it, then renamed),
so no earlier run's file survives and a failure leaves it as it was. Bootstrap rows carry ``bootstrap_images``;
fewer than :data:`calibops.evaluation.MIN_BOOTSTRAP_IMAGES` give one warning line per group on stderr.

Everything is checked before anything is written. Every failure is one line on stderr,
``calibops evaluate: error: ...``, naming the file or option and the fix, and leaves no output file; Ctrl-C
prints one such line and exits with status 130:

- exit status 2 (usage): a bad option value (``--bootstrap-samples`` above 100,000, ``--seed`` outside
  [0, 2**63), a ``--num-bins`` whose histograms would pass the bound of :class:`calibops.DatasetCalibration`
  (1 GiB or ``CALIBOPS_HISTOGRAM_MEMORY_LIMIT``)),
  ``--pred``/``--label`` not a directory, an unusable ``--out``, a backend that cannot run here,
  ``--class-names`` not matching the classes, matplotlib missing without ``--no-figures`` (found before any case
  is read), ``--groups`` not a file, ``--dice`` with several raters or top-label;
- exit status 1 (data): a missing pair (in any rater folder), a dangling symbolic link, a bad groups file (no
  ``case,group`` header, a column named twice, a reserved name ``all``/``gap``, a case without a group or twice,
  a group for a case not evaluated; a UTF-8 BOM is fine), rater label maps of one case differing in shape,
  a file that cannot be read (empty, truncated, corrupt, unreadable),
  a shape mismatch, prediction and label on different grids (spacing / affine), values that are not
  probabilities, non-finite logits, labels out of range, an ``--out`` where nothing can be written.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation import MAX_BOOTSTRAP_SAMPLES, MIN_BOOTSTRAP_IMAGES
from .distributed import add_arguments as add_scale_arguments
from .errors import EvaluationError, UsageError, UsageParser
from .outputs import OutputDirError, check_output_dir, replace_output_dir

__all__ = ["build_parser", "evaluate", "evaluate_main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``calibops evaluate``."""
    p = UsageParser(
        prog="calibops evaluate",
        description="Calibration (ECE/ACE/MCE, macro and micro) and the dataset reliability histogram of "
        "probability maps against label maps, paired by file name.",
    )
    p.add_argument(
        "--pred",
        required=True,
        metavar="DIR",
        help="directory of probability maps: .npy/.npz (C, *spatial) or .nii/.nii.gz (*spatial, C)",
    )
    p.add_argument(
        "--label",
        required=True,
        action="append",
        metavar="DIR",
        help="directory of integer label maps (*spatial) with the same file names; repeat it for several raters "
        "(multi-rater evaluation: per-rater errors averaged, volume CRPS, consensus Dice)",
    )
    p.add_argument(
        "--mode",
        default="marginal",
        choices=("marginal", "top_label"),
        help="marginal: per class; top_label: the confidence max_c p against [argmax = label], one row "
        "(torchmetrics / CURVAS) (default: %(default)s)",
    )
    p.add_argument(
        "--groups",
        default=None,
        metavar="CSV",
        help="CSV file with the columns case,group: per-group metrics, between-group gaps and bootstrap intervals",
    )
    p.add_argument(
        "--bootstrap-samples",
        type=int,
        default=1000,
        help="bootstrap resamples for the --groups intervals, at most 100000 (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap, 0 to 2**63-1 (default: %(default)s)")
    p.add_argument(
        "--out",
        default="calibops_eval",
        metavar="DIR",
        help="output directory, replaced as a whole (outside --pred/--label, holding nothing but a previous run's "
        "outputs) (default: %(default)s)",
    )
    p.add_argument(
        "--num-bins",
        type=int,
        default=20,
        help="confidence bins M; the (classes, M, M) histograms must fit in 1 GiB (default: %(default)s)",
    )
    p.add_argument("--include-background", action="store_true", help="also evaluate class 0")
    p.add_argument("--ignore-index", type=int, default=None, help="label value left out of every statistic")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="expected number of channels C (default: taken from the first prediction)",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="comma-separated names of all C classes (background included), for CSV and figure",
    )
    p.add_argument(
        "--channel-dim",
        type=int,
        default=None,
        help="channel axis of the prediction files (default: 0 for NumPy, -1 for NIfTI)",
    )
    p.add_argument("--npz-key", default=None, help="array name inside prediction .npz files")
    p.add_argument(
        "--pred-suffix",
        default=None,
        metavar="SUFFIX",
        help="only prediction files ending with SUFFIX, stripped to get the case name: a full ending "
        "(.npz for nnU-Net probabilities, _seg.nii.gz) or a postfix before the extension (_seg for MONAI "
        "SaveImage's case_seg.nii.gz). Default: every supported file; a case with a .npz next to a .nii.gz "
        "(nnU-Net) takes the .npz",
    )
    p.add_argument(
        "--pred-axis-order",
        default="auto",
        choices=("auto", "same", "reversed"),
        help="spatial axis order of NumPy predictions against image-file labels (NIfTI/MHA/NRRD). nnU-Net's "
        ".npz is (C, z, y, x), reversed against nibabel's (x, y, z). auto: the order whose shape matches the "
        "label (for a symmetric shape: the order that matches the segmentation next to the .npz, else the "
        "order already found for other cases, else nnU-Net's when the key is 'probabilities'); the same "
        "order for every case (default: %(default)s)",
    )
    for flag, text in (
        ("--no-geometry-check", "do not compare the prediction's spacing and affine with the label's"),
        ("--no-figures", "write no figure (no matplotlib needed)"),
        ("--softmax", "predictions are logits: apply softmax over channels"),
        ("--multilabel", "channels are independent probabilities (do not require them to sum to 1)"),
        ("--dice", "add the Dice score of the argmax prediction per case"),
    ):
        p.add_argument(flag, action="store_true", help=text)
    for flag, text in (
        ("--geometry-tolerance", "allowed difference (mm) between prediction and label affines"),
        ("--sum-tolerance", "allowed |sum over channels - 1| of probabilities"),
    ):
        p.add_argument(flag, type=float, default=1e-3, help=text + " (default: %(default)s)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "reference", "cpu", "cuda", "triton"),
        help="statistics backend (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_scale_arguments(p)  # --device, --prefetch, --dist-timeout (calibops/cli/distributed.py)
    return p


def _check_probabilities(name: str, path: Path, probs: np.ndarray, multilabel: bool, tol: float) -> np.ndarray:
    if not np.all(np.isfinite(probs)):
        raise EvaluationError(
            f"case {name!r} ({path}): the prediction holds NaN or infinite values; fix the predictions"
        )
    lo, hi = float(probs.min()), float(probs.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise EvaluationError(
            f"case {name!r} ({path}): prediction values span [{lo:.4g}, {hi:.4g}], not probabilities in [0, 1] "
            "(pass --softmax for logits)"
        )
    probs = np.clip(probs, 0.0, 1.0)  # float rounding only (checked above)
    if not multilabel and probs.shape[0] > 1:
        dev = float(np.abs(probs.sum(axis=0, dtype=np.float64) - 1.0).max())
        if dev > tol:
            raise EvaluationError(
                f"case {name!r} ({path}): class probabilities do not sum to 1 (max deviation {dev:.3g} > {tol}); "
                "pass --multilabel for independent (sigmoid) channels or --softmax for logits"
            )
    return probs


def _check_labels(name: str, path: Path, label: np.ndarray, num_classes: int, ignore_index: int | None) -> None:
    # checked here too (not only by binned_stats) so CALIBOPS_VALIDATE=0 cannot drop voxels silently
    bad = (label < 0) | (label >= num_classes)
    if ignore_index is not None:
        bad &= label != ignore_index
    if bad.any():
        values = np.unique(label[bad])[:5].tolist()
        allowed = f"[0, {num_classes})" + (f" or --ignore-index {ignore_index}" if ignore_index is not None else "")
        raise EvaluationError(
            f"case {name!r} ({path}): {int(bad.sum())} label(s) outside {allowed}, e.g. {values}; fix the labels, "
            "or pass --ignore-index for a label value to leave out"
        )


class _AxisOrder:
    """Decides, once per run, whether NumPy predictions' spatial axes are reversed against image-file labels."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.decided: str | None = None if mode == "auto" else mode
        self.reason = "" if mode == "auto" else "--pred-axis-order"

    @staticmethod
    def _reverse(probs: np.ndarray) -> np.ndarray:
        nd = probs.ndim
        return np.ascontiguousarray(np.transpose(probs, [0, *range(nd - 1, 0, -1)]))

    def apply(self, name, probs, label, pred_path, label_path, npz_key) -> np.ndarray:
        from .. import io

        mixed = (io._suffix(pred_path) in io.ARRAY_SUFFIXES) != (io._suffix(label_path) in io.ARRAY_SUFFIXES)
        if not mixed or probs.ndim < 3:
            return probs
        same_fits = probs.shape[1:] == label.shape
        rev_fits = probs.shape[1:][::-1] == label.shape
        if self.decided is not None:
            fits = rev_fits if self.decided == "reversed" else same_fits
            if not fits:
                raise ValueError(
                    f"prediction {pred_path} has spatial shape {probs.shape[1:]}, the label {label_path} "
                    f"{label.shape}: they do not match in the {self.decided} axis order ({self.reason}); pass "
                    "--pred-axis-order same/reversed to fix the order, or pair each label with its own prediction"
                )
            return self._reverse(probs) if self.decided == "reversed" else probs
        if same_fits != rev_fits:
            choice, reason = ("reversed" if rev_fits else "same"), f"shape of case {name!r}"
        elif not same_fits:
            raise ValueError(
                f"prediction {pred_path} has spatial shape {probs.shape[1:]} and the label {label_path} {label.shape} "
                "in neither axis order; pair each label with its own prediction"
            )
        else:  # a symmetric shape: both orders fit
            choice, reason = self._by_segmentation(probs, pred_path, label.shape)
            if choice is None and (npz_key or "probabilities") == "probabilities" and str(pred_path).endswith(".npz"):
                choice, reason = "reversed", "nnU-Net's .npz convention (key 'probabilities', (C, z, y, x))"
            if choice is None:
                raise ValueError(
                    f"prediction {pred_path} and label {label_path} have a shape that fits both axis orders "
                    f"({label.shape}); say which with --pred-axis-order same (arrays saved from nibabel / MONAI) or "
                    "reversed (arrays in SimpleITK / nnU-Net order)"
                )
        self.decided, self.reason = choice, f"decided by the {reason}"
        print(f"calibops evaluate: NumPy prediction axes taken as {choice} against the labels ({self.reason})")
        return self._reverse(probs) if choice == "reversed" else probs

    def _by_segmentation(self, probs, pred_path, shape) -> tuple[str | None, str]:
        from .. import io

        seg_path = io.sibling_image(pred_path)
        if seg_path is None:
            return None, ""
        seg = io.load_label(seg_path, spatial_ndim=len(shape))
        if seg.shape != shape:
            return None, ""
        arg = probs.argmax(0)
        agree_same = float((arg == seg).mean())
        agree_rev = float((self._reverse(probs).argmax(0) == seg).mean())
        if agree_same == agree_rev:
            return None, ""
        return ("same" if agree_same > agree_rev else "reversed"), f"segmentation {seg_path.name} next to it"


def _check_geometry(name: str, pred_path: Path, label_path: Path, tol: float) -> None:
    """Prediction and label on one grid: the same spacing and affine (within ``tol`` mm), when both are known
    (a NumPy prediction takes the affine of the image file next to it, as nnU-Net writes)."""
    from .. import io

    geo_path = pred_path if io._suffix(pred_path) in io.IMAGE_SUFFIXES else io.sibling_image(pred_path)
    if geo_path is None or io._suffix(label_path) not in io.IMAGE_SUFFIXES:
        return
    a_pred, a_label = io.load_affine(geo_path), io.load_affine(label_path)
    if a_pred is None or a_label is None:
        return
    if np.allclose(a_pred, a_label, rtol=0, atol=tol):
        return
    sp_pred, sp_label = io.spacing(a_pred), io.spacing(a_label)
    what = (
        f"spacing {np.round(sp_pred, 4).tolist()} mm vs {np.round(sp_label, 4).tolist()} mm"
        if not np.allclose(sp_pred, sp_label, rtol=0, atol=tol)
        else f"same spacing but a different origin/orientation (largest affine difference "
        f"{float(np.abs(a_pred - a_label).max()):.4g} mm)"
    )
    raise ValueError(
        f"prediction {geo_path} and label {label_path} are not on the same grid: {what}; resample the prediction "
        "onto the label's grid (or export it in the label's space), raise --geometry-tolerance for rounding, or "
        "pass --no-geometry-check"
    )


def _label_dirs(args: argparse.Namespace) -> list[str]:
    """The ``--label`` folders (one per rater); a single string (a caller's own Namespace) is one folder."""
    return [args.label] if isinstance(args.label, (str, os.PathLike)) else list(args.label)


def read_groups(path: str | os.PathLike, cases: Sequence[str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """``({case: group}, group names in order of first appearance)`` from a CSV file with the columns
    ``case,group`` (more columns are ignored), for exactly the evaluated ``cases``; raises
    :class:`EvaluationError` naming the file, the row and the fix."""
    where = f"--groups {os.fspath(path)!r}"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            fields = [h.strip() for h in (reader.fieldnames or [])]
            if "case" not in fields or "group" not in fields:
                raise EvaluationError(
                    f"{where}: the header is {fields or 'missing'}; the first line must name the columns case,group"
                )
            twice = [name for name in ("case", "group") if fields.count(name) > 1]
            if twice:
                raise EvaluationError(
                    f"{where}: the header names the column {twice[0]!r} {fields.count(twice[0])} times ({fields}); "
                    "keep one case and one group column"
                )
            reader.fieldnames = fields
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise EvaluationError(f"{where}: not a text CSV file ({exc}); save it as UTF-8 CSV with case,group") from exc
    except OSError as exc:
        raise EvaluationError(f"{where}: cannot read it ({exc}); make the file readable") from exc
    mapping: dict[str, str] = {}
    order: list[str] = []
    for line, row in enumerate(rows, start=2):
        case, group = (row.get("case") or "").strip(), (row.get("group") or "").strip()
        if not case or not group:
            raise EvaluationError(f"{where}, line {line}: empty case or group; give every row a case and a group")
        if group in ("all", "gap"):
            raise EvaluationError(f"{where}, line {line}: group name {group!r} is reserved for the report; rename it")
        if case in mapping:
            raise EvaluationError(f"{where}, line {line}: case {case!r} appears twice; give each case one group")
        mapping[case] = group
        if group not in order:
            order.append(group)
    from ..io import _short

    missing = [c for c in cases if c not in mapping]
    unknown = sorted(set(mapping) - set(cases))
    if missing:
        raise EvaluationError(f"{where}: no group for {len(missing)} case(s): {_short(missing)}; add a row per case")
    if unknown:
        raise EvaluationError(
            f"{where}: {len(unknown)} case(s) not in the evaluated folders: {_short(unknown)}; remove those rows "
            "(or check the case names: file names without the suffix)"
        )
    return mapping, tuple(order)


def _match_raters(args: argparse.Namespace) -> list[tuple[str, Path, list[Path]]]:
    """``[(case, prediction, [label of each rater])]``: every rater folder must pair up with the predictions."""
    from .. import io

    dirs = _label_dirs(args)
    per_rater = []
    for k, d in enumerate(dirs):
        try:
            per_rater.append(io.match_cases(args.pred, d, args.pred_suffix))
        except (ValueError, FileNotFoundError) as exc:
            if len(dirs) == 1:
                raise EvaluationError(str(exc)) from exc
            raise EvaluationError(
                f"--label {d!r} (rater {k + 1} of {len(dirs)}): {exc}; every rater folder needs a label for every case"
            ) from exc
    return [(name, pred, [r[i][2] for r in per_rater]) for i, (name, pred, _) in enumerate(per_rater[0])]


def _header_spacing(pred_path: Path, label_path: Path, ndim: int) -> list[float] | None:
    """Voxel size per spatial axis from the label's header (else the prediction's image, or its nnU-Net sibling);
    None (voxel counts) when no file has one."""
    from .. import io

    for path in (label_path, pred_path, io.sibling_image(pred_path)):
        if path is not None and io._suffix(path) in io.IMAGE_SUFFIXES:
            affine = io.load_affine(path)
            if affine is not None:
                return [float(v) for v in io.spacing(affine)[:ndim]]
    return None


def check_histogram_memory(num_bins: int, classes: int, groups: int) -> None:
    """Refuse (:class:`UsageError`) a ``--num-bins`` whose histograms, int64 (classes, M, M) overall and per
    group, would take more than the bound :class:`DatasetCalibration` itself enforces when it is built
    (:func:`calibops.metrics.config.histogram_memory_limit`: 1 GiB, or ``CALIBOPS_HISTOGRAM_MEMORY_LIMIT`` bytes);
    the same check, made before any case is read."""
    from ..metrics.config import histogram_memory_error

    try:
        msg = histogram_memory_error(num_bins, classes, groups, argument="--num-bins")
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if msg is not None:
        raise UsageError(msg)


def _used_classes(args: argparse.Namespace, C: int) -> int:
    """The histogram rows of C channels: one for top-label or one channel, else the classes evaluated."""
    return 1 if (args.mode == "top_label" or C == 1) else C - (0 if args.include_background else 1)


def check_usage(args: argparse.Namespace) -> None:
    """The checks of the command line that need no data file; raises :class:`UsageError` (exit status 2)."""
    from ..options import MAX_BINS

    if not 1 <= args.num_bins <= MAX_BINS:
        raise UsageError(f"--num-bins must be between 1 and 2**24 = {MAX_BINS}, got {args.num_bins}")
    check_histogram_memory(args.num_bins, 1, 0)  # at least one class: refuses a hopeless --num-bins at once
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")
    if not (math.isfinite(args.geometry_tolerance) and args.geometry_tolerance >= 0):
        raise UsageError(f"--geometry-tolerance must be a finite number >= 0, got {args.geometry_tolerance}")
    if not (math.isfinite(args.sum_tolerance) and args.sum_tolerance >= 0):
        raise UsageError(f"--sum-tolerance must be a finite number >= 0, got {args.sum_tolerance}")
    labels = _label_dirs(args)
    if len(set(map(os.path.realpath, labels))) != len(labels):
        raise UsageError(f"--label names one directory twice ({labels}); give each rater's folder once")
    for opt, d, what in (("--pred", args.pred, "prediction"), *(("--label", d, "label") for d in labels)):
        if not os.path.exists(d):
            raise UsageError(f"{opt} {d!r}: directory not found; pass the directory holding the {what} files")
        if not os.path.isdir(d):
            raise UsageError(f"{opt} {d!r} is a file, not a directory; pass the directory holding the files")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} names an existing file; pass a new or existing directory")
    if args.groups is not None and not os.path.isfile(args.groups):
        raise UsageError(f"--groups {args.groups!r}: file not found; pass a CSV file with the columns case,group")
    if not 1 <= args.bootstrap_samples <= MAX_BOOTSTRAP_SAMPLES:
        raise UsageError(
            f"--bootstrap-samples must be between 1 and {MAX_BOOTSTRAP_SAMPLES}, got {args.bootstrap_samples} (the "
            "percentile interval settles long before; 1000-10000 is usual)"
        )
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.dice and len(labels) > 1:
        raise UsageError(
            "--dice compares with one label map: with several --label folders (raters) per_image.csv carries the "
            "consensus Dice instead; drop --dice"
        )
    if args.dice and args.mode == "top_label":
        raise UsageError("--dice reports Dice per class: drop it, or use --mode marginal")
    if args.class_names is not None and any(not n.strip() for n in args.class_names.split(",")):
        raise UsageError(f"--class-names {args.class_names!r} has an empty name; give one name per class")
    if args.backend != "auto":
        import torch

        import calibops

        try:
            calibops.backend_for(torch.empty(0, device=getattr(args, "device", "cpu")), args.backend)
        except RuntimeError as exc:
            raise UsageError(f"--backend {args.backend}: {exc}; use --backend auto") from exc
    try:  # before any case is read: not inside an input folder, nothing foreign in it, writable
        check_output_dir(args.out, [("--pred", args.pred), *(("--label", d) for d in labels)])
    except OutputDirError as exc:
        raise (UsageError if exc.status == 2 else EvaluationError)(str(exc)) from exc
    if not args.no_figures:
        try:
            import matplotlib  # noqa: F401 - the figures need it; fail before reading any case
        except ImportError as exc:
            raise UsageError(
                "the dataset histogram figure needs matplotlib, which is not installed: pip install "
                "'calibops[plot]' (or matplotlib), or pass --no-figures"
            ) from exc


def _read_case(args: argparse.Namespace, case: tuple[str, Path, list[Path]]) -> tuple[Any, list[Any], Any]:
    """Read one case and check what needs no other case: ``(probs, label maps, spacing)``. Runs in the prefetch
    thread (:mod:`calibops.cli.prefetch`); its errors are raised at the case's turn."""
    from .. import io

    name, pred_path, label_paths = case
    label_path = label_paths[0]
    probs = io.load_probabilities(pred_path, channel_dim=args.channel_dim, npz_key=args.npz_key)
    labels = [io.load_label(lp, spatial_ndim=probs.ndim - 1) for lp in label_paths]
    label = labels[0]
    for lp, lab in zip(label_paths[1:], labels[1:]):
        if lab.shape != label.shape:
            raise ValueError(
                f"the raters' label maps differ in shape: {label_path} {label.shape}, {lp} {lab.shape}; "
                "every rater's label map of a case must be on the same grid (re-export it on that grid, or "
                "leave that rater's folder out)"
            )
    if not args.no_geometry_check:
        for lp in label_paths:
            _check_geometry(name, pred_path, lp, args.geometry_tolerance)
    spacing = _header_spacing(pred_path, label_path, probs.ndim - 1) if len(label_paths) > 1 else None
    return probs, labels, spacing


def evaluate(args: argparse.Namespace, session: Any = None) -> dict[str, Any] | None:
    """Run the evaluation described by parsed ``args``; returns the results, writes nothing.

    ``session`` (:class:`calibops.cli.distributed.Session`, default: a plain run) is this process's rank under
    ``torchrun``: the rank evaluates its share of the cases, and only rank 0 gets the results (the others None).
    """
    import torch

    from ..metrics import DatasetCalibration
    from .distributed import Session, case_bytes, fingerprint, shard_by_size
    from .prefetch import Prefetcher
    from .progress import Progress

    started = time.perf_counter()
    if session is None:
        session = Session()
        session.start(args)
    with session.together() as step:  # a bad option or file list on any rank stops every rank
        check_usage(args)
        cases = _match_raters(args)
        multi = len(cases[0][2]) > 1
        group_of, group_names = (None, None)
        if args.groups is not None:
            group_of, group_names = read_groups(args.groups, [c[0] for c in cases])
        sizes = [case_bytes(pred, labels) for _, pred, labels in cases]
        step["payload"]["files"] = fingerprint(cases, sizes)
    if len({p["files"] for p in step["all"]}) > 1:
        session.fail(
            1,
            "the ranks see different files in --pred / --label (names or sizes differ): every node must read the "
            "same folders (a shared file system)",
        )
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    if args.num_classes is not None:  # the classes are known: the histogram memory is checked before any case
        check_histogram_memory(args.num_bins, _used_classes(args, args.num_classes), len(group_names or ()))
    index = {c[0]: i for i, c in enumerate(cases)}
    mine = shard_by_size(sizes, session.world_size)[session.rank]

    metric: DatasetCalibration | None = None
    C = args.num_classes
    order = _AxisOrder(args.pred_axis_order)

    def new_metric(C: int) -> DatasetCalibration:
        if names is not None and len(names) != C:
            raise UsageError(f"--class-names gives {len(names)} names for {C} classes; give one name per class")
        check_histogram_memory(args.num_bins, _used_classes(args, C), len(group_names or ()))
        return DatasetCalibration(
            C,
            num_bins=args.num_bins,
            include_background=args.include_background or args.mode == "top_label",
            to_onehot_y=True,
            softmax=args.softmax,
            ignore_index=args.ignore_index,
            backend=args.backend,
            keep_records=True,
            dice=args.dice,
            mode=args.mode,
            multi_rater=multi,
            groups=group_names,
        )

    bar = Progress(len(cases), desc="evaluate", unit="case", enabled=session.writer and not args.no_progress)

    def show(done: int) -> None:  # the cases done over all ranks
        if done > bar.done:
            bar.update(done - bar.done)

    depth = getattr(args, "prefetch", None)
    if depth is None:  # a caller's own Namespace: Session.start fills in the default when it has the attribute
        from .distributed import default_prefetch

        depth = default_prefetch()
    own = [cases[i] for i in mine]
    spaced = 0  # cases whose volume CRPS is in mm^3 (a header spacing); the others count voxels
    with (
        bar,
        session.together(wait=True, on_poll=show) as step,
        Prefetcher(own, lambda case: _read_case(args, case), depth) as reader,
    ):
        for (name, pred_path, label_paths), got in reader:
            if session.stopped():  # another rank failed: stop after the case computed last
                break
            step["payload"]["at"] = index[name]
            label_path = label_paths[0]
            try:
                probs, labels, spacing = got.get()
                spaced += spacing is not None  # volume CRPS in mm^3 for this case, else in voxels
                label = labels[0]
                probs = order.apply(name, probs, label, pred_path, label_path, args.npz_key)
            except (ValueError, TypeError) as exc:  # io's messages name the file and the fix
                raise EvaluationError(f"case {name!r}: {exc}") from exc
            if probs.size == 0 or label.size == 0:
                raise EvaluationError(
                    f"case {name!r}: {pred_path} (shape {probs.shape}) or {label_path} (shape {label.shape}) holds no "
                    "voxel; remove the case or re-write its files"
                )
            if C is None:
                C = probs.shape[0]
            if probs.shape[0] != C:
                raise EvaluationError(
                    f"case {name!r}: prediction {pred_path} has {probs.shape[0]} channels, expected {C} "
                    f"(shape {probs.shape} with the channel axis first); every case needs the same classes "
                    "(see --num-classes, --channel-dim)"
                )
            if label.shape != probs.shape[1:]:
                raise EvaluationError(
                    f"case {name!r}: label map shape {label.shape} does not match the prediction's spatial shape "
                    f"{probs.shape[1:]} (prediction {pred_path}, label {label_path}); pair each label with its own "
                    "prediction (check --channel-dim)"
                )
            if args.softmax:
                if not np.all(np.isfinite(probs)):
                    raise EvaluationError(
                        f"case {name!r} ({pred_path}): the logits hold NaN or infinite values; fix the predictions"
                    )
            else:
                probs = _check_probabilities(name, pred_path, probs, args.multilabel, args.sum_tolerance)
            for lp, lab in zip(label_paths, labels):
                _check_labels(name, lp, lab, C, args.ignore_index)
            if metric is None:
                metric = new_metric(C)
            target = torch.from_numpy(np.stack(labels) if multi else label)[None].to(session.device)
            try:
                metric.update(
                    torch.from_numpy(probs)[None].to(session.device),
                    target,
                    image_ids=[name],
                    groups=[group_of[name]] if group_of is not None else None,
                    spacing=spacing,
                )
            except (ValueError, TypeError) as exc:
                files = ", ".join(map(str, label_paths))
                raise EvaluationError(f"case {name!r} ({pred_path}, {files}): {exc}") from exc
            del probs, labels, label, target  # the reader may hold the next case meanwhile
            show(session.done())
        step["payload"].update(
            C=C,
            axis=order.decided if args.pred_axis_order == "auto" else None,
            reason=order.reason,
            cases=[c[0] for c in own],
            spaced=spaced,
            bytes=sum(sizes[i] for i in mine),
            seconds=round(time.perf_counter() - started, 3),
        )
    ranks = step["all"]
    if session.distributed:
        _agree_across_ranks(session, ranks, cases, index)
    if metric is None:  # a rank without cases (more ranks than cases)
        metric = new_metric(next(p["C"] for p in ranks if p["cases"]))
    metric = session.merge(metric, index)
    if metric is None:  # not rank 0: rank 0 reports and writes
        return None
    metric.to("cpu")  # O(C'·M²): the summary, figures and files are made on the CPU (--device cuda)
    if names is None:
        names = [f"class {c}" for c in range(metric.num_classes)]
    res: dict[str, Any] = {
        "metric": metric,
        "result": metric.compute(),
        "histogram": metric.histogram(),
        "counts": metric.pooled_counts(),
        "class_names": names,
        "num_cases": len(cases),
        "raters": len(cases[0][2]),
        "mode": args.mode,
        "spread": per_class_spread(metric),
        "units": _units(metric, sum(p.get("spaced", 0) for p in ranks), len(cases)),
    }
    if group_names is not None:
        res["group_rows"] = group_rows_with_intervals(metric, res["result"], args.bootstrap_samples, args.seed)
    res["run"] = {
        "world_size": session.world_size,
        "prefetch": depth,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "ranks": [
            {"rank": r, "cases": p["cases"], "bytes": p["bytes"], "seconds": p["seconds"]} for r, p in enumerate(ranks)
        ],
    }
    return res


def _agree_across_ranks(session: Any, ranks: list[dict[str, Any]], cases: Sequence[Any], index: dict[str, int]) -> None:
    """What one process decides from its first case must hold on every rank: the number of classes and the
    axis order of NumPy predictions (raises the same error on every rank otherwise)."""
    busy = [(r, p) for r, p in enumerate(ranks) if p["cases"]]
    r0, ref = min(busy, key=lambda rp: index[rp[1]["cases"][0]])
    for _, p in busy:
        if p["C"] != ref["C"]:
            first = cases[index[p["cases"][0]]]
            session.fail(
                1,
                f"case {first[0]!r}: prediction {first[1]} has {p['C']} channels, expected {ref['C']} (those of case "
                f"{ref['cases'][0]!r} on rank {r0}); every case needs the same classes (see --num-classes, "
                "--channel-dim)",
            )
    decided = {(r, p["axis"], p["reason"]) for r, p in busy if p["axis"] is not None}
    if len({d[1] for d in decided}) > 1:
        what = "; ".join(f"rank {r}: {axis} ({reason})" for r, axis, reason in sorted(decided))
        session.fail(
            1,
            f"the ranks took the NumPy prediction axes in different orders against the labels ({what}); say which "
            "with --pred-axis-order same or reversed",
        )


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.6f}"


_SPREAD = ("std", "median", "q1", "q3", "iqr")
METRICS = ("ece", "ace", "mce", "l2")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1), median, quartiles (linear interpolation) and IQR of the
    non-NaN ``values``; NaN when there are none (std: when fewer than two)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return dict.fromkeys(("mean", *_SPREAD), math.nan)
    q1, med, q3 = (float(x) for x in np.percentile(v, [25, 50, 75]))
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    return {"mean": float(v.mean()), "std": std, "median": med, "q1": q1, "q3": q3, "iqr": q3 - q1}


def _row_keys(metric: Any) -> tuple[Any, ...]:
    """The report rows: the used class indices (marginal) or ``("top_label",)``."""
    return metric.classes or ("top_label",)


def _row_name(key: Any, names: Sequence[str]) -> str:
    return "top-label" if key == "top_label" else names[key]


def _per_case_values(metric: Any) -> tuple[str, ...]:
    extra = ("volume_crps", "consensus_dice") if (metric.multi_rater and metric.mode == "marginal") else ()
    return ("ece", "ace", "mce", "l2", *extra, *(("dice",) if metric.dice else ()))


def _units(metric: Any, spaced: int, cases: int) -> dict[str, str]:
    """The unit of every reported quantity (``summary.json``'s ``units``; the console and the CSV ``*_unit``
    columns say the same): errors and Dice are fractions, the volume CRPS is in mm^3 when every case had a header
    spacing and in voxels (counts) when none had."""
    units = dict.fromkeys(("ece", "ace", "mce", "l2"), "probability")
    units["voxels"] = "voxels"
    if metric.dice:
        units["dice"] = "fraction"
    if "volume_crps" in _per_case_values(metric):
        units["consensus_dice"] = "fraction"
        units["volume_crps"] = (
            "mm^3"
            if spaced == cases
            else "voxels"
            if spaced == 0
            else f"mixed: mm^3 for {spaced} of {cases} cases, voxels for the cases without a header spacing"
        )
    return units


def per_class_spread(metric: Any) -> dict[Any, dict[str, dict[str, float]]]:
    """``{class: {"ece"|"ace"|"mce"|"l2"[|"volume_crps"|"consensus_dice"]: spread(per-case values)}}`` from the
    metric's per-image records (class ``"top_label"`` in top-label mode)."""
    out: dict[Any, dict[str, dict[str, float]]] = {}
    recs = metric.records()
    for c in _row_keys(metric):
        rows = [r for r in recs if r["class"] == c]
        out[c] = {m: spread([r[m] for r in rows]) for m in _per_case_values(metric)}
    return out


def group_rows_with_intervals(metric: Any, result: Any, num_samples: int, seed: int) -> list[dict[str, Any]]:
    """:meth:`DatasetCalibration.group_rows` (per group and class, then the ``gap`` rows) with an ``all`` row per
    class before the gaps, and every macro value's seeded bootstrap interval (``macro_<metric>_lower/upper``):
    per group, over all cases, and of the gap (:meth:`DatasetCalibration.bootstrap`)."""
    import warnings

    from ..evaluation import BootstrapWarning
    from ..metrics.formulas import METRICS

    keys = _row_keys(metric)
    with warnings.catch_warnings():  # the CLI reports small groups itself (bootstrap_warnings), once
        warnings.simplefilter("ignore", BootstrapWarning)
        boot = {m: metric.bootstrap(m, num_samples=num_samples, seed=seed) for m in METRICS}
    # the images behind each interval: those with a value for the class (the same for every metric)
    have: dict[tuple[Any, Any], int] = {}
    for rec in metric.records():
        if not math.isnan(rec["ece"]):
            for g in (rec.get("group"), "all"):
                have[(g, rec["class"])] = have.get((g, rec["class"]), 0) + 1
    rows = metric.group_rows()
    per_group = [r for r in rows if r["group"] != "gap"]
    gaps = [r for r in rows if r["group"] == "gap"]
    everything = []
    for k, c in enumerate(keys):
        row: dict[str, Any] = {"group": "all", "class": c, "images": result.num_images}
        for kind in ("macro", "micro"):
            for m in METRICS:
                row[f"{kind}_{m}"] = float(getattr(getattr(result, kind), m).reshape(-1)[k])
        everything.append(row)
    out = per_group + everything + gaps
    names = [r["group"] for r in per_group]
    for row in out:
        k = keys.index(row["class"])
        if row["group"] == "gap":  # the gap resamples every group: its smallest group bounds it
            row["bootstrap_images"] = min((have.get((g, row["class"]), 0) for g in names), default=0)
        else:
            row["bootstrap_images"] = have.get((row["group"], row["class"]), 0)
        for m in METRICS:
            b = boot[m]
            ci = b["gap"] if row["group"] == "gap" else b["all"] if row["group"] == "all" else b["groups"][row["group"]]
            row[f"macro_{m}_lower"] = float(ci.lower.reshape(-1)[k])
            row[f"macro_{m}_upper"] = float(ci.upper.reshape(-1)[k])
    return out


def bootstrap_warnings(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """One warning line per report row group whose bootstrap intervals rest on fewer than
    :data:`calibops.evaluation.MIN_BOOTSTRAP_IMAGES` images (``bootstrap_images``), zero-width ones named."""
    lines = []
    for group in dict.fromkeys(r["group"] for r in rows if r["group"] != "gap"):
        few = [r for r in rows if r["group"] == group and r["bootstrap_images"] < MIN_BOOTSTRAP_IMAGES]
        if not few:
            continue
        n = min(r["bootstrap_images"] for r in few)
        width = (
            "no value: NaN intervals"
            if n == 0
            else "one image: zero-width intervals"
            if n == 1
            else "two images: the interval is just [min, max]"
            if n == 2
            else "intervals far narrower than their nominal 95 %"
        )
        classes = ", ".join(_row_name(r["class"], names) for r in few)
        lines.append(
            f"group {group!r}: bootstrap intervals from {n} image(s) ({width}) for {classes}, fewer than "
            f"{MIN_BOOTSTRAP_IMAGES}; read them with the bootstrap_images column of groups.csv"
        )
    return lines


_GROUP_FIELDS = (
    ("group", "class", "class_name", "images", "bootstrap_images")
    + tuple(f"macro_{m}{s}" for m in ("ece", "ace", "mce", "l2") for s in ("", "_lower", "_upper"))
    + tuple(f"micro_{m}" for m in ("ece", "ace", "mce", "l2"))
)


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``summary.csv`` / ``summary.json``: one per class (or the top-label row), then the mean over
    classes. Values are floats (NaN where undefined)."""
    metric, r, names = res["metric"], res["result"], res["class_names"]
    sp = res["spread"]
    n, present = r.images_per_class.reshape(-1), r.images_with_class.reshape(-1)
    cols = {f"{kind}_{m}": getattr(getattr(r, kind), m).reshape(-1) for kind in ("macro", "micro") for m in METRICS}
    rows = []
    for k, c in enumerate(_row_keys(metric)):
        row: dict[str, Any] = {"class": c, "class_name": _row_name(c, names), "cases": int(n[k])}
        row["cases_with_class"] = int(present[k])
        row.update({col: float(v[k]) for col, v in cols.items()})
        row.update({f"{m}_{q}": sp[c][m][q] for m in ("ece", "ace", "mce") for q in _SPREAD})
        for m in _per_case_values(metric)[4:]:
            row.update({f"{m}_{q}": sp[c][m][q] for q in ("mean", *_SPREAD)})
        if "volume_crps" in res.get("units", {}):
            row["volume_crps_unit"] = res["units"]["volume_crps"]
        rows.append(row)
    mean: dict[str, Any] = {"class": "mean", "class_name": "mean over classes", "cases": res["num_cases"]}
    mean.update({col: float(v[~v.isnan()].mean()) if bool((~v.isnan()).any()) else math.nan for col, v in cols.items()})
    for m in _per_case_values(metric)[4:]:  # the class mean of the per-class means (Dice, CRPS, consensus Dice)
        vals = [row[f"{m}_mean"] for row in rows if not math.isnan(row[f"{m}_mean"])]
        mean[f"{m}_mean"] = float(np.mean(vals)) if vals else math.nan
    if "volume_crps" in res.get("units", {}):
        mean["volume_crps_unit"] = res["units"]["volume_crps"]
    rows.append(mean)
    return rows


def _summary_fields(metric: Any) -> list[str]:
    fields = ["class", "class_name", "cases", "cases_with_class"]
    fields += [f"{kind}_{m}" for kind in ("macro", "micro") for m in ("ece", "ace", "mce")]
    fields += [f"{m}_{q}" for m in ("ece", "ace", "mce") for q in _SPREAD]
    fields += ["macro_l2", "micro_l2"]
    fields += [f"{m}_{q}" for m in _per_case_values(metric)[4:] for q in ("mean", *_SPREAD)]
    fields += ["volume_crps_unit"] if "volume_crps" in _per_case_values(metric) else []
    return fields


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else v
    return v


def _csv_value(v: Any) -> Any:
    return _fmt(v) if isinstance(v, float) else v


def _write_outputs(res: dict[str, Any], out: Path, dice: bool, figures: bool = True) -> list[Path]:
    """Write every output into a fresh temporary directory next to ``out`` and rename it into place
    (:func:`calibops.cli.outputs.replace_output_dir`): no file of a previous run survives, and a failure leaves
    ``out`` as it was."""
    try:
        return replace_output_dir(out, lambda tmp: _write_files(res, tmp, dice, figures))
    except OutputDirError as exc:
        raise (UsageError if exc.status == 2 else EvaluationError)(str(exc)) from exc


def _write_files(res: dict[str, Any], tmp: Path, dice: bool, figures: bool) -> None:
    """Every output file, written into the directory ``tmp``."""
    metric = res["metric"]
    names = res["class_names"]
    used = [_row_name(c, names) for c in _row_keys(metric)]
    fields = ["case", "class", "class_name", "ece", "ace", "mce", "voxels"] + (["dice"] if dice else [])
    extra = [m for m in _per_case_values(metric)[4:] if m != "dice"]
    fields += ["l2", *extra] + (["volume_crps_unit"] if "volume_crps" in extra else [])
    fields += ["group"] if metric.groups is not None else []
    with open(tmp / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for rec in metric.records():
            row = dict(rec, case=rec["image"], class_name=_row_name(rec["class"], names))
            row["volume_crps_unit"] = res.get("units", {}).get("volume_crps")
            w.writerow([_csv_value(row[k]) for k in fields])
    rows = summary_rows(res)
    with open(tmp / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_summary_fields(metric), extrasaction="ignore")
        w.writeheader()
        w.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    report: dict[str, Any] = {
        "cases": res["num_cases"],
        "raters": res["raters"],
        "mode": res["mode"],
        "num_bins": metric.num_bins,
        "units": res.get("units", {}),
        **res.get("run", {}),  # world_size, prefetch, wall_time_s, the cases of each rank
        "summary": [{k: _json_value(v) for k, v in row.items()} for row in rows],
    }
    if "group_rows" in res:
        with open(tmp / "groups.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(_GROUP_FIELDS), extrasaction="ignore")
            w.writeheader()
            w.writerows(
                {k: _csv_value(v) for k, v in dict(row, class_name=_row_name(row["class"], names)).items()}
                for row in res["group_rows"]
            )
        report["groups"] = [{k: _json_value(v) for k, v in row.items()} for row in res["group_rows"]]
    with open(tmp / "summary.json", "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
        f.write("\n")
    hist, counts, pooled = res["histogram"], res["counts"], metric.pooled_stats()
    if hist.dim() == 2:  # top-label: one row
        hist = hist[None]
    np.savez(
        tmp / "dataset_histogram.npz",
        histogram=hist.cpu().numpy(),
        counts=counts.cpu().numpy(),
        classes=np.asarray(metric.classes, dtype=np.int64),  # empty for top-label
        class_names=np.asarray(used),
        sum_p=pooled.sum_p.cpu().numpy(),  # the pooled statistics: calibops compare draws pooled diagrams
        sum_y=pooled.sum_y.cpu().numpy(),
    )
    if figures:
        _write_figures(res, tmp, hist, counts, used)


def _figure_stem(key: Any, names: Sequence[str]) -> str:
    from ..plot import file_stem

    return "top_label" if key == "top_label" else file_stem(_row_name(key, names))


def _write_figures(res: dict[str, Any], tmp: Path, hist: Any, counts: Any, used: list[str]) -> None:
    """The figures of ``calibops evaluate`` (each as PDF and 300-dpi PNG, :func:`calibops.plot.save_figure`): the
    dataset reliability histogram, the pooled reliability diagram beside it per class and for all classes, and
    with groups the groups' reliability diagrams per class; class names in the file names."""

    from ..plot import dataset_reliability_histogram, pooled_reliability, save_figure

    metric, names = res["metric"], res["class_names"]
    keys = _row_keys(metric)
    pooled = metric.pooled_stats()
    fig = dataset_reliability_histogram(hist, counts=counts, class_names=used)
    save_figure(fig, tmp / "dataset_histogram")
    for k, c in enumerate(keys):
        fig = pooled_reliability(pooled, hist, class_index=k, class_names=used)
        save_figure(fig, tmp / f"reliability_{_figure_stem(c, names)}")
    if len(keys) > 1:
        save_figure(pooled_reliability(pooled, hist, class_names=used), tmp / "reliability_all_classes")
    if "group_rows" in res:
        for k, c in enumerate(keys):
            fig = metric.plot_groups(k, title=_row_name(c, names))
            save_figure(fig, tmp / f"groups_reliability_{_figure_stem(c, names)}")


def _print_summary(res: dict[str, Any]) -> None:
    metric, names = res["metric"], res["class_names"]
    raters = f", {res['raters']} raters (macro: mean over raters)" if res["raters"] > 1 else ""
    background = (
        ""
        if res["mode"] == "top_label"
        else (
            ", background class included"
            if metric.include_background
            else ", background class 0 left out (--include-background keeps it)"
        )
    )
    print(f"{res['num_cases']} cases, {metric.num_bins} bins, {res['mode']}{raters}{background}")
    print(
        f"{'class':<16} {'macro ECE':>10} {'macro ACE':>10} {'macro MCE':>10} "
        f"{'micro ECE':>10} {'micro ACE':>10} {'micro MCE':>10}"
    )
    rows = summary_rows(res)
    cols = [f"{kind}_{m}" for kind in ("macro", "micro") for m in ("ece", "ace", "mce")]
    for row in rows[:-1]:
        print(f"{row['class_name'][:16]:<16} " + " ".join(f"{row[k]:>10.4f}" for k in cols))
    print("per case (mean ± std, median [IQR]):")
    units = res.get("units", {})
    for c in _row_keys(metric):
        parts = []
        for m in _per_case_values(metric):
            if m == "l2":
                continue
            d = res["spread"][c][m]
            unit = {"mm^3": " mm³", "voxels": " voxels"}.get(units.get(m, ""), "")
            unit = unit or (f" ({units[m]})" if m == "volume_crps" and m in units else "")
            label = {"dice": "Dice", "volume_crps": "volume CRPS", "consensus_dice": "consensus Dice"}.get(m, m.upper())
            parts.append(f"{label} {d['mean']:.4f} ± {d['std']:.4f}, {d['median']:.4f} [{d['iqr']:.4f}]{unit}")
        print(f"{_row_name(c, names)[:16]:<16} " + "; ".join(parts))
    for row in res.get("group_rows", []):
        if row["group"] == "gap":
            print(
                f"{_row_name(row['class'], names)[:16]:<16} largest between-group macro ECE gap {row['macro_ece']:.4f} "
                f"[{row['macro_ece_lower']:.4f}, {row['macro_ece_upper']:.4f}]"
            )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def evaluate_main(argv: list[str] | None = None) -> int:
    """Entry point of ``calibops evaluate``; returns the exit status (0 ok, 1 data error, 2 usage).

    Every failure prints one line ``calibops evaluate: error: ...`` on stderr and writes no output file.
    An unexpected exception (a bug) is reported the same way; ``CALIBOPS_DEBUG=1`` re-raises it instead.
    Under ``torchrun`` every rank runs this (:mod:`calibops.cli.distributed`): rank 0 alone prints and writes,
    and every rank returns the same status.
    """
    from .distributed import Session

    session = Session.from_env()
    with session.quiet():
        return session.end(_evaluate_main(argv, session))


def _evaluate_main(argv: list[str] | None, session: Any) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        session.start(args)
        res = evaluate(args, session)
        if res is None:  # a rank other than 0: rank 0 writes the outputs
            return 0
        written = _write_outputs(res, Path(args.out), args.dice, figures=not args.no_figures)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT, --out left as it was
        print("calibops evaluate: error: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse exits only for --help (0)
        return int(exc.code) if isinstance(exc.code, int) else 2
    except UsageError as exc:
        print(f"calibops evaluate: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (EvaluationError, ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:
        print(f"calibops evaluate: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, never a raw traceback
        if os.environ.get("CALIBOPS_DEBUG", "0") not in ("", "0"):
            raise
        print(
            f"calibops evaluate: error: unexpected {type(exc).__name__}: {_one_line(exc)} (a bug: please report it; "
            "CALIBOPS_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    _print_summary(res)
    run = res["run"]
    ranks = f" on {run['world_size']} ranks" if run["world_size"] > 1 else ""
    rate = res["num_cases"] / max(run["wall_time_s"], 1e-9)
    print(f"evaluated {res['num_cases']} cases in {run['wall_time_s']:.1f} s ({rate:.3g} cases/s){ranks}")
    for line in bootstrap_warnings(res.get("group_rows", []), res["class_names"]):
        print(f"calibops evaluate: warning: {line}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(evaluate_main())
