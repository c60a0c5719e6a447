"""Per-image records of a dataset accumulator: one dict per (image, class), gathering and CSV.

The only part of :class:`calibops.DatasetCalibration` whose memory grows with the data set (O(images · C')),
kept only when asked (``keep_records=True``). Bootstrap confidence intervals and per-group intervals resample
these records; the pooled sums (:mod:`calibops.metrics.state`) never need them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import torch

from .state import dist_ready

__all__ = ["ImageRecords", "hard_dice", "make_records"]


def make_records(
    image_ids: Sequence[Any],
    classes: Sequence[Any],
    values: dict[str, torch.Tensor],
    voxels: torch.Tensor,
    extra: dict[str, Sequence[Any]] | None = None,
) -> list[dict[str, Any]]:
    """One record per (image b, class k): ``values[name][b, k]`` as floats, ``voxels[b, k]`` as an int, and
    ``extra[name][b]`` (e.g. the image's group). Pure: the caller appends them (``ImageRecords.extend``)."""
    vals = {k: v.detach().cpu() for k, v in values.items()}
    vox = voxels.detach().cpu()
    rows: list[dict[str, Any]] = []
    for b, ident in enumerate(image_ids):
        for k, c in enumerate(classes):
            rec: dict[str, Any] = {"image": ident, "class": c}
            for name, v in vals.items():
                if name != "dice":
                    rec[name] = float(v[b, k])
            rec["voxels"] = int(vox[b, k])
            if "dice" in vals:
                rec["dice"] = float(vals["dice"][b, k])
            for name, col in (extra or {}).items():
                rec[name] = col[b]
            rows.append(rec)
    return rows


class ImageRecords:
    """A list of per-(image, class) records: ``image``, ``class``, the error values, ``voxels`` and extras."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def clear(self) -> None:
        self.rows = []

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index: Any) -> Any:  # list-like access (``metric._records[-n:]``), as before the split
        return self.rows[index]

    def extend(self, rows: list[dict[str, Any]]) -> None:
        """Append rows made by :func:`make_records` (one list append: nothing to fail halfway)."""
        self.rows.extend(rows)

    def get(self, gather: bool = False, process_group: Any = None) -> list[dict[str, Any]]:
        """Copies of the records; ``gather=True`` collects every rank's (a collective) and adds ``rank``."""
        recs = [dict(r) for r in self.rows]
        if gather and dist_ready(process_group):
            import torch.distributed as dist

            world = dist.get_world_size(process_group)
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, recs, group=process_group)
            recs = [dict(r, rank=rank) for rank, part in enumerate(parts) for r in part]
        return recs

    @staticmethod
    def write_csv(path: str | os.PathLike, recs: list[dict[str, Any]], fields: list[str]) -> None:
        """Write ``recs`` with these columns (``rank`` first when the records were gathered)."""
        if recs and "rank" in recs[0]:
            fields = ["rank", *fields]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(recs)

    @staticmethod
    def table(
        recs: list[dict[str, Any]], classes: Sequence[Any], metric: str
    ) -> tuple[list[Any], torch.Tensor, list[Any]]:
        """``(image ids, values (images, C') float64, group of each image or None)`` of one metric. Records come
        in blocks of one per class for each image (as :meth:`add` writes them, also after gathering), so an image
        is a block, whatever its id (ids may repeat)."""
        K = len(classes)
        if len(recs) % max(K, 1):
            raise ValueError(f"{len(recs)} records are not whole blocks of {K} classes per image")
        n = len(recs) // max(K, 1)
        for i in range(n):
            if [r["class"] for r in recs[i * K : (i + 1) * K]] != list(classes):
                raise ValueError(f"records of image {i} do not hold the classes {list(classes)} in order")
        vals = torch.tensor([float(r[metric]) for r in recs], dtype=torch.float64).reshape(n, K)
        ids = [recs[i * K]["image"] for i in range(n)]
        groups = [recs[i * K].get("group") for i in range(n)]
        return ids, vals, groups


def hard_dice(
    input: torch.Tensor,
    target: torch.Tensor,
    classes: Sequence[int],
    to_onehot_y: bool,
    ignore_index: int | None,
    *,
    softmax: bool,
    sigmoid: bool,
) -> torch.Tensor:
    """Dice of the hard prediction per (image, used class), (B, C') float64; NaN when both are empty."""
    B, C = input.shape[0], input.shape[1]
    x = input.reshape(B, C, -1)
    keep = None
    if to_onehot_y:
        lab = target.reshape(B, -1).long()
        if ignore_index is not None:
            keep = lab != ignore_index
    else:
        dense = target.reshape(B, C, -1)
    multiclass = C > 1 and not sigmoid
    # voxels left out of the statistics as non-finite (nonfinite="skip") are left out of Dice as well
    if softmax:
        finite = ~(torch.isnan(x) | torch.isposinf(x)).any(1) & ~torch.isneginf(x).all(1)
    elif sigmoid:
        finite = ~torch.isnan(x).any(1)
    else:
        finite = torch.isfinite(x).all(1)
    keep = finite if keep is None else keep & finite
    if multiclass:
        pred_cls = x.argmax(1)  # softmax is monotone: argmax of logits = argmax of probabilities
    out = torch.empty(B, len(classes), dtype=torch.float64, device=input.device)
    for k, c in enumerate(classes):
        if multiclass:
            pred = pred_cls == c
        elif sigmoid:
            pred = x[:, c] > 0  # sigmoid(x) > 0.5
        else:
            pred = x[:, c] > 0.5
        pred = pred.double()
        y = (lab == c).double() if to_onehot_y else dense[:, c].double()
        if keep is not None:
            pred = pred * keep
            y = y * keep
        inter = (pred * y).sum(-1)
        den = pred.sum(-1) + y.sum(-1)
        nan = torch.full_like(den, float("nan"))
        out[:, k] = torch.where(den > 0, 2 * inter / den.clamp(min=1e-300), nan)
    return out
