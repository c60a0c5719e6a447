"""``calibops demo``: train a small segmentation network three ways and compare their calibration.

The demo reproduces, in minutes on a laptop CPU, the experiment of the mL1-ACE papers (Barfoot et al.,
MICCAI 2024 and the 2025 journal extension): the same network, data, seed and number of steps are trained with

* ``dice_ce``            Dice + cross-entropy (the baseline),
* ``dice_ce_hard_ace``   Dice + cross-entropy + mL1-ACE with hard binning,
* ``dice_ce_soft_ace``   Dice + cross-entropy + mL1-ACE with soft binning,

with the loss terms weighted in equal thirds as in the 2025 paper (the baseline keeps the 1/3 weights of Dice
and CE and drops the third term). Each network is evaluated on held-out images with
:class:`calibops.metrics.DatasetCalibration`, and the whole comparison is repeated for several seeds (each
seed: its own data set, initial weights and batches) so the printed mean and range of each relative change
show whether one seed carries the result.

The first section of this file is all the calibops API the demo uses: the loss (:func:`ace_loss`,
:func:`training_loss`), the metric (:func:`evaluate_model`) and the figure (:func:`save_figure`). The
synthetic data set lives in ``_data.py``, the network and the Dice + CE baseline in ``_model.py``, the table
and spread printing in ``_report.py``, the command line in ``_cli.py``.

Run ``python -m calibops demo --help`` for the options (the entry point is ``calibops.demo._cli.demo_main``).
"""

from __future__ import annotations

import copy
import csv
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from queue import Empty

import torch
from torch import nn

from calibops import MarginalL1ACELoss
from calibops.cli.progress import Progress
from calibops.metrics import DatasetCalibration

from ._data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, DemoData, make_dataset
from ._model import TinyUNet, dice_ce_loss

__all__ = [
    "CLASS_NAMES",
    "CONFIGS",
    "CSV_COLUMNS",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "DemoData",
    "Recipe",
    "TinyUNet",
    "TrainState",
    "ace_loss",
    "dice_ce_loss",
    "evaluate_model",
    "make_dataset",
    "run_demo",
    "save_figure",
    "shared_start",
    "train_model",
    "training_loss",
]

#: configuration name -> mL1-ACE binning (None: the Dice+CE baseline without the calibration term)
CONFIGS: dict[str, str | None] = {
    "dice_ce": None,
    "dice_ce_hard_ace": "hard",
    "dice_ce_soft_ace": "soft",
}
NUM_BINS = 20


# ---------------------------------------------------------------------------------------------------------
# The calibops API in use: the loss, the metric, the figure
# ---------------------------------------------------------------------------------------------------------


def ace_loss(binning: str) -> MarginalL1ACELoss:
    """The mL1-ACE loss on logits and an integer label map, as the papers train with it (20 bins)."""
    return MarginalL1ACELoss(num_bins=NUM_BINS, binning=binning, to_onehot_y=True, softmax=True)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, ace: MarginalL1ACELoss | None) -> torch.Tensor:
    """(Dice + CE + mL1-ACE) / 3, or (Dice + CE) / 3 without ``ace``: the 2025 paper's equal-third weights."""
    dice, ce = dice_ce_loss(logits, labels)
    if ace is None:
        return (dice + ce) / 3.0
    return (dice + ce + ace(logits, labels)) / 3.0


@torch.no_grad()
def evaluate_model(
    model: nn.Module, data: DemoData, device: torch.device, batch_size: int = 32
) -> tuple[torch.Tensor, DatasetCalibration]:
    """Fill a :class:`~calibops.metrics.DatasetCalibration` with the model's predictions on ``data``.

    Returns ``(dsc, calibration)``: ``dsc`` ``(NUM_CLASSES - 1,)`` float64, each foreground class' Dice of the
    argmax prediction averaged over the images (images where the class is absent from both prediction and
    label are skipped), from the accumulator's per-image records.
    """
    calib = DatasetCalibration(
        NUM_CLASSES,
        num_bins=NUM_BINS,
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        keep_records=True,
        dice=True,
    )
    model.eval()
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device)
        y = data.labels[start : start + batch_size].to(device)
        calib.update(model(x).float(), y.unsqueeze(1))
    dice = torch.full((len(data), NUM_CLASSES), float("nan"), dtype=torch.float64)
    for rec in calib.records():
        dice[rec["image"], rec["class"]] = rec["dice"]
    return dice[:, 1:].nanmean(0), calib


