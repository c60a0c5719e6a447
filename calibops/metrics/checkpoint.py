"""Checkpoints of a dataset accumulator: the state dict written, and the checks before one is loaded.

A state dict is ``{"config": MetricConfig.as_dict(), <every state entry>: tensor, ["records": [...]]}``. Loading
checks everything before anything is replaced, so a bad state dict leaves the accumulator as it was.

Versions: checkpoints written by calibops 0.2 and later load (a development state between 0.1 and 0.2 without
``macro_l2`` loads with the macro L2 unknown, NaN; one without ``mode`` in its config is marginal). Checkpoints of
calibops 0.1 are refused with a ``ValueError`` that says so: 0.1 did not count the images whose target holds each
class (``images_with_class``, reported by ``compute()``), and that cannot be recovered from its sums.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import MetricConfig
from .records import ImageRecords
from .state import SumState

__all__ = ["check_consistent", "check_records", "load_state_dict", "state_dict"]

_DEFAULTS = {"macro_l2": float("nan")}  # written before the L2 error existed: the macro L2 is unknown


def state_dict(cfg: MetricConfig, state: SumState, records: ImageRecords) -> dict[str, Any]:
    """The configuration, every state entry (CPU copies) and, with ``keep_records``, the records."""
    sd: dict[str, Any] = {"config": cfg.as_dict()}
    sd.update({k: v.detach().cpu().clone() for k, v in state.tensors.items()})
    if cfg.keep_records:
        sd["records"] = [dict(r) for r in records.rows]
    return sd


def load_state_dict(cfg: MetricConfig, state: SumState, records: ImageRecords, sd: Any) -> None:
    """Check ``sd`` against ``cfg`` (configuration, every entry, the relations between the sums, the number of
    records) and only then replace ``state`` and ``records``; a violation is a ``ValueError`` naming the key."""
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict from DatasetCalibration.state_dict(), got {type(sd)}")
    given = sd.get("config")
    if isinstance(given, dict) and "mode" not in given and "images_with_class" not in sd and "num_nonfinite" not in sd:
        raise ValueError(
            "state_dict was written by calibops 0.1 (its config has no 'mode' and it lacks 'images_with_class' and "
            "'num_nonfinite'): 0.1 did not count the images whose target holds each class, which this version "
            "reports, so it cannot be restored faithfully. Checkpoints of calibops 0.2 and later load; re-run the "
            "evaluation to continue from a 0.1 state"
        )
    if isinstance(given, dict) and "mode" not in given:  # written before top-label existed: marginal
        given = {**given, "mode": "marginal"}
    if given != cfg.as_dict():
        raise ValueError(f"state_dict config {given} does not match this metric's {cfg.as_dict()}")
    new = state.checked(sd, defaults=_DEFAULTS)
    check_consistent(cfg, {k: v.double() for k, v in new.items()})
    rows = sd.get("records", [])
    if "records" in sd and cfg.keep_records:
        check_records(cfg, {k: v.double() for k, v in new.items()}, rows)
    state.load(new)
    records.rows = [dict(r) for r in rows]


_TOL = 1e-5  # relative slack: float32 per-image sums are added in float64
_BIN_TOL = 1e-4  # relative slack of a bin's float32 sums of p against the bin's edges


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"state_dict[{key!r}] {msg}")


def _over(a: torch.Tensor, b: torch.Tensor, rel: float = _TOL) -> bool:
    """Whether ``a > b`` anywhere beyond float slack (relative to ``b``)."""
    return bool((a > b + rel * b.abs() + rel).any())


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = _TOL) -> bool:
    """Whether ``a`` and ``b`` agree within float slack (relative to the larger)."""
    return bool(((a - b).abs() <= rel * torch.maximum(a.abs(), b.abs()) + rel).all())


def _within_bins(cfg: MetricConfig, s: dict[str, torch.Tensor], pre: str, bins: int) -> None:
    """Every voxel of bin j has p in [e_j, e_{j+1}] (the binning edges), so per bin ``count·e_j <= sum_p <=
    count·e_{j+1}`` (and ``sum_p2`` between the squares): a count scaled without its sums, or sums scaled without
    their count, leave these bounds."""
    from ..reference import bin_edges

    e = bin_edges(bins).double()
    lo, hi = e[:-1], e[1:]
    n, sp = s[pre + "count"], s[pre + "sum_p"]
    slack = _BIN_TOL * n + _BIN_TOL
    if bool((sp < n * lo - slack).any()):
        _fail(
            pre + "count",
            f"is too large for state_dict[{pre + 'sum_p'!r}]: the voxels of confidence bin j have p >= its lower "
            "edge, so sum_p >= count x lower edge in every bin",
        )
    if bool((sp > n * hi + slack).any()):
        _fail(
            pre + "sum_p",
            f"exceeds state_dict[{pre + 'count'!r}] x the upper edge of some confidence bin (p lies in its bin)",
        )
    if pre == "" and cfg.brier:
        p2 = s["sum_p2"]
        if bool((p2 < n * lo * lo - slack).any()) or bool((p2 > n * hi * hi + slack).any()):
            _fail("sum_p2", "is not within count x the squared edges of some confidence bin (p lies in its bin)")


def _bounded(cfg: MetricConfig, s: dict[str, torch.Tensor], pre: str, bins: int) -> None:
    """``sum_p`` and ``sum_y`` within ``[0, count]`` (p and y lie in [0, 1]) and within the bins' edges."""
    n = s[pre + "count"]
    for k in ("sum_p", "sum_y"):
        if bool((s[pre + k] > n * (1 + _TOL) + _TOL).any()):
            _fail(pre + k, f"exceeds state_dict[{pre + 'count'!r}] in some bin (p and y lie in [0, 1])")
    _within_bins(cfg, s, pre, bins)


