"""What the MONAI and torchmetrics adapters share: tensor unwrapping and the single-channel (C = 1) rule."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..metrics import DatasetCalibration


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise an ImportError naming the pip line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs {module.split('.')[0]}, an optional dependency of calibops: "
            f"pip install 'calibops[{extra}]' (or pip install {extra if extra != 'monai' else 'monai'})"
        ) from exc


def plain(x: Any, name: str) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of ``x`` (MONAI ``MetaTensor`` and other subclasses unwrapped)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or a list of them), got {type(x).__name__}")
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


class Accumulator:
    """A :class:`DatasetCalibration` created at the first batch (C from the prediction), with MONAI's C = 1 rule.

    With one channel and ``to_onehot_y=True``, MONAI ignores ``to_onehot_y`` (and ``softmax``) with a warning
    and uses the label map {0, 1} as the target of the channel; this does the same (the statistics then use
    the label map as a dense target). ``ignore_index`` with one channel is refused (leaving voxels out needs
    a label map over two or more channels).
    """

    def __init__(self, owner: str, **config: Any) -> None:
        self.owner = owner
        self.config = dict(config)
        self.dataset: DatasetCalibration | None = None
        self.single = False

    def _create(self, C: int) -> DatasetCalibration:
        cfg = dict(self.config)
        if C == 1:
            if cfg.get("softmax"):
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=4)
                cfg["softmax"] = False
            if cfg.get("to_onehot_y"):
                warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=4)
                if cfg.get("ignore_index") is not None:
                    raise ValueError(
                        f"{self.owner}: ignore_index needs two or more channels (a single-channel prediction's "
                        "label map is its dense target); predict background and foreground, or mask the voxels"
                    )
                cfg["to_onehot_y"] = False
                self.single = True
        return DatasetCalibration(C, **cfg)

    def update(self, y_pred: torch.Tensor, y: torch.Tensor, image_ids: list[Any] | None = None) -> DatasetCalibration:
        if y_pred.dim() < 2:
            raise ValueError(f"{self.owner}: y_pred must be (B, C, *spatial), got shape {tuple(y_pred.shape)}")
        if self.dataset is None:
            self.dataset = self._create(y_pred.shape[1])
        if self.single and y.dim() == y_pred.dim() - 1:
            y = y.unsqueeze(1)
        if self.single and not y.is_floating_point():
            y = y.to(torch.uint8) if y.dtype == torch.bool else y.float()
        try:
            self.dataset.update(y_pred, y, image_ids=image_ids)
        except ValueError as exc:
            if self.single:
                raise ValueError(
                    f"{exc} (single-channel prediction: the label map is the target of the one channel, "
                    "labels must be 0 or 1)"
                ) from None
            raise
        return self.dataset

    def reset(self) -> None:
        if self.dataset is not None:
            self.dataset.reset()
