"""calibops: fused, exact calibration losses and metrics for image segmentation in PyTorch.

Layers: :mod:`calibops.backends` (kernels and their selection), :mod:`calibops.engine` (the one pipeline),
:mod:`calibops.functional` / :mod:`calibops.losses` (the API), :mod:`calibops.metrics` (data-set evaluation),
:mod:`calibops.integrations` (MONAI, torchmetrics), :mod:`calibops.cli` (the command line).
"""

from ._version import __version__
from .backends import SelfCheckWarning, available_backends, backend_for
from .losses import HardL1ACELoss, MarginalL1ACELoss, MonaiShapeError, SoftL1ACELoss
from .metrics import DatasetCalibration
from .options import Options
from .results import BinnedStats, CalibrationErrors

__all__ = [
    "BinnedStats",
    "CalibrationErrors",
    "DatasetCalibration",
    "HardL1ACELoss",
    "MarginalL1ACELoss",
    "MonaiShapeError",
    "Options",
    "SelfCheckWarning",
    "SoftL1ACELoss",
    "__version__",
    "available_backends",
    "backend_for",
]
