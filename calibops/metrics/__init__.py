"""Data-set evaluation: :class:`DatasetCalibration` and the pieces it is built from.

- :mod:`.dataset`: :class:`DatasetCalibration`, the accumulator over a test set;
- :mod:`.state`: the named sums, their all-reduce and checks of a loaded state;
- :mod:`.formulas`: the data-set formulas on the summed state (macro / micro, groups, bootstrap, Brier);
- :mod:`.records`: the per-(image, class) records;
- :mod:`.report`: figures of the pooled statistics.
"""

from .dataset import DatasetCalibration, reliability_histogram_counts
from .formulas import DatasetCalibrationResult, GroupGap, GroupResult

__all__ = [
    "DatasetCalibration",
    "DatasetCalibrationResult",
    "GroupGap",
    "GroupResult",
    "reliability_histogram_counts",
]
