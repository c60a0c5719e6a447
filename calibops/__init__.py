"""calibops: fused, exact calibration losses and metrics for image segmentation in PyTorch."""

from ._backends import available_backends, backend_for
from ._selfcheck import SelfCheckWarning
from ._version import __version__
from .functional import BinnedStats, CalibrationErrors
from .losses import HardL1ACELoss, MarginalL1ACELoss, SoftL1ACELoss
from .metrics import DatasetCalibration

__all__ = [
    "BinnedStats",
    "CalibrationErrors",
    "DatasetCalibration",
    "HardL1ACELoss",
    "MarginalL1ACELoss",
    "SelfCheckWarning",
    "SoftL1ACELoss",
    "__version__",
    "available_backends",
    "backend_for",
]