def save_figure(calib: DatasetCalibration, path: str, title: str) -> None:
    """Write the dataset reliability histogram of ``calib`` (one panel per foreground class) as ``<path>.pdf`` and
    a 300-dpi ``<path>.png`` (a ``.png``/``.pdf`` suffix on ``path`` is dropped), in calibops' figure style."""
    from calibops.plot import save_figure as save

    save(calib.plot(class_names=CLASS_NAMES, title=title), path)


def write_run(calib: DatasetCalibration, folder: str) -> None:
    """Write the test-set evaluation of one configuration as ``calibops evaluate`` does (``summary.json``,
    ``per_image.csv`` with Dice, ``dataset_histogram.npz``; no figures) into ``folder``, for ``calibops compare``."""
    from pathlib import Path

    from calibops.cli.compare import run_results
    from calibops.cli.evaluate import _write_outputs

    _write_outputs(run_results(calib, CLASS_NAMES), Path(folder), dice=True, figures=False)


def write_comparison(out: str, names: list[str]) -> list[str]:
    """``calibops compare`` of the configurations' run folders ``out/runs/<name>``: ``out/comparison.pdf/.png``
    (a row per configuration, a column per class and all classes) and ``comparison.md/.tex/.csv`` (macro and micro
    ECE/ACE/MCE and Dice with bootstrap intervals over the test images, differences to the first configuration)."""
    from calibops.cli.compare import compare_runs

    dirs = [os.path.join(out, "runs", n) for n in names]
    return [str(p) for p in compare_runs(dirs, names, out, echo=False)]


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How each network is trained: ``steps`` of Adam with a one-cycle learning rate (linear warm-up to ``lr``
    over ``warmup`` of the steps, then cosine decay to zero), batches of ``batch_size`` random training images
    with random flips, a :class:`TinyUNet` of ``width`` base channels, and data set sizes.

    ``ace_start``: the fraction of the steps after which the mL1-ACE term joins the loss. The first
    ``shared_steps`` steps are Dice + CE for all three configurations (bit-identical, so they are trained once per
    seed and the three trainings continue from the same checkpoint); the calibration term is then added for the
    rest of the schedule. ``0`` trains with the calibration term from the first step, as the papers do.
    """

    steps: int = 900
    batch_size: int = 16
    lr: float = 3e-3
    warmup: float = 0.1
    width: int = 16
    num_train: int = 192
    num_test: int = 256
    ace_start: float = 2 / 3

    @property
    def shared_steps(self) -> int:
        """The number of Dice + CE steps before the mL1-ACE term joins the loss (at least one step keeps it)."""
        return min(int(round(self.ace_start * self.steps)), self.steps - 1)

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of ``lr``."""
        warm = max(1, int(round(self.warmup * self.steps)))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, self.steps - warm)))


#: the default: 3 seeds x 3 losses in under 5 minutes on 2 CPU cores; why this recipe: docs/demo_results.md
DEFAULT_RECIPE = Recipe()
#: ``--quick``: a smoke run (well under a minute), far from convergence
QUICK_RECIPE = Recipe(steps=24, batch_size=16, width=8, num_train=32, num_test=16)


@dataclass
class TrainState:
    """A training stopped after ``step`` steps: everything needed to continue it bit-identically (the network's,
    optimiser's and schedule's state dicts and the batch generator's state)."""

    step: int
    model: dict
    optimizer: dict
    scheduler: dict
    generator: torch.Tensor


def _new_training(recipe: Recipe, seed: int, device: torch.device, start: TrainState | None):
    """The network (channels-last: faster convolutions on CPU), Adam, the schedule and the batch generator, at
    step 0 (initial weights from ``seed``) or restored from ``start``."""
    torch.manual_seed(seed)
    model = TinyUNet(width=recipe.width).to(device=device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, recipe.lr_factor)
    gen = torch.Generator().manual_seed(seed + 1)
    if start is not None:
        model.load_state_dict(start.model)
        # load_state_dict keeps the checkpoint's tensors, which Adam then updates in place; and a checkpoint sent
        # to worker processes shares its storage between them (torch's shared-memory pickling): copy first
        opt.load_state_dict(copy.deepcopy(start.optimizer))
        sched.load_state_dict(start.scheduler)
        gen.set_state(start.generator)
    return model, opt, sched, gen


