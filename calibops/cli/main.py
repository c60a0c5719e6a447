"""``python -m calibops`` / ``calibops``: version, backends, and a cross-backend check; subcommands.

calibops --version     the version
calibops               version, available backends (and why others are missing), a loss on a small
                       synthetic 3D volume with every available backend, checked to agree
calibops compare RUN_DIR... --names ... --out DIR
                       several evaluate outputs side by side (calibops.cli.compare)
calibops demo ...      train a small network three ways and compare calibration (calibops.demo)
calibops evaluate ...  calibration metrics and dataset reliability histograms of saved predictions
calibops selfcheck [--device cuda:0] [--record]
                       run the GPU kernel backends' self-check against the reference (float32, float16,
                       bfloat16), one specialisation per row, and print the table; exit status 0 if all pass.
                       --record adds the passing (backend, GPU architecture) pairs to
                       calibops/backends/verified.json (the diff to commit)
"""

from __future__ import annotations

import argparse
import sys
import warnings


def check_backends() -> int:
    """Print version and backends; run the loss with each available backend and check they agree."""
    import torch

    import calibops
    from calibops import functional as F

    print(f"calibops {calibops.__version__} (torch {torch.__version__})")
    avail = calibops.available_backends()
    for name, why in avail.items():
        print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, 12, generator=gen)
    labels = torch.randint(0, 4, (2, 1, 16, 16, 12), generator=gen)
    ok = True
    for binning in ("hard", "soft"):
        results = {}
        for dev in devices:
            x = logits.to(dev).requires_grad_(True)
            y = labels.to(dev)
            for name, why in avail.items():
                if why is not None:
                    continue
                try:
                    if calibops.backend_for(x, name) != name:
                        continue
                except RuntimeError:
                    continue
                loss = F.marginal_l1_ace(x, y, binning=binning, to_onehot_y=True, softmax=True, backend=name)
                (grad,) = torch.autograd.grad(loss, x)
                results[f"{name}@{dev}"] = (loss.item(), grad.cpu())
        ref_loss, ref_grad = results["reference@cpu"]
        for key, (val, grad) in results.items():
            dv = abs(val - ref_loss) / max(abs(ref_loss), 1e-12)
            dg = (grad - ref_grad).abs().max().item() / max(ref_grad.abs().max().item(), 1e-12)
            agree = dv < 1e-5 and dg < 1e-2
            ok &= agree
            print(
                f"  {binning:<4} {key:<16} loss={val:.7f}  rel.diff={dv:.1e}  max grad diff={dg:.1e}  "
                f"{'ok' if agree else 'DISAGREES'}"
            )
    print("all available backends agree" if ok else "BACKENDS DISAGREE")
    if torch.cuda.is_available():
        ok &= gpu_selfcheck(torch.device("cuda", torch.cuda.current_device()))
    else:
        print("GPU self-check: runs only on CUDA devices (none here); see `python -m calibops selfcheck --help`")
    return 0 if ok else 1


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _spec_label(r) -> str:
    """The specialisation a result checked (its one case's name; auto's cases are named by the specialisation)."""
    if len(r.cases) == 1:
        return r.cases[0].name
    if getattr(r, "spec", None) is not None:
        return r.spec.describe()
    return f"{len(r.cases)} cases" if r.cases else "-"


