"""Make the README's calibration figures from synthetic data generated in code (no downloads).

    python docs/images/make_figures.py    # writes docs/images/dataset_histogram, reliability_diagram and
                                          # pooled_reliability_liver, each as .pdf and 300-dpi .png

The data: 48 synthetic 2D "scans" (96 x 96) with three foreground structures (blobs) on background. A
"model" predicts softmax probabilities from the true labels with a blurred, shifted boundary and a
per-image temperature drawn from [0.4, 2.5]: some images are over-confident, others under-confident, which
the pooled reliability diagram would average away and the dataset reliability histogram shows as spread.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from calibops.functional import binned_stats
from calibops.metrics import DatasetCalibration
from calibops.plot import pooled_reliability, reliability_diagram, save_figure

HERE = os.path.dirname(os.path.abspath(__file__))
CLASS_NAMES = ["background", "liver", "kidney", "tumour"]


def synthetic_cases(n: int = 48, size: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, 4, size, size), labels (n, size, size)) of a deliberately miscalibrated model."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for c, radius in ((1, 26.0), (2, 13.0), (3, 7.0)):
        centre = torch.rand(n, 2, generator=g) * (size * 0.6) + size * 0.2
        r = radius * (0.7 + 0.6 * torch.rand(n, 1, 1, generator=g))
        d = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
        labels[d < r] = c
    onehot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    # blurred, shifted evidence: the "model" is unsure near boundaries and slightly misplaces them
    k = torch.ones(4, 1, 7, 7) / 49.0
    evidence = F.conv2d(torch.roll(onehot, shifts=(2, -1), dims=(2, 3)), k, padding=3, groups=4)
    noise = 0.35 * torch.randn(n, 4, size, size, generator=g)
    temperature = 0.4 + 2.1 * torch.rand(n, 1, 1, 1, generator=g)
    logits = (6.0 * evidence + noise) / temperature
    return logits, labels


def main(argv: list[str] | None = None) -> int:
    """Write the figures into ``--out`` (default: this directory)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=HERE, help="output directory (default: docs/images)")
    args = p.parse_args(argv)
    logits, labels = synthetic_cases()
    metric = DatasetCalibration(num_classes=4, num_bins=20, to_onehot_y=True, softmax=True)
    for start in range(0, logits.shape[0], 8):  # batches, as in an evaluation loop
        metric.update(logits[start : start + 8], labels[start : start + 8])
    res = metric.compute()
    for k, c in enumerate(res.classes):
        macro, micro = float(res.macro.ece[k]), float(res.micro.ece[k])
        print(f"{CLASS_NAMES[c]:<10} macro ECE {macro:.4f}  micro ECE {micro:.4f}")
    os.makedirs(args.out, exist_ok=True)
    save_figure(metric.plot(class_names=CLASS_NAMES), os.path.join(args.out, "dataset_histogram"))
    stats = binned_stats(logits[:1], labels[:1], num_bins=20, to_onehot_y=True, softmax=True)
    fig = reliability_diagram(stats, image=0, class_index=1, title="image 0, liver")
    save_figure(fig, os.path.join(args.out, "reliability_diagram"))
    fig = pooled_reliability(metric.pooled_stats(), metric.histogram(), class_index=0, class_names=CLASS_NAMES[1:])
    save_figure(fig, os.path.join(args.out, "pooled_reliability_liver"))
    print(f"wrote dataset_histogram, reliability_diagram and pooled_reliability_liver (.pdf, .png) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