def _train_steps(model, opt, sched, gen, data: DemoData, ace, recipe: Recipe, steps: range, report) -> None:  # noqa: ANN001
    """Steps ``steps`` of the training: a batch of random images with random flips, the loss, one Adam step."""
    device = next(model.parameters()).device
    images, labels = data.images.to(device), data.labels.to(device)
    model.train()
    for _ in steps:
        idx = torch.randint(0, len(data), (recipe.batch_size,), generator=gen).to(device)
        x, y = images[idx], labels[idx]
        if torch.rand((), generator=gen) < 0.5:  # same flip for the batch: cheap, deterministic augmentation
            x, y = x.flip(-1), y.flip(-1)
        if torch.rand((), generator=gen) < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        loss = training_loss(model(x.contiguous(memory_format=torch.channels_last)), y, ace)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if report is not None:
            report(float(loss.detach()))


def shared_start(
    data: DemoData,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    report: Callable[[float], None] | None = None,
) -> TrainState:
    """Train the first ``recipe.shared_steps`` steps (Dice + CE, the same for every configuration) and return the
    checkpoint :func:`train_model` continues from."""
    model, opt, sched, gen = _new_training(recipe, seed, device, None)
    _train_steps(model, opt, sched, gen, data, None, recipe, range(recipe.shared_steps), report)
    return TrainState(
        step=recipe.shared_steps,
        model={k: v.detach().clone() for k, v in model.state_dict().items()},
        optimizer=copy.deepcopy(opt.state_dict()),
        scheduler=sched.state_dict(),
        generator=gen.get_state(),
    )


def train_model(
    data: DemoData,
    binning: str | None,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    report: Callable[[float], None] | None = None,
    start: TrainState | None = None,
) -> TinyUNet:
    """Train a :class:`TinyUNet` on ``data`` for ``recipe.steps`` steps; returned in eval mode.

    The loss is :func:`training_loss`: Dice + CE for the first ``recipe.shared_steps`` steps, then with the
    mL1-ACE term of ``binning`` (none for the baseline). ``start`` (from :func:`shared_start` with the same data,
    recipe and seed) skips the shared steps; the result is bit-identical to training from step 0. Deterministic
    for a given ``seed``: the initial weights, the batches and the flips are drawn from generators seeded with
    it, so every configuration sees exactly the same data in the same order. ``report(loss)`` is called after
    every step this call trains (the progress display).
    """
    if start is not None and start.step != recipe.shared_steps:
        raise ValueError(f"start is a checkpoint after {start.step} steps, the recipe shares {recipe.shared_steps}")
    model, opt, sched, gen = _new_training(recipe, seed, device, start)
    ace = ace_loss(binning) if binning is not None else None
    if start is None:
        _train_steps(model, opt, sched, gen, data, None, recipe, range(recipe.shared_steps), report)
    _train_steps(model, opt, sched, gen, data, ace, recipe, range(recipe.shared_steps, recipe.steps), report)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------------
# The demo: every seed and configuration (in parallel worker processes), then table, spread, CSV, figures
# ---------------------------------------------------------------------------------------------------------

from ._report import (  # noqa: E402  (after the API section on purpose: the reader sees that first)
    CSV_COLUMNS,
    format_spread,
    format_table,
    load_average,
    machine_line,
    spread,
)


def _nanmean(t: torch.Tensor) -> float:
    return float(t.float().nanmean()) if t.numel() else float("nan")


def _split(recipe: Recipe, seed: int) -> tuple[DemoData, DemoData]:
    """One seed's data set: (training images, held-out test images)."""
    data = make_dataset(recipe.num_train + recipe.num_test, seed)
    train = DemoData(data.images[: recipe.num_train], data.labels[: recipe.num_train])
    return train, DemoData(data.images[recipe.num_train :], data.labels[recipe.num_train :])


