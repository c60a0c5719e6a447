"""Adapters for MONAI, PyTorch Ignite and torchmetrics / Lightning (optional dependencies, imported lazily).

- :mod:`calibops.integrations.monai`: ``CalibrationErrorMetric`` (a MONAI ``CumulativeIterationMetric``),
  ``CalibrationError`` (an Ignite metric handler that also writes the dataset reliability histogram and the
  per-image CSV every epoch) and ``DiceCEL1ACELoss`` (Dice + CE + mL1-ACE with per-term weights). Needs
  ``pip install 'calibops[monai]'`` (MONAI; the handler also needs ``pytorch-ignite``).
- :mod:`calibops.integrations.torchmetrics`: ``DatasetCalibrationMetric``, a ``torchmetrics.Metric`` with sum
  states. Needs ``pip install 'calibops[torchmetrics]'``.

Importing this package imports neither MONAI nor torchmetrics; importing a submodule imports its library and
raises an ``ImportError`` naming the pip line when it is missing.
"""

__all__: list[str] = []
