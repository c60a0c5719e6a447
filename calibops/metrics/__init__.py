"""Data-set evaluation: :class:`DatasetCalibration` and the pieces it is built from.

- :mod:`.config`: :class:`MetricConfig`, every option checked once, and the state layout;
- :mod:`.contribution`: :func:`contribution`, the pure batch -> contribution (every sum and the new records);
- :mod:`.state`: the named sums, their one-step commit, their all-reduce and checks of a loaded state;
- :mod:`.checkpoint`: state dicts written and checked before loading;
- :mod:`.formulas`: the data-set formulas on the summed state (macro / micro, groups, bootstrap, Brier);
- :mod:`.records`: the per-(image, class) records;
- :mod:`.report`: figures of the summed state;
- :mod:`.dataset`: :class:`DatasetCalibration`, the accumulator over a test set (config, contribution, commit).

The MONAI and torchmetrics adapters (:mod:`calibops.integrations`) use the same config, contribution and state.
"""

from .config import MetricConfig
from .contribution import Contribution, contribution, reliability_histogram_counts
from .dataset import DatasetCalibration
from .formulas import DatasetCalibrationResult, GroupGap, GroupResult

__all__ = [
    "Contribution",
    "DatasetCalibration",
    "DatasetCalibrationResult",
    "GroupGap",
    "GroupResult",
    "MetricConfig",
    "contribution",
    "reliability_histogram_counts",
]