def print_selfcheck_table(results, unavailable: dict[str, str]) -> None:
    """One row per self-check result (backend, dtype, specialisation), then one line per backend that could
    not run, then what disagreed."""
    from calibops.backends import selfcheck as _selfcheck

    head = (
        "backend",
        "device",
        "arch",
        "dtype",
        "record",
        "self-check",
        "max err/budget",
        "worst",
        "time",
        "specialisation",
    )
    rows = []
    for r in results:
        worst = r.worst
        ratio = "-" if worst is None else ("inf" if worst.ratio == float("inf") else f"{worst.ratio:.3g}")
        where = "error" if r.error else ("-" if worst is None else (worst.quantity or "-"))
        rows.append(
            (
                r.backend,
                r.device,
                r.arch,
                _dtype_name(r.dtype),
                "verified" if _selfcheck.is_verified(r.backend, r.arch) else "-",
                "pass" if r.ok else "FAIL",
                ratio,
                where,
                f"{r.seconds * 1e3:.0f} ms",
                _spec_label(r),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    for name, why in unavailable.items():
        print(f"  {name}: not checked ({why})")
    for r in results:
        if not r.ok:
            print(f"  {r.backend} {_dtype_name(r.dtype)} {_spec_label(r)}: {r.describe()}")


def print_case_legend(results) -> None:
    """What each fixed case's short name stands for: the specialisation it checks."""
    from calibops.backends import selfcheck as _selfcheck

    names = dict.fromkeys(c.name for r in results for c in r.cases if r.spec is None)
    by_name = {c.name: c for c in _selfcheck.CASES}
    for name in names:
        if name in by_name:
            print(f"  {name} = {_selfcheck.case_specialisation(by_name[name])}")


def print_auto_specialisations() -> None:
    """The specialisations ``backend="auto"`` self-checked in this process, and what it runs for each."""
    from calibops.backends import resolve as _backends
    from calibops.backends import selfcheck as _selfcheck

    checked = _selfcheck.checked_specialisations()
    if not checked:
        print("  backend='auto' has self-checked no specialisation in this process yet (each is checked on first use)")
        return
    print(f"  backend='auto' self-checked {len(checked)} specialisation(s) in this process:")
    print_selfcheck_table(checked, {})
    for (dtype, index, spec), name in _backends._AUTO_SPEC.items():
        print(f"  auto on {dtype}{'' if index is None else ':' + str(index)}: {spec.describe()} -> {name}")


def _run_cases(name, device, dtypes, n_cases: int | None = None) -> list:
    """One self-check result per (dtype, fixed case) of backend ``name`` on ``device`` (the first ``n_cases``)."""
    from calibops.backends import selfcheck as _selfcheck

    cases = _selfcheck.CASES[:n_cases] if n_cases is not None else _selfcheck.CASES
    return [_selfcheck.run_selfcheck(name, device, dt, cases=(case,)) for dt in dtypes for case in cases]


def gpu_selfcheck(device) -> bool:
    """``python -m calibops`` on a GPU: self-check every available GPU kernel backend on ``device`` for every
    kernel dtype and fixed case (one specialisation each), print the table, then run the default loss once
    under ``auto`` per dtype and list the specialisations auto checked; True if all pass."""
    import torch

    import calibops.functional as F
    from calibops.backends import resolve as _backends
    from calibops.backends import selfcheck as _selfcheck

    print(f"GPU self-check on {device} ({_selfcheck.device_name(device)}, {_selfcheck.device_arch(device)}):")
    results, unavailable = [], {}
    for name in _backends.GPU_CANDIDATES:
        why = _backends.why_unavailable(name, device)
        if why is not None:
            unavailable[name] = why
            continue
        results += _run_cases(name, device, _selfcheck.DTYPES)
    print_selfcheck_table(results, unavailable)
    print_case_legend(results)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _selfcheck.SelfCheckWarning)  # the table below says what disagreed
        for dt in _selfcheck.DTYPES:
            x = torch.randn(2, 4, 16, 16, 8, device=device, dtype=dt)
            y = torch.randint(0, 4, (2, 1, 16, 16, 8), device=device)
            F.marginal_l1_ace(x, y, to_onehot_y=True, softmax=True)
    print_auto_specialisations()
    return all(r.ok for r in results) and all(r.ok for r in _selfcheck.checked_specialisations())


def selfcheck_main(argv: list[str]) -> int:
    """``calibops selfcheck``: the kernel backends' self-check on one device, a table, optionally recorded."""
    parser = argparse.ArgumentParser(
        prog="calibops selfcheck",
        description="Run the GPU kernel backends' self-check against the reference and print a table. Exit "
        "status 0 if every checked backend passes for every dtype, 1 otherwise (or if nothing could be "
        "checked), 2 for a usage error or a refused --record.",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device to check (default: the current CUDA device); 'cpu' runs the Triton kernels "
        "through the interpreter when TRITON_INTERPRET=1 (tests, dry runs)",
    )
    parser.add_argument(
        "--backends", default="cuda,triton", help="comma-separated kernel backends to check (default: cuda,triton)"
    )
    parser.add_argument(
        "--dtypes",
        default="float32,float16,bfloat16",
        help="comma-separated input dtypes (default: float32,float16,bfloat16)",
    )
    parser.add_argument(
        "--cases",
        type=int,
        default=None,
        help="check only the first N of the fixed specialisations (default: all; dry runs); --record needs all",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="add or update the passing (backend, architecture) pairs in the record of verified "
        "GPU architectures (needs a real GPU run of every dtype)",
    )
    parser.add_argument(
        "--record-file",
        default=None,
        help="record file to write (default: the package's calibops/backends/verified.py)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)

    import torch

    from calibops.backends import resolve as _backends
    from calibops.backends import selfcheck as _selfcheck

    dtypes_by_name = {_dtype_name(dt): dt for dt in _selfcheck.DTYPES}
    try:
        dtypes = [dtypes_by_name[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    except KeyError as exc:
        print(f"calibops selfcheck: --dtypes must name some of {', '.join(dtypes_by_name)}, got {exc}", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    allowed = [b for b in _backends.BACKENDS if b != "reference"]
    if args.cases is not None and args.cases < 1:
        print(f"calibops selfcheck: --cases must be >= 1, got {args.cases}", file=sys.stderr)
        return 2
    if not backends or not dtypes or any(b not in allowed for b in backends):
        print(
            f"calibops selfcheck: --backends must name some of {', '.join(allowed)} (the reference is what "
            f"they are checked against), got {args.backends!r}; --dtypes must not be empty",
            file=sys.stderr,
        )
        return 2
    if args.device is None:
        if not torch.cuda.is_available():
            print(
                "calibops selfcheck: no CUDA device here; the GPU self-check runs on CUDA devices (on a "
                "CPU-only machine `--device cpu` with TRITON_INTERPRET=1 runs the Triton kernels through the "
                "interpreter)",
                file=sys.stderr,
            )
            return 1
        args.device = "cuda"
    try:
        device = _selfcheck.normalize_device(args.device)
    except (RuntimeError, ValueError) as exc:
        print(f"calibops selfcheck: --device {args.device!r} is not a usable device: {exc}", file=sys.stderr)
        return 2
    if args.record:
        interpreted = "triton" in backends and _backends.triton_interpret()
        if device.type != "cuda" or interpreted:
            print(
                f"calibops selfcheck: refusing to --record a run on {device}"
                + (" through the Triton interpreter" if interpreted else "")
                + ": the record lists GPU architectures verified on real hardware",
                file=sys.stderr,
            )
            return 2
        if set(dtypes) != set(_selfcheck.DTYPES) or args.cases is not None:
            print(
                "calibops selfcheck: --record needs every dtype and case checked (drop --dtypes and --cases)",
                file=sys.stderr,
            )
            return 2

    where = f" ({_selfcheck.device_name(device)}, {_selfcheck.device_arch(device)})" if device.type == "cuda" else ""
    print(f"calibops self-check on {device}{where}, torch {torch.__version__}")
    results, unavailable = [], {}
    for name in backends:
        why = _backends.why_unavailable(name, device)
        if why is not None:
            unavailable[name] = why
            continue
        results += _run_cases(name, device, dtypes, args.cases)
    n = len(_selfcheck.CASES[: args.cases] if args.cases is not None else _selfcheck.CASES)
    print(f"{n} specialisation(s) per backend and dtype (the column on the right):")
    print_selfcheck_table(results, unavailable)
    print_case_legend(results)
    ok = bool(results) and all(r.ok for r in results)
    if not results:
        print("nothing was checked: no requested backend can run on this device")
    if args.record:
        passed = [b for b in backends if b not in unavailable and all(r.ok for r in results if r.backend == b)]
        if passed:
            path = args.record_file or _selfcheck.RECORD_PATH
            _selfcheck.write_record([_selfcheck.record_entry(b, device) for b in passed], path)
            print(
                f"recorded {', '.join(passed)} on {_selfcheck.device_arch(device)} in {path} "
                "(review the diff and commit it)"
            )
        else:
            print("nothing recorded: no backend passed")
    print("self-check passed" if ok else "SELF-CHECK FAILED")
    return 0 if ok else 1


COMMANDS = {
    "check": "version, available backends (and why others are missing), a cross-backend check (the default)",
    "evaluate": "calibration metrics, per-class spread and the dataset reliability histogram of saved "
    "predictions (NIfTI, MHA/NRRD, NumPy; nnU-Net and MONAI SaveImage folders)",
    "compare": "several evaluate outputs side by side: one figure and one table (Markdown, LaTeX, CSV) with "
    "bootstrap intervals and the differences to the first run",
    "demo": "train a small network three ways and compare calibration",
    "selfcheck": "the GPU kernel backends' self-check against the reference (table; --record)",
    "nnunet": "nnU-Net v2 with mL1-ACE: `calibops nnunet train` / `predict` (needs calibops[nnunet])",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one ``--help`` listing every subcommand (each has its own ``--help``)."""
    p = argparse.ArgumentParser(
        prog="calibops",
        description="calibops: fused calibration losses and metrics for image segmentation.",
        epilog="Run `calibops COMMAND --help` for a command's options.",
    )
    p.add_argument("-V", "--version", action="store_true", help="print the version of calibops and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``calibops`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from calibops.demo._cli import demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "evaluate":
        from calibops.cli.evaluate import evaluate_main

        return evaluate_main(argv[1:])
    if argv and argv[0] == "selfcheck":
        return selfcheck_main(argv[1:])
    if argv and argv[0] == "compare":
        from calibops.cli.compare import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] in ("-V", "--version"):
        from calibops._version import __version__  # the one version (the package metadata reads it too)

        print(f"calibops {__version__}")
        return 0
    if argv and argv[0] == "nnunet":
        from calibops.integrations.nnunet_cli import main as nnunet_main

        return nnunet_main(argv[1:])
    if argv and argv[0] in ("-h", "--help", "help"):
        build_parser().print_help()
        return 0
    if argv and argv[0] not in ("check", "info"):
        print(
            f"calibops: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} (see calibops --help)",
            file=sys.stderr,
        )
        return 2
    return check_backends()


if __name__ == "__main__":
    sys.exit(main())
