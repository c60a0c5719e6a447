"""``python -m calibops`` / ``calibops``: version, backends, and a cross-backend check; subcommands.

    calibops               version, available backends (and why others are missing), a loss on a small
                           synthetic 3D volume with every available backend, checked to agree
    calibops demo ...      train a small network three ways and compare calibration (calibops.demo)
    calibops evaluate ...  calibration metrics and dataset reliability histograms of saved predictions
"""

from __future__ import annotations

import sys


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
            print(f"  {binning:<4} {key:<16} loss={val:.7f}  rel.diff={dv:.1e}  max grad diff={dg:.1e}  "
                  f"{'ok' if agree else 'DISAGREES'}")
    print("all available backends agree" if ok else "BACKENDS DISAGREE")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``calibops`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from calibops.demo import demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "evaluate":
        from calibops.cli import evaluate_main

        return evaluate_main(argv[1:])
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if argv and argv[0] not in ("check", "info"):
        print(f"unknown command {argv[0]!r}\n{__doc__}", file=sys.stderr)
        return 2
    return check_backends()


if __name__ == "__main__":
    sys.exit(main())
