"""Adapters for MONAI, PyTorch Ignite, torchmetrics / Lightning and nnU-Net v2 (optional dependencies, imported
lazily).

- :mod:`calibops.integrations.monai`: ``CalibrationErrorMetric`` (a MONAI ``CumulativeIterationMetric``),
  ``CalibrationError`` (an Ignite metric handler that also writes the dataset reliability histogram and the
  per-image CSV every epoch) and ``DiceCEL1ACELoss`` (Dice + CE + mL1-ACE with per-term weights). Needs
  ``pip install 'calibops[monai]'`` (MONAI; the handler also needs ``pytorch-ignite``).
- :mod:`calibops.integrations.torchmetrics`: ``DatasetCalibrationMetric``, a ``torchmetrics.Metric`` with sum
  states. Needs ``pip install 'calibops[torchmetrics]'``.
- :mod:`calibops.integrations.nnunet`: ``nnUNetTrainerHardL1ACE`` / ``nnUNetTrainerSoftL1ACE`` (nnU-Net's loss
  plus mL1-ACE, validation ECE/ACE/MCE in nnU-Net's log and progress plot); :mod:`.nnunet_cli` runs them as
  ``calibops nnunet train|predict``. Needs ``pip install 'calibops[nnunet]'`` (docs/integrations.md: CPU installs).

Importing this package imports none of MONAI, torchmetrics or nnU-Net; importing a submodule imports its library and
raises an ``ImportError`` naming the pip line when it is missing.
"""

__all__: list[str] = []
