"""Paired-by-seed statistics: MaxUp minus its baseline at the same seed, with its interval and a verdict.

A MaxUp fit and its baseline at one seed share the initial weights, the batch order and the warm-up's
augmentation draws, so their difference cancels what the seed does to both. :func:`paired_interval` gives the
mean difference and its Student-t interval, :func:`wilson_interval` the Wilson score interval of the probability
that MaxUp beats the baseline on a new seed (Bouthillier et al., "Accounting for Variance in Machine Learning
Benchmarks", MLSys 2021, recommend this probability of outperforming), and :class:`PairedDifference` holds both with
a verdict in words. ``lightning-maxup study``, the demo and the benchmarks all use them.

The t quantile comes from SciPy (``pip install "lightning_maxup[study]"``); the rest is the standard library.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_maxup._extras import require

__all__ = ["PairedDifference", "compare_by_seed", "paired_difference", "paired_interval", "wilson_interval"]


def paired_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its two-sided Student-t interval (NaN with one value).

    Example:
        >>> mean, half = paired_interval([1.0, 2.0, 3.0])
        >>> mean, round(half, 3)  # 4.303 * 1 / sqrt(3)
        (2.0, 2.484)
    """
    t = require("scipy.stats", "paired_interval", "study").t

    n = len(differences)
    mean = statistics.mean(differences)
    if n < 2:
        return mean, float("nan")
    return mean, float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``successes`` may count ties as halves).

    Example:
        >>> low, high = wilson_interval(4, 4)
        >>> round(low, 3), high
        (0.51, 1.0)
    """
    if n < 1:
        return float("nan"), float("nan")
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedDifference:
    """MaxUp minus its baseline at the same seed: mean, 95 % t half-width, wins and ties over the seeds.

    Args:
        mean: Mean paired difference (MaxUp - baseline), in the unit it was given in (points for accuracies).
        half: Half-width of its 95 % Student-t interval (NaN with one seed).
        wins: Seeds on which MaxUp did better (higher, or lower when ``higher_is_better`` is ``False``).
        seeds: Seeds compared.
        ties: Seeds on which both scored the same.
        higher_is_better: Whether a larger value of the metric is better (accuracy) or worse (a loss).

    Example:
        >>> d = PairedDifference(mean=1.2, half=0.8, wins=4, seeds=4)
        >>> str(d), d.verdict, d.cell()
        ('+1.20 ± 0.80', 'MaxUp better', '+1.20 ± 0.80 (4/4)')
        >>> PairedDifference(mean=-0.3, half=0.1, wins=0, seeds=4, higher_is_better=False).verdict
        'MaxUp better'
    """

    mean: float
    half: float
    wins: int
    seeds: int
    ties: int = 0
    higher_is_better: bool = True

    @property
    def verdict(self) -> str:
        """What the interval says: "MaxUp better", "MaxUp worse" or "no difference shown"."""
        if self.half != self.half:
            return "one seed: no interval"
        sign = 1.0 if self.higher_is_better else -1.0
        if sign * self.mean - self.half > 0:
            return "MaxUp better"
        if sign * self.mean + self.half < 0:
            return "MaxUp worse"
        return "no difference shown"

    @property
    def probability(self) -> float:
        """Estimated probability that MaxUp beats the baseline on a new seed: wins plus half the ties, per seed."""
        return (self.wins + self.ties / 2) / self.seeds

    @property
    def probability_interval(self) -> tuple[float, float]:
        """95 % Wilson score interval of :attr:`probability`."""
        return wilson_interval(self.wins + self.ties / 2, self.seeds)

    def __str__(self) -> str:
        half = "n/a" if self.half != self.half else f"{self.half:.2f}"
        return f"{self.mean:+.2f} ± {half}"

    def cell(self) -> str:
        """Table cell with the wins, e.g. ``+0.63 ± 0.41 (4/4)``."""
        return f"{self} ({self.wins}/{self.seeds})"


def compare_by_seed(
    treated: Mapping[int, float], baseline: Mapping[int, float], scale: float = 1.0, higher_is_better: bool = True
) -> PairedDifference | None:
    """``treated - baseline`` on the seeds both have, times ``scale``; ``None`` when no seed is shared.

    Example:
        >>> d = compare_by_seed({0: 0.91, 1: 0.93, 2: 0.90}, {0: 0.90, 1: 0.90, 2: 0.90, 3: 0.5}, scale=100)
        >>> round(d.mean, 6), d.wins, d.ties, d.seeds
        (1.333333, 2, 1, 3)
    """
    seeds = [s for s in treated if s in baseline]
    if not seeds:
        return None
    diffs = [scale * (treated[s] - baseline[s]) for s in seeds]
    mean, half = paired_interval(diffs)
    sign = 1.0 if higher_is_better else -1.0
    wins = sum(sign * d > 0 for d in diffs)
    ties = sum(d == 0 for d in diffs)
    return PairedDifference(mean, half, wins, len(diffs), ties, higher_is_better)


def paired_difference(results: Sequence[Any], regime: Any, metric: str = "test_acc") -> PairedDifference | None:
    """``regime`` minus its baseline (``regime.baseline``) per seed, for ``metric``, in points (times 100).

    ``results`` are runs with ``regime``, ``seed`` and the ``metric`` attribute (the demo's ``"test_acc"`` and
    ``"test_wok"``, or the regimes study's validation scores).

    Example:
        >>> from types import SimpleNamespace as Run
        >>> maxup, base = Run(baseline="base"), "base"
        >>> runs = [Run(regime=base, seed=0, acc=0.90), Run(regime=maxup, seed=0, acc=0.92)]
        >>> paired_difference(runs, maxup, "acc").cell()
        '+2.00 ± n/a (1/1)'
    """
    base = {r.seed: getattr(r, metric) for r in results if r.regime == regime.baseline}
    treated = {r.seed: getattr(r, metric) for r in results if r.regime == regime}
    return compare_by_seed(treated, base, scale=100.0)
