"""Statistics of the method comparison: intervals across seeds, paired differences, drift at matched accuracy.

Every interval is a two-sided 95% Student-t interval over seeds (`n - 1` degrees of freedom): with 3 seeds it is
wide (t = 4.30), which is the honest width of 3 seeds.
"""

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t, by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile(degrees_of_freedom: int) -> float:
    """The 0.975 quantile of Student's t (beyond the table, the normal's 1.96 plus the first-order correction)."""
    return T_975.get(degrees_of_freedom, 1.96 + 2.4 / degrees_of_freedom)


@dataclass(frozen=True)
class Interval:
    """A mean over `n` seeds with its 95% interval (`low`, `high` are NaN for fewer than 2 values)."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def t_interval(values: list[float]) -> Interval:
    """Mean of `values` with its 95% t interval."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, len(values))
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def wilson_interval(outcomes: list[int]) -> Interval:
    """The share of 1s in `outcomes` with its 95% Wilson score interval, which stays inside [0, 1] where the t
    interval of a share near 0 or 1 would not."""
    n = len(outcomes)
    if not n:
        return Interval(math.nan, math.nan, math.nan, 0)
    share, z = sum(outcomes) / n, 1.959963984540054
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return Interval(share, centre - half, centre + half, n)


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> Interval:
    """`values - baseline` seed by seed (the seeds both have), with its 95% t interval: the seed's shared data order
    and initialisation cancel out of the difference."""
    seeds = sorted(set(values) & set(baseline))
    return t_interval([values[s] - baseline[s] for s in seeds if values[s] is not None and baseline[s] is not None])


def seeds_to_exclude_zero(interval: Interval, most: int = 30) -> int | None:
    """An estimate: how many seeds a 95% t interval that holds 0 would need to leave it out, were its mean and its
    spread (the standard deviation its `n` seeds show) to hold. The fewest `m > n` with `t(m - 1) * sd / sqrt(m) <
    |mean|`; None when more than `most` would be needed, or when there is nothing to estimate from (one seed, no
    interval, a mean of 0)."""
    if interval.n < 2 or not (math.isfinite(interval.low) and math.isfinite(interval.high)) or interval.mean == 0:
        return None
    spread = (interval.high - interval.low) / 2 * math.sqrt(interval.n) / t_quantile(interval.n - 1)
    for seeds in range(interval.n + 1, most + 1):
        if t_quantile(seeds - 1) * spread / math.sqrt(seeds) < abs(interval.mean):
            return seeds
    return None


def interpolate_at(points: list[tuple[float, float]], x: float) -> float | None:
    """The `y` where the piecewise-linear path through the `(x, y)` points, taken in their order (a method's
    learning rates, smallest first), first reaches `x`; `None` if it never does: a method is never credited with a
    drift at an accuracy it did not reach. On a plateau (equal accuracy at a larger learning rate, with more drift)
    this is the drift of the smallest step that reaches `x`, the one a user raising the learning rate would stop at."""
    if len(points) == 1:
        return points[0][1] if points[0][0] == x else None
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if min(x0, x1) <= x <= max(x0, x1):
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points `(accuracy, drift)` no other point beats on both (higher accuracy, lower drift)."""
    return [
        i
        for i, (accuracy, drift) in enumerate(points)
        if not any(
            (a >= accuracy and d <= drift) and (a > accuracy or d < drift) for j, (a, d) in enumerate(points) if j != i
        )
    ]