def _sums_to(s: dict[str, torch.Tensor], group_key: str, key: str, exact: bool) -> None:
    """Every image has a group: the group entries add up to the global one."""
    total, whole = s[group_key].sum(0), s[key]
    if key == "macro_n":
        whole = whole[0]  # group_macro_n counts the images where the ECE (all three errors) is defined
    if group_key in ("group_macro_l2",):
        known = ~torch.isnan(whole)
        total, whole = total[known], whole[known]
    ok = torch.equal(total, whole) if exact else _close(total, whole, 1e-6)
    if not ok:
        _fail(group_key, f"summed over the groups does not equal state_dict[{key!r}] (every image has one group)")


def check_consistent(cfg: MetricConfig, s: dict[str, torch.Tensor]) -> None:
    """The relations between the sums every real accumulation satisfies (float64 copies, on the CPU); the first
    violated one is a ``ValueError`` naming the entry."""
    tol = _TOL
    M = cfg.options.num_bins
    seg = not cfg.classification
    prefixes = [""] + (["group_"] if cfg.groups is not None else []) + (["fine_"] if cfg.adaptive_bins else [])
    totals = s["count"].sum(-1)  # voxels per class
    _bounded(cfg, s, "", M)
    if cfg.groups is not None:  # before the groups' own bounds: a tampered group entry is named as such
        for k in ("count", "sum_p", "sum_y"):
            _sums_to(s, "group_" + k, k, exact=False)
    if cfg.adaptive_bins is not None:  # the fine pass counts the same voxels over finer bins
        if not _close(s["fine_count"].sum(-1), totals):
            _fail("fine_count", "does not hold the voxels state_dict['count'] holds, per class")
    for pre in prefixes[1:]:
        _bounded(cfg, s, pre, cfg.fine_bins if pre == "fine_" else M)
    images = s["num_images"]
    for k in ("macro_n", "images_with_class"):
        if bool((s[k] > images).any()):
            raise ValueError(f"state_dict[{k!r}] exceeds state_dict['num_images'] = {int(images)}")
    if bool((s["images_with_class"] > s["macro_n"][0]).any()):
        raise ValueError("state_dict['images_with_class'] exceeds state_dict['macro_n'][0] (images with voxels)")
    if bool((s["macro_sum"] > s["macro_n"] * (1 + tol) + tol).any()):
        raise ValueError("state_dict['macro_sum'] exceeds state_dict['macro_n'] (every error lies in [0, 1])")
    l2 = s["macro_l2"]
    known = ~torch.isnan(l2)
    if bool((l2[known] > (s["macro_n"][0] * (1 + tol) + tol)[known]).any()):
        raise ValueError("state_dict['macro_l2'] exceeds state_dict['macro_n'][0] (every error lies in [0, 1])")
    if cfg.mode == "marginal" and int(s["num_nonfinite"]) == 0 and totals.numel() > 1:
        # every kept voxel is counted once in every class row (non-finite entries may leave one class only)
        if not _close(totals, totals.max().expand_as(totals)):
            _fail("count", "holds different numbers of voxels in different classes, with no non-finite value left out")
    if seg:
        column = s["hist"].sum(1)  # (C', M): images in which each (class, bin) was non-empty
        if bool((column > images).any()):
            raise ValueError(f"state_dict['hist'] counts more than num_images = {int(images)} images in a bin")
        if not torch.equal(column > 0, s["count"] > 0):
            raise ValueError("state_dict['hist'] and state_dict['count'] disagree on which bins hold voxels")
        if _over(column, s["count"]):
            _fail("count", "is smaller than the images state_dict['hist'] counts in some bin (each adds a voxel)")
        with_voxels = s["macro_n"][0]
        if bool((column > with_voxels.unsqueeze(-1)).any()) or bool((column.sum(-1) < with_voxels).any()):
            _fail(
                "hist",
                "does not fit state_dict['macro_n'][0]: every image with voxels of a class fills one to M of its "
                "bins, and only those images do",
            )
    if cfg.groups is not None:
        if int(s["group_images"].sum()) != int(images):
            raise ValueError("state_dict['group_images'] does not add up to state_dict['num_images']")
        if seg:
            _sums_to(s, "group_hist", "hist", exact=True)
            _sums_to(s, "group_macro_n", "macro_n", exact=True)
            _sums_to(s, "group_macro_sum", "macro_sum", exact=False)
            _sums_to(s, "group_macro_l2", "macro_l2", exact=False)
            gn = s["group_macro_n"]
            if bool((gn > s["group_images"].view(-1, 1)).any()):
                _fail("group_macro_n", "exceeds state_dict['group_images'] (images of the group)")
            if _over(s["group_macro_sum"], gn.unsqueeze(1).expand_as(s["group_macro_sum"])):
                _fail("group_macro_sum", "exceeds state_dict['group_macro_n'] (every error lies in [0, 1])")
    if cfg.brier:
        sp, sy = s["sum_p"], s["sum_y"]
        if _over(s["sum_p2"], sp):
            _fail("sum_p2", "exceeds state_dict['sum_p'] in some bin (p² <= p for p in [0, 1])")
        if _over(s["sum_py"], torch.minimum(sp, sy)):
            _fail("sum_py", "exceeds state_dict['sum_p'] or state_dict['sum_y'] in some bin (p·y <= p, y)")
        if seg and _over(s["brier_sum"], s["macro_n"][0].to(s["brier_sum"].dtype)):
            _fail(
                "brier_sum",
                "exceeds state_dict['macro_n'][0], the images with voxels of the class (each image's Brier score "
                "lies in [0, 1])",
            )


