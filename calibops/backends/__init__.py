"""The kernel layer: backend resolution and fallback, the compiled extension, the Triton kernels, the self-check.

- :mod:`.registry`: which backends this machine has (and why not) and each backend's statistics op;
- :mod:`.resolve`: which backend runs for a tensor (``auto``, ``CALIBOPS_BACKEND``, the first-use self-check);
- :mod:`.extension`: loading ``calibops._C``, the fake kernels and the autograd formula every kernel shares;
- :mod:`.selfcheck`: the check of a GPU kernel against the reference, and the record ``verified.json``;
- :mod:`.triton`: the Triton kernels (imported on first use).
"""

from .registry import BACKENDS, available_backends, stats_function
from .resolve import backend_for, resolve_backend, resolve_call
from .selfcheck import SelfCheckWarning

__all__ = [
    "BACKENDS",
    "SelfCheckWarning",
    "available_backends",
    "backend_for",
    "resolve_backend",
    "resolve_call",
    "stats_function",
]