def _run_shared(
    seed: int, recipe: Recipe, device: str, threads: int, report: Callable[[float], None] | None
) -> tuple[TrainState, float]:
    """The shared Dice + CE steps of one seed: (checkpoint, seconds)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    state = shared_start(_split(recipe, seed)[0], recipe, seed, torch.device(device), report=report)
    return state, time.perf_counter() - t0


def _run_one(
    seed: int,
    name: str,
    recipe: Recipe,
    device: str,
    threads: int,
    figure: str | None,
    report: Callable[[float], None] | None,
    start: tuple[TrainState, float] | None,
) -> dict:
    """Train (from ``start``, the seed's shared checkpoint and its seconds, when given) and evaluate one
    configuration on one seed's data set; the row of results (no relative change)."""
    torch.set_num_threads(threads)
    device_ = torch.device(device)
    train, test = _split(recipe, seed)
    t0 = time.perf_counter()
    model = train_model(
        train, CONFIGS[name], recipe, seed, device_, report=report, start=None if start is None else start[0]
    )
    train_seconds = time.perf_counter() - t0
    dsc, calib = evaluate_model(model, test, device_)
    macro, micro = (res := calib.compute()).macro, res.micro
    if figure is not None:
        save_figure(calib, figure, f"{name}: dataset reliability histogram, {len(test)} test images, seed {seed}")
        write_run(calib, os.path.join(os.path.dirname(figure), "runs", name))
    return {
        "seed": seed,
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
        "shared_seconds": 0.0 if start is None else start[1],
        "steps": recipe.steps,
        "shared_steps": recipe.shared_steps,
        "device": device_.type,
        "threads": threads,
    }


# worker processes: the queue on which the per-step reports travel to the parent's progress bar
_QUEUE = None


def _init_worker(queue) -> None:  # noqa: ANN001  (a multiprocessing queue)
    global _QUEUE
    _QUEUE = queue


def _report_to_queue(seed: int, name: str) -> Callable[[float], None]:
    return lambda loss: _QUEUE.put((seed, name, loss))


def _shared_in_worker(seed: int, recipe: Recipe, device: str, threads: int) -> tuple[TrainState, float]:
    return _run_shared(seed, recipe, device, threads, _report_to_queue(seed, "dice_ce (shared steps)"))


def _one_in_worker(seed: int, name: str, recipe: Recipe, device: str, threads: int, figure, start) -> dict:  # noqa: ANN001
    return _run_one(seed, name, recipe, device, threads, figure, _report_to_queue(seed, name), start)


def _tasks(seeds: list[int], out: str) -> list[tuple[int, str, str | None]]:
    """(seed, configuration, figure path or None) in seed order; figures for the first seed."""
    return [
        (seed, name, os.path.join(out, f"demo_{name}") if seed == seeds[0] else None)
        for seed in seeds
        for name in CONFIGS
    ]


def _run_all(
    seeds: list[int], recipe: Recipe, device: str, jobs: int, threads: int, out: str, bar: Progress
) -> Iterator[dict]:
    """Yield the result row of every (seed, configuration), in the order of :func:`_tasks`.

    Per seed the shared steps run once, then the three configurations continue from that checkpoint; with
    ``jobs > 1`` in worker processes: every seed's shared steps are queued first, and each seed's three
    trainings as soon as its checkpoint is there.
    """
    tasks = _tasks(seeds, out)
    shared = recipe.shared_steps > 0
    if jobs == 1:  # in this process
        starts: dict[int, tuple[TrainState, float]] = {}
        for seed, name, figure in tasks:
            if shared and seed not in starts:
                bar.set_description(f"seed {seed} shared Dice+CE steps")
                starts[seed] = _run_shared(seed, recipe, device, threads, lambda loss: bar.update(loss=loss))
            bar.set_description(f"seed {seed} {name}")
            yield _run_one(
                seed, name, recipe, device, threads, figure, lambda loss: bar.update(loss=loss), starts.get(seed)
            )
        return
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe with torch's thread pools
    queue = ctx.Queue()
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
        waiting = (
            {seed: pool.submit(_shared_in_worker, seed, recipe, device, threads) for seed in seeds} if shared else {}
        )
        runs: dict[tuple[int, str], Future] = {}

        def submit(seed: int, start: tuple[TrainState, float] | None) -> None:
            for s, name, fig in tasks:
                if s == seed:
                    runs[s, name] = pool.submit(_one_in_worker, s, name, recipe, device, threads, fig, start)

        if not shared:
            for seed in seeds:
                submit(seed, None)
        next_index = 0
        while next_index < len(tasks):
            for seed in [s for s, f in waiting.items() if f.done()]:
                submit(seed, waiting.pop(seed).result())  # re-raises a worker's exception here
            running = [f for f in (*waiting.values(), *runs.values()) if not f.done()]
            if running:
                wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
            _drain(queue, bar, timeout=0.0 if running else 0.5)
            while next_index < len(tasks) and (key := tasks[next_index][:2]) in runs and runs[key].done():
                yield runs[key].result()  # re-raises a worker's exception here
                next_index += 1


def _drain(queue, bar: Progress, timeout: float) -> None:  # noqa: ANN001  (a multiprocessing queue)
    """Move the workers' step reports to the bar; wait up to ``timeout`` s for stragglers."""
    while True:
        try:
            seed, name, loss = queue.get(timeout=timeout) if timeout else queue.get_nowait()
        except Empty:
            return
        bar.set_description(f"seed {seed} {name}")
        bar.update(loss=loss)


def _schedule_line(recipe: Recipe) -> str:
    if recipe.shared_steps == 0:
        return "the mL1-ACE term in the loss from the first step"
    return (
        f"the first {recipe.shared_steps} steps Dice+CE, shared by the three networks (trained once per seed), "
        f"the mL1-ACE term in the loss for the last {recipe.steps - recipe.shared_steps}"
    )


def run_demo(
    out: str,
    seeds: tuple[int, ...] | list[int] = (0, 1, 2),
    recipe: Recipe = DEFAULT_RECIPE,
    device: str | torch.device = "cpu",
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Train the three :data:`CONFIGS` for every seed, evaluate them on held-out images, write ``out``.

    ``jobs`` trainings run at once, in worker processes when ``jobs > 1``, each on ``threads`` torch threads;
    the numbers depend on ``threads`` (float summation order) but not on ``jobs``. Writes ``out/results.csv``
    (columns :data:`CSV_COLUMNS`, one row per seed and configuration), ``out/demo_<loss>.pdf`` / ``.png`` (the
    dataset reliability histogram of each configuration on the first seed's test images), ``out/runs/<loss>/`` (that
    evaluation as ``calibops evaluate`` writes it) and ``out/comparison.*`` (``calibops compare`` of the three);
    prints each seed's table and the mean and range over the seeds of every relative change. Returns the rows.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a calibops.demo.Recipe, got {type(recipe).__name__}")
    for arg in ("steps", "batch_size", "width", "num_train", "num_test"):
        value = getattr(recipe, arg)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if not isinstance(recipe.ace_start, (int, float)) or not 0.0 <= recipe.ace_start < 1.0:
        raise ValueError(f"ace_start must be a fraction in [0, 1), got {recipe.ace_start!r}")
    for arg, value in (("jobs", jobs), ("threads", threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
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
    jobs = min(jobs, len(seeds) * len(CONFIGS))
    print(machine_line(device, jobs, threads) + f"; {load_average()} at start")
    print(
        f"data: {recipe.num_train} training / {recipe.num_test} test images {IMAGE_SIZE}x{IMAGE_SIZE} per seed, "
        f"classes {', '.join(CLASS_NAMES)}; seeds {', '.join(map(str, seeds))}; per network {recipe.steps} "
        f"Adam steps of batch {recipe.batch_size}, one-cycle lr peak {recipe.lr:g}, U-Net width {recipe.width}; "
        f"{_schedule_line(recipe)}; calibops backend {backend_for(torch.empty(0, device=device))!r}",
        flush=True,
    )
    rows: list[dict] = []
    previous_threads = torch.get_num_threads()
    total_steps = (recipe.shared_steps + (recipe.steps - recipe.shared_steps) * len(CONFIGS)) * len(seeds)
    try:
        with Progress(total_steps, unit="step", enabled=progress) as bar:
            seed_rows: list[dict] = []
            for row in _run_all(seeds, recipe, str(device), jobs, threads, out, bar):
                base = seed_rows[0] if seed_rows else row
                for metric in ("dsc", "ace", "mce"):
                    row[f"{metric}_change_pct"] = 100.0 * (row[metric] / base[metric] - 1.0)
                seed_rows.append(row)
                if len(seed_rows) == len(CONFIGS):
                    bar.write(f"\nseed {row['seed']}:\n{format_table(seed_rows)}")
                    rows.extend(seed_rows)
                    seed_rows = []
    finally:
        torch.set_num_threads(previous_threads)
    csv_path = os.path.join(out, "results.csv")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    comparison = write_comparison(out, list(CONFIGS))
    total = time.perf_counter() - t_start
    print()
    print(format_spread(spread(rows, CONFIGS), seeds))
    print(
        "\nDSC: mean over the foreground classes of the per-image Dice; ACE/MCE/ECE: macro (per-image values "
        f"averaged over the test images), {NUM_BINS} bins, background excluded; micro: on statistics summed over "
        "the test set. dDSC/dACE/dMCE: relative change against dice_ce on the same seed."
    )
    cpu = sum(os.times()[:4])  # user + system, this process and its finished workers
    print(
        f"total time {total:.1f}s wall, {cpu:.1f}s CPU ({load_average()} at the end); wrote {csv_path}, "
        f"{', '.join(f'demo_{n}.pdf/.png' for n in CONFIGS)}, runs/<configuration>/ (seed {seeds[0]}) and "
        f"{', '.join(os.path.basename(p) for p in comparison)} in {out}"
    )
    return rows
