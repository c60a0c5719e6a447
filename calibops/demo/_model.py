"""Scaffolding of ``calibops demo``: the small U-Net and the Dice + cross-entropy baseline loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._data import NUM_CLASSES

__all__ = ["TinyUNet", "dice_ce_loss"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.1, inplace=True),
    )


class TinyUNet(nn.Module):
    """A three-level U-Net (conv-BN-LeakyReLU blocks, max-pool down, transposed-conv up, skip concatenation).

    ``(B, in_channels, H, W) -> (B, num_classes, H, W)`` logits; H and W must be divisible by 4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.mid = _block(in_channels, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), _block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), _block(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for every pixel."""
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice loss and cross-entropy of ``logits (B, C, *spatial)`` against integer ``labels (B, *spatial)``.

    Dice as in MONAI's ``DiceLoss(softmax=True, to_onehot_y=True)``: per image and class
    ``1 - (2 Σ p y + s) / (Σ p + Σ y + s)``, averaged over images and classes (background included).
    """
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean()
    return dice, F.cross_entropy(logits.float(), labels)
