"""Statistics over repeated seeds: mean, spread and Student-t confidence intervals.

A comparison repeats each method over a handful of seeds (3 to 10), too few for a normal
interval: Student's t with n - 1 degrees of freedom widens the interval for the few draws, and it
is the usual interval for seed repeats. Differences between two methods are paired seed by seed:
under one seed both methods see the same partition, client sampling and data order, so the
difference cancels what the seed does to both and its interval is narrower than the two
intervals' overlap suggests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values, their sample standard deviation (n - 1) and the Student-t
    confidence interval of the mean; ``std``, ``low`` and ``high`` are None for one value."""

    mean: float
    std: float | None
    low: float | None
    high: float | None
    n: int

    def describe(self, digits: int = 4) -> str:
        """``0.8123 ± 0.0100 (95% CI 0.7875 to 0.8371, n = 3)``; one value alone is just itself."""
        if self.std is None:
            return f"{self.mean:.{digits}f} (n = 1)"
        return (f"{self.mean:.{digits}f} ± {self.std:.{digits}f} ({CONFIDENCE:.0%} CI {self.low:.{digits}f} to "
                f"{self.high:.{digits}f}, n = {self.n})")


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """mean ± t_{(1 + confidence) / 2, n - 1} · s / √n over ``values`` (None when there are none)."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    mean = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return Interval(mean, None, None, None, 1)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(xs) - 1)) * std / math.sqrt(len(xs))
    return Interval(mean, std, mean - half, mean + half, len(xs))


def paired_interval(values: Sequence[float], baseline: Sequence[float],
                    confidence: float = CONFIDENCE) -> Interval | None:
    """The t interval of the per-seed differences ``values[i] - baseline[i]`` (same seed at i)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values need one baseline value each ({len(values)} != {len(baseline)})")
    return t_interval([a - b for a, b in zip(values, baseline)], confidence)


__all__ = ["CONFIDENCE", "Interval", "paired_interval", "t_interval"]
