"""Scaffolding of ``calibops demo``: the synthetic segmentation data set (nothing here uses calibops).

2D grey-level images with four classes -- background, a large "organ", a "lesion" that touches or sits inside
it with a contrast that varies from clear to faint, and small, rare "spots" -- blurred and noisy, with label
boundaries that wander by a pixel or two away from the visible edges (as two annotators would disagree).
Nothing in the image can tell a network exactly where the label boundary is, so a well-calibrated network must
be unsure there, which is what the calibration metrics measure. Generated in code from a seed; nothing is
downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CLASS_NAMES", "IMAGE_SIZE", "NUM_CLASSES", "DemoData", "make_dataset"]

NUM_CLASSES = 4
CLASS_NAMES = ("background", "organ", "lesion", "spots")
IMAGE_SIZE = 48


@dataclass
class DemoData:
    """Images ``(N, 1, H, W)`` float32 and integer labels ``(N, H, W)`` int64 in ``[0, NUM_CLASSES)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def _smooth_field(n: int, size: int, coarse: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random field ``(n, 1, size, size)`` with unit-ish amplitude: bicubic upsampling of coarse noise."""
    noise = torch.randn(n, 1, coarse, coarse, generator=gen)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(n, 1, H, W)`` with reflect padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def _ellipse_level(
    yy: torch.Tensor,
    xx: torch.Tensor,
    cy: torch.Tensor,
    cx: torch.Tensor,
    ry: torch.Tensor,
    rx: torch.Tensor,
    angle: torch.Tensor,
) -> torch.Tensor:
    """Per-image ellipse level set ``(n, 1, H, W)``: < 0 inside, 0 on the boundary, in units of the radius."""
    v = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    dy, dx = yy - v(cy), xx - v(cx)
    cos, sin = v(torch.cos(angle)), v(torch.sin(angle))
    u, w = cos * dx + sin * dy, -sin * dx + cos * dy
    return torch.sqrt((u / v(rx)) ** 2 + (w / v(ry)) ** 2 + 1e-12) - 1.0


def make_dataset(num_images: int, seed: int, size: int = IMAGE_SIZE) -> DemoData:
    """Generate ``num_images`` synthetic segmentation images deterministically from ``seed``.

    Classes: 0 background, 1 organ (large ellipse with a wobbly outline), 2 lesion (an ellipse overlapping
    the organ's rim, drawn on top of it, with a per-image contrast from clear to faint), 3 spots (0 to 3 small
    blobs, absent from about a third of the images: the rare class). The image is the class intensity map
    blurred and corrupted by smooth and white noise; the label map uses outlines that differ from the
    visible ones by an independent smooth displacement of about one to two pixels, so the true label near
    every boundary is ambiguous given the image.
    """
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    gen = torch.Generator().manual_seed(int(seed))
    n = num_images
    r = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=gen)  # noqa: E731
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)

    # Outline perturbations (in level-set units, ~0.1 = 10% of a radius): one seen in the image, one more
    # only in the labels (annotator disagreement, invisible to the network).
    def wobble(amp: float) -> torch.Tensor:
        return amp * _smooth_field(n, size, 6, gen)

    # organ
    organ_ry, organ_rx = r(0.22, 0.34) * size, r(0.22, 0.34) * size
    organ_cy, organ_cx = r(0.38, 0.62) * size, r(0.38, 0.62) * size
    organ_lvl = _ellipse_level(yy, xx, organ_cy, organ_cx, organ_ry, organ_rx, r(0, math.pi))
    organ_seen = organ_lvl + wobble(0.08)
    organ_true = organ_seen + wobble(0.06)

    # lesion: centred near the organ's rim, so it is sometimes inside, sometimes half outside
    theta = r(0, 2 * math.pi)
    rim = r(0.55, 1.0)
    les_cy = organ_cy + rim * organ_ry * torch.sin(theta)
    les_cx = organ_cx + rim * organ_rx * torch.cos(theta)
    les_r = r(0.07, 0.14) * size
    les_lvl = _ellipse_level(yy, xx, les_cy, les_cx, les_r * r(0.7, 1.3), les_r, r(0, math.pi))
    les_seen = les_lvl + wobble(0.15)
    les_true = les_seen + wobble(0.15)

    # spots: up to 3 small blobs; each image has 0..3 of them (about a third have none)
    spots_seen = torch.full((n, 1, size, size), float("inf"))
    spots_true = torch.full((n, 1, size, size), float("inf"))
    count = torch.randint(-1, 4, (n,), generator=gen).clamp(min=0)
    for k in range(3):
        present = (count > k).view(-1, 1, 1, 1)
        rad = r(0.06, 0.09) * size
        lvl = _ellipse_level(yy, xx, r(0.12, 0.88) * size, r(0.12, 0.88) * size, rad, rad, r(0, math.pi))
        seen = lvl + wobble(0.2)
        true = seen + wobble(0.25)
        inf = torch.full_like(seen, float("inf"))
        spots_seen = torch.minimum(spots_seen, torch.where(present, seen, inf))
        spots_true = torch.minimum(spots_true, torch.where(present, true, inf))

    def paint(organ: torch.Tensor, lesion: torch.Tensor, spots: torch.Tensor) -> torch.Tensor:
        lab = torch.zeros(n, 1, size, size, dtype=torch.int64)
        lab[organ < 0] = 1
        lab[lesion < 0] = 2
        lab[spots < 0] = 3
        return lab

    seen = paint(organ_seen, les_seen, spots_seen)
    labels = paint(organ_true, les_true, spots_true)[:, 0]

    # intensities: background 0, organ 1, lesion 1 + contrast (contrast in [-0.8, -0.25] or [0.25, 0.8]:
    # darker or brighter than the organ, sometimes faint), spots darker than the background
    contrast = r(0.25, 0.8) * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    level = torch.stack([torch.zeros(n), torch.ones(n), 1.0 + contrast, -r(0.4, 0.8)], dim=1)
    img = torch.gather(level.view(n, 4, 1, 1).expand(n, 4, size, size), 1, seen)
    img = _gaussian_blur(img, 1.2)
    img = img * r(0.8, 1.2).view(-1, 1, 1, 1) + 0.25 * _smooth_field(n, size, 4, gen)  # gain, bias field
    img = img + r(0.15, 0.3).view(-1, 1, 1, 1) * torch.randn(n, 1, size, size, generator=gen)
    return DemoData(images=img.contiguous(), labels=labels.contiguous())
