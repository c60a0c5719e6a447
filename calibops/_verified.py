"""GPU architectures on which calibops' kernel backends have been verified on real hardware.

One entry per (backend, architecture) pair whose GPU tests and ``scripts/gpu_check.sh`` passed, with the card,
the software versions and the date behind it. ``backend="auto"`` uses a GPU kernel backend on an architecture
listed here without further checks; on any other architecture it first runs the one-time self-check of
``calibops/_selfcheck.py``. Entries are written by ``python -m calibops selfcheck --record`` (which
``scripts/gpu_check.sh`` runs on the GPU machine): review the diff and commit it. Plain data only.
"""

VERIFIED: tuple[dict[str, str], ...] = ()
