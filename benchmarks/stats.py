"""Statistics shared by the lab's tables: the 95% Student-t interval of a mean.

Example:
    >>> t95(4)
    2.776
    >>> interval([1.0, 2.0, 3.0])
    (2.0, 2.484...)
"""

from __future__ import annotations

import statistics

__all__ = ["t95", "interval"]

# Two-sided 95% Student-t quantiles by degrees of freedom (df > 30: normal).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 18: 2.101, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df`` degrees of freedom (1.96 past 30)."""
    keys = [k for k in sorted(_T95) if k <= df]
    return _T95[keys[-1]] if df <= 30 and keys else 1.96



def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval (NaN half-width for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t95(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
