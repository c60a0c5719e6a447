"""The command line: ``calibops`` / ``python -m calibops``.

- :mod:`.main`: the dispatcher (``calibops``, ``calibops selfcheck``, ``demo``, ``evaluate``);
- :mod:`.evaluate`: ``calibops evaluate``, saved predictions of a test set against their labels;
- :mod:`.progress`: the one progress display.
"""

from .main import main

__all__ = ["main"]
