"""``calibops demo``: train a small segmentation network three ways and compare their calibration.

The demo reproduces, in a few minutes on a laptop CPU, the experiment of the mL1-ACE papers (Barfoot et
al., MICCAI 2024 and the 2025 journal extension): the same network, data, seed and number of steps are
trained with

* ``dice_ce``            Dice + cross-entropy (the baseline),
* ``dice_ce_hard_ace``   Dice + cross-entropy + mL1-ACE with hard binning,
* ``dice_ce_soft_ace``   Dice + cross-entropy + mL1-ACE with soft binning,

with the loss terms weighted in equal thirds as in the 2025 paper (the baseline keeps the 1/3 weights of
Dice and CE and drops the third term). Each network is then evaluated on held-out images with
:class:`calibops.metrics.DatasetCalibration`: Dice similarity (DSC) per class, macro ACE/MCE/ECE over the
foreground classes (per-image values averaged over the images) and micro ACE/MCE (on statistics summed over
the test set). The demo prints a table, writes ``results.csv`` and one dataset reliability histogram PNG per
configuration.

The data set is synthetic and generated in code from the seed (nothing is downloaded): 2D grey-level images
with four classes -- background, a large "organ", a "lesion" that touches or sits inside it with a contrast
that varies from clear to faint, and small, rare "spots" -- blurred and noisy, with label boundaries that
wander by a pixel or two away from the visible edges (as two annotators would disagree). Nothing in the image
can tell the network exactly where the label boundary is, so a well-calibrated network must be unsure there,
which is what the calibration metrics measure.

Run ``python -m calibops demo --help`` for the options; :func:`demo_main` is the entry point.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CONFIGS",
    "DemoData",
    "TinyUNet",
    "demo_main",
    "dice_ce_loss",
    "make_dataset",
    "run_demo",
]

NUM_CLASSES = 4
CLASS_NAMES = ("background", "organ", "lesion", "spots")
IMAGE_SIZE = 48

#: configuration name -> mL1-ACE binning (None: the Dice+CE baseline without the calibration term)
CONFIGS: dict[str, str | None] = {
    "dice_ce": None,
    "dice_ce_hard_ace": "hard",
    "dice_ce_soft_ace": "soft",
}


# ---------------------------------------------------------------------------------------------------------
# Synthetic data set
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Network and baseline loss
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------


class _Progress:
    """A dependency-free progress bar on stderr (redraws in place on a terminal, else a line every 10%)."""

    def __init__(self, label: str, total: int, stream=None) -> None:
        self.label, self.total = label, total
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_decile = -1

    def update(self, done: int, loss: float) -> None:
        """Show ``done`` of ``total`` steps and the latest training loss."""
        frac = done / self.total
        decile = int(frac * 10)
        if not self.tty and decile == self._last_decile and done != self.total:
            return
        self._last_decile = decile
        filled = int(round(24 * frac))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        line = (
            f"{self.label:<17} |{'#' * filled}{'.' * (24 - filled)}| {done:>{len(str(self.total))}}/{self.total}"
            f"  loss {loss:.4f}  {elapsed:5.1f}s elapsed, {eta:4.1f}s left"
        )
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def train_model(
    data: DemoData,
    binning: str | None,
    steps: int,
    seed: int,
    device: torch.device,
    batch_size: int = 16,
    lr: float = 3e-3,
    label: str = "",
    progress: bool = True,
) -> TinyUNet:
    """Train a :class:`TinyUNet` on ``data`` with (Dice + CE + mL1-ACE) / 3, or (Dice + CE) / 3 if no ``binning``.

    Deterministic for a given ``seed``: the initial weights, the batches and the flips are drawn from
    generators seeded with it, so every configuration sees exactly the same data in the same order. Adam with
    a cosine learning-rate decay to zero.
    """
    from calibops import MarginalL1ACELoss

    torch.manual_seed(seed)
    model = TinyUNet().to(device)
    ace = None
    if binning is not None:
        ace = MarginalL1ACELoss(num_bins=20, binning=binning, to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed + 1)
    images, labels = data.images.to(device), data.labels.to(device)
    bar = _Progress(label, steps) if progress else None
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen).to(device)
        x, y = images[idx], labels[idx]
        if torch.rand((), generator=gen) < 0.5:  # same flip for the batch: cheap, deterministic augmentation
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand((), generator=gen) < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        logits = model(x)
        dice, ce = dice_ce_loss(logits, y)
        loss = dice + ce
        if ace is not None:
            loss = loss + ace(logits, y)
        loss = loss / 3.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(step + 1, float(loss.detach()))
    model.eval()
    return model


@torch.no_grad()
def evaluate_model(model: nn.Module, data: DemoData, device: torch.device, batch_size: int = 32):
    """Fill a :class:`calibops.metrics.DatasetCalibration` with the model's predictions on ``data``.

    Returns ``(dsc, calibration)``: ``dsc`` ``(NUM_CLASSES - 1,)`` float64, each foreground class' Dice of
    the argmax prediction averaged over the images (images where the class is absent from both prediction
    and label are skipped), from the accumulator's per-image records.
    """
    from calibops.metrics import DatasetCalibration

    calib = DatasetCalibration(
        NUM_CLASSES,
        num_bins=20,
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        keep_records=True,
        dice=True,
    )
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device)
        y = data.labels[start : start + batch_size].to(device)
        calib.update(model(x).float(), y.unsqueeze(1))
    dice = torch.full((len(data), NUM_CLASSES), float("nan"), dtype=torch.float64)
    for rec in calib.records():
        dice[rec["image"], rec["class"]] = rec["dice"]
    return dice[:, 1:].nanmean(0), calib


def _nanmean(t: torch.Tensor) -> float:
    return float(t.float().nanmean()) if t.numel() else float("nan")


# ---------------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "loss",
    "dsc",
    "ace",
    "mce",
    "ece",
    "micro_ace",
    "micro_mce",
    *(f"dsc_{name}" for name in CLASS_NAMES[1:]),
    *(f"ace_{name}" for name in CLASS_NAMES[1:]),
    "dsc_change_pct",
    "ace_change_pct",
    "train_seconds",
    "steps",
    "seed",
    "device",
    "threads",
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> str:
    try:
        return f"load average {os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):  # not on every platform
        return "load average unknown"


def _machine_line(device: torch.device) -> str:
    cpu = _cpu_name()
    where = f"{torch.get_num_threads()} CPU thread(s), {os.cpu_count()} logical core(s), {cpu}"
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device) + f"; data prep on {where}"
    return (
        f"device: {device.type} ({where}); python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def _format_table(rows: list[dict]) -> str:
    head = ("loss", "DSC", "ACE", "MCE", "ECE", "micro ACE", "micro MCE", "dDSC %", "dACE %", "train s")
    keys = (
        "loss",
        "dsc",
        "ace",
        "mce",
        "ece",
        "micro_ace",
        "micro_mce",
        "dsc_change_pct",
        "ace_change_pct",
        "train_seconds",
    )
    cells = [list(head)]
    for row in rows:
        out = [row["loss"]]
        for k in keys[1:]:
            v = row[k]
            out.append(f"{v:+.1f}" if k.endswith("_pct") else f"{v:.1f}" if k == "train_seconds" else f"{v:.4f}")
        cells.append(out)
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(
    out: str,
    steps: int = 300,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_train: int = 192,
    num_test: int = 64,
    progress: bool = True,
) -> list[dict]:
    """Train the three :data:`CONFIGS`, evaluate them on the held-out images, write ``out``; return the rows.

    Writes ``out/results.csv`` (columns :data:`CSV_COLUMNS`) and ``out/demo_<loss>.png`` (the dataset
    reliability histogram of each configuration on the test images), and prints the table.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for arg, value in (("num_train", num_train), ("num_test", num_test)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch.cuda.is_available() is False; use --device cpu")
    try:
        import matplotlib  # noqa: F401  (the figures are matplotlib Figures, no pyplot or display needed)
    except ImportError as exc:
        raise ImportError("calibops demo needs matplotlib for its figures: pip install 'calibops[plot]'") from exc

    from calibops import backend_for

    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    data = make_dataset(num_train + num_test, seed)
    train = DemoData(data.images[:num_train], data.labels[:num_train])
    test = DemoData(data.images[num_train:], data.labels[num_train:])
    backend = backend_for(torch.empty(0, device=device))
    print(_machine_line(device) + f"; {_load_average()} at start")
    print(
        f"data: {num_train} training / {num_test} test images {IMAGE_SIZE}x{IMAGE_SIZE}, classes "
        f"{', '.join(CLASS_NAMES)}; {steps} steps, batch 16, seed {seed}; calibops backend {backend!r}"
    )
    rows: list[dict] = []
    for name, binning in CONFIGS.items():
        t0 = time.perf_counter()
        model = train_model(train, binning, steps, seed, device, label=name, progress=progress)
        train_seconds = time.perf_counter() - t0
        dsc, calib = evaluate_model(model, test, device)
        result = calib.compute()
        macro, micro = result.macro, result.micro
        row = {
            "loss": name,
            "dsc": _nanmean(dsc),
            "ace": _nanmean(macro.ace),
            "mce": _nanmean(macro.mce),
            "ece": _nanmean(macro.ece),
            "micro_ace": _nanmean(micro.ace),
            "micro_mce": _nanmean(micro.mce),
            **{f"dsc_{c}": float(v) for c, v in zip(CLASS_NAMES[1:], dsc)},
            **{f"ace_{c}": float(v) for c, v in zip(CLASS_NAMES[1:], macro.ace.float().cpu())},
            "train_seconds": train_seconds,
            "steps": steps,
            "seed": seed,
            "device": device.type,
            "threads": torch.get_num_threads(),
        }
        base = rows[0] if rows else row
        row["dsc_change_pct"] = 100.0 * (row["dsc"] / base["dsc"] - 1.0)
        row["ace_change_pct"] = 100.0 * (row["ace"] / base["ace"] - 1.0)
        rows.append(row)
        fig = calib.plot(
            class_names=CLASS_NAMES, title=f"{name}: dataset reliability histogram, {len(test)} test images"
        )
        fig.savefig(os.path.join(out, f"demo_{name}.png"), dpi=100, bbox_inches="tight")

    with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    total = time.perf_counter() - t_start
    print()
    print(_format_table(rows))
    print(
        "\nDSC: mean over the foreground classes of the per-image Dice; ACE/MCE/ECE: macro (per-image values "
        "averaged over the test images), 20 bins, background excluded; micro: on statistics summed over the "
        "test set. dDSC/dACE: relative change against dice_ce."
    )
    print(
        f"total time {total:.1f}s ({_load_average()} at the end); wrote {os.path.join(out, 'results.csv')} and "
        f"{', '.join(f'demo_{n}.png' for n in CONFIGS)} in {out}"
    )
    return rows


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibops demo",
        description=(
            "Train a small U-Net on a synthetic segmentation data set three ways (Dice+CE, Dice+CE+hard "
            "mL1-ACE, Dice+CE+soft mL1-ACE; same seed and steps), evaluate calibration on held-out images, and "
            "write results.csv and one dataset reliability histogram PNG per configuration."
        ),
    )
    parser.add_argument("--out", default="calibops-demo", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=300,
        help="training steps per configuration (default: %(default)s; fewer is faster)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, weights and batches (default: 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads for torch (default: 1; the network is small, one thread is the most efficient per "
        "core and gives the same numbers on any machine; the result depends slightly on the thread count)",
    )
    parser.add_argument(
        "--train-images", type=_positive_int, default=192, help="synthetic training images (default: %(default)s)"
    )
    parser.add_argument(
        "--test-images", type=_positive_int, default=64, help="held-out synthetic test images (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def demo_main(argv: list[str] | None = None) -> int:
    """Entry point of ``calibops demo`` / ``python -m calibops demo``; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return int(exc.code or 0)
    if args.seed < 0:
        parser.print_usage(sys.stderr)
        print("calibops demo: error: --seed must be >= 0", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "calibops demo: error: --device cuda but torch has no CUDA device here; use --device cpu", file=sys.stderr
        )
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run_demo(
            args.out,
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            num_train=args.train_images,
            num_test=args.test_images,
            progress=not args.no_progress,
        )
    except ImportError as exc:  # matplotlib missing: say what to install instead of a traceback
        print(f"calibops demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(previous_threads)
    return 0


if __name__ == "__main__":
    sys.exit(demo_main())
