"""Checkpoints of a dataset accumulator: the state dict written, and the checks before one is loaded.

A state dict is ``{"config": MetricConfig.as_dict(), <every state entry>: tensor, ["records": [...]]}``. Loading
checks everything before anything is replaced, so a bad state dict leaves the accumulator as it was.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import MetricConfig
from .records import ImageRecords
from .state import SumState

__all__ = ["check_consistent", "load_state_dict", "state_dict"]

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
    if isinstance(given, dict) and "mode" not in given:  # written before top-label existed: marginal
        given = {**given, "mode": "marginal"}
    if given != cfg.as_dict():
        raise ValueError(f"state_dict config {given} does not match this metric's {cfg.as_dict()}")
    new = state.checked(sd, defaults=_DEFAULTS)
    check_consistent(cfg, {k: v.double() for k, v in new.items()})
    rows = sd.get("records", [])
    if "records" in sd and cfg.keep_records:
        expected = int(new["num_images"]) * cfg.num_used_classes
        if not isinstance(rows, list) or len(rows) != expected:
            n = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise ValueError(f"state_dict['records'] has {n} records, expected num_images x classes = {expected}")
    state.load(new)
    records.rows = [dict(r) for r in rows]


def check_consistent(cfg: MetricConfig, s: dict[str, torch.Tensor]) -> None:
    """The relations between the sums every real accumulation satisfies (float64 copies, on the CPU)."""
    tol = 1e-5  # relative slack: float32 per-image sums are added in float64
    prefixes = [""] + (["group_"] if cfg.groups is not None else []) + (["fine_"] if cfg.adaptive_bins else [])
    for pre in prefixes:
        n = s[pre + "count"]
        for k in ("sum_p", "sum_y"):
            if bool((s[pre + k] > n * (1 + tol) + tol).any()):
                raise ValueError(
                    f"state_dict[{pre + k!r}] exceeds state_dict[{pre + 'count'!r}] in some bin (p and y lie in [0, 1])"
                )
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
    if not cfg.classification:
        column = s["hist"].sum(1)  # (C', M): images in which each (class, bin) was non-empty
        if bool((column > images).any()):
            raise ValueError(f"state_dict['hist'] counts more than num_images = {int(images)} images in a bin")
        if not torch.equal(column > 0, s["count"] > 0):
            raise ValueError("state_dict['hist'] and state_dict['count'] disagree on which bins hold voxels")
    if cfg.groups is not None and int(s["group_images"].sum()) != int(images):
        raise ValueError("state_dict['group_images'] does not add up to state_dict['num_images']")
