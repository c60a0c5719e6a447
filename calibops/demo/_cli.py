"""The command line of ``calibops demo`` (``python -m calibops demo``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

__all__ = ["demo_main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return value


def _default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _build_parser() -> argparse.ArgumentParser:
    from . import DEFAULT_RECIPE, QUICK_RECIPE

    d, q = DEFAULT_RECIPE, QUICK_RECIPE
    parser = argparse.ArgumentParser(
        prog="calibops demo",
        description=(
            "Train a small U-Net on a synthetic segmentation data set three ways (Dice+CE, Dice+CE+hard "
            "mL1-ACE, Dice+CE+soft mL1-ACE; same seed, data and steps), evaluate calibration on held-out images, "
            "repeat for several seeds, print each seed's table and the mean and range of every relative change, "
            "and write results.csv, one dataset reliability histogram (PDF and PNG) per configuration and their "
            "comparison (calibops compare: comparison.pdf/.png, .md, .tex, .csv)."
        ),
    )
    parser.add_argument("--out", default="calibops-demo", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run in well under a minute ({q.steps} steps, width {q.width}, {q.num_train}/{q.num_test} "
        "images): checks that everything works; far from convergence, so its numbers do not show the papers' "
        "findings",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=None, help=f"training steps per network (default: {d.steps})"
    )
    parser.add_argument(
        "--ace-start",
        type=_fraction,
        default=None,
        help=f"fraction of the steps trained with Dice+CE alone before the mL1-ACE term joins the loss (default: "
        f"{d.ace_start:.3g}; those steps are shared by the three networks and trained once per seed; 0: the "
        "calibration term from the first step, as in the papers, a longer run)",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (data, weights, batches; default: 0)")
    parser.add_argument(
        "--num-seeds",
        type=_positive_int,
        default=3,
        help="seeds to run, from --seed up (default: %(default)s; the spread over them is printed)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help=f"trainings run at once in worker processes (default: {_default_jobs()} here, i.e. min(2, cores); "
        "1 on --device cuda); the numbers do not depend on it",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads per training (default: %(default)s, the most efficient per core for this small "
        "network; the numbers depend slightly on it)",
    )
    parser.add_argument(
        "--train-images", type=_positive_int, default=None, help=f"training images per seed (default: {d.num_train})"
    )
    parser.add_argument(
        "--test-images", type=_positive_int, default=None, help=f"held-out test images per seed (default: {d.num_test})"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def demo_main(argv: list[str] | None = None) -> int:
    """Entry point of ``calibops demo`` / ``python -m calibops demo``; returns the exit status."""
    from . import DEFAULT_RECIPE, QUICK_RECIPE, run_demo

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
    recipe = QUICK_RECIPE if args.quick else DEFAULT_RECIPE
    overrides = {
        "steps": args.steps,
        "num_train": args.train_images,
        "num_test": args.test_images,
        "ace_start": args.ace_start,
    }
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    jobs = args.jobs or (1 if args.device == "cuda" else _default_jobs())
    try:
        run_demo(
            args.out,
            seeds=seeds,
            recipe=recipe,
            device=args.device,
            jobs=jobs,
            threads=args.threads,
            progress=not args.no_progress,
        )
    except ImportError as exc:  # matplotlib missing: say what to install instead of a traceback
        print(f"calibops demo: error: {exc}", file=sys.stderr)
        return 1
    return 0