_UNIT_VALUES = ("ece", "ace", "mce", "l2", "dice", "consensus_dice")  # record values in [0, 1] (or NaN)


def check_records(cfg: MetricConfig, s: dict[str, torch.Tensor], rows: Any) -> None:
    """The records of a checkpoint against its sums: images x classes records in blocks of one per class (the
    classes in order, one image id and group per block), exactly the record fields, values in range, known group
    names, and per class the defined ECE values, their sum and the voxels adding up to the sums."""
    K = cfg.num_used_classes
    images = int(s["num_images"])
    expected = images * K
    if not isinstance(rows, list) or len(rows) != expected:
        n = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise ValueError(f"state_dict['records'] has {n} records, expected num_images x classes = {expected}")
    fields = set(cfg.record_fields())
    names = cfg.row_names
    ece, defined, voxels = [0.0] * K, [0] * K, [0] * K  # Python numbers: per-record tensor indexing is slow
    checked_values = sorted(fields & {*_UNIT_VALUES, "volume_crps"})
    per_group: dict[Any, int] = {}
    for i, r in enumerate(rows):
        where = f"state_dict['records'][{i}]"
        if not isinstance(r, dict):
            raise ValueError(f"{where} is a {type(r).__name__}, not a record (dict)")
        if set(r) != fields:
            missing, extra = sorted(fields - set(r)), sorted(map(str, set(r) - fields))
            raise ValueError(
                f"{where} does not hold the record fields {sorted(fields)}: missing {missing}, unknown {extra}"
            )
        b, k = divmod(i, K)
        if r["class"] != names[k]:
            raise ValueError(
                f"{where} has class {r['class']!r}, expected {names[k]!r}: records come in blocks of one per class "
                f"{list(names)}, in order, per image (reordered records?)"
            )
        first = rows[b * K]
        if k and r["image"] != first["image"]:
            raise ValueError(f"{where} has image {r['image']!r} in the block of image {first['image']!r}")
        for name in checked_values:
            v = r[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{where}[{name!r}] must be a number, got {type(v).__name__}")
            hi = math.inf if name == "volume_crps" else 1 + _TOL
            if not (math.isnan(v) or 0 <= v <= hi):
                raise ValueError(f"{where}[{name!r}] = {v} is outside [0, {'inf' if hi == math.inf else 1}]")
        v = r["voxels"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where}['voxels'] must be a whole number >= 0, got {v!r}")
        if cfg.groups is not None:
            g = r["group"]
            if g not in cfg.groups:
                raise ValueError(f"{where} has group {g!r}, not one of this metric's groups {cfg.groups}")
            if k and g != first["group"]:
                raise ValueError(f"{where} has group {g!r} in the block of an image of group {first['group']!r}")
            if k == 0:
                per_group[g] = per_group.get(g, 0) + 1
        if not math.isnan(r["ece"]):
            ece[k] += r["ece"]
            defined[k] += 1
        voxels[k] += v
    ece_t = torch.tensor(ece, dtype=torch.float64)
    voxels_t = torch.tensor(voxels, dtype=torch.float64)
    if not torch.equal(torch.tensor(defined, dtype=torch.int64), s["macro_n"][0].long()):
        raise ValueError("state_dict['records'] define the ECE of other images than state_dict['macro_n'] counts")
    if not _close(ece_t, s["macro_sum"][0], 1e-6):
        raise ValueError("state_dict['records'] ECE values do not add up to state_dict['macro_sum'][0]")
    if not _close(voxels_t, s["count"].sum(-1)):
        raise ValueError("state_dict['records'] voxels do not add up to the voxels of state_dict['count'], per class")
    if cfg.groups is not None:
        counts = torch.tensor([per_group.get(g, 0) for g in cfg.groups], dtype=torch.int64)
        if not torch.equal(counts, s["group_images"].long()):
            raise ValueError("state_dict['records'] hold other images per group than state_dict['group_images']")
