"""Triton kernels for calibops (the ``"triton"`` backend), one module per op family.

``binned_stats`` is the registered op ``calibops::triton_binned_stats`` (kernel-contract signature, autograd
attached); ``binned_stats_backward`` is ``calibops::triton_binned_stats_backward``. Importing this package
needs triton; :mod:`calibops.backends.resolve` imports it lazily and reports any failure as the reason the backend
is unavailable.
"""

from .binned_stats import binned_stats, binned_stats_backward
from .launch import MAX_C_BLOCK, launch_config

__all__ = ["MAX_C_BLOCK", "binned_stats", "binned_stats_backward", "launch_config"]
